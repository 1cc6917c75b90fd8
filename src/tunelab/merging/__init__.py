"""Model and adapter merging (`tunelab merge`): task arithmetic, TIES, DARE, SLERP, linear and
magnitude pruning over full checkpoints and adapters of one base; see docs/merging.md."""

from tunelab.merging.merge import merge

__all__ = ["merge"]
