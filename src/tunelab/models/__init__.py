from tunelab.models.loader import ALIASES, cache_dir, load_model, load_tokenizer, resolve_device, resolve_dtype

__all__ = ["ALIASES", "cache_dir", "load_model", "load_tokenizer", "resolve_device", "resolve_dtype"]
