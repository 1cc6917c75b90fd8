"""Training objectives behind one seam (base.py), one module each, found by name in registry.py."""

from tunelab.objectives.causal_lm import causal_lm_loss

__all__ = ["causal_lm_loss"]
