"""Training objectives behind one seam (base.py), one module each, found by name in registry.py."""
