from tunelab.train.loop import RunResult, train

__all__ = ["RunResult", "train"]
