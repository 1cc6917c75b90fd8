"""Models: loading (loader.py), quantized frozen weights (quantize.py), faster attention and MLP paths."""
