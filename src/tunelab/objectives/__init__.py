"""Training objectives, one small module each. Each returns a loss SUM and the count it was summed
over, so the training loop can normalize by the targets of the whole accumulated batch."""

from tunelab.objectives.causal_lm import causal_lm_loss

__all__ = ["causal_lm_loss"]
