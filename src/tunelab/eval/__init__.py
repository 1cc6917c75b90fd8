from tunelab.eval.evaluate import evaluate
from tunelab.eval.scoring import score_prediction

__all__ = ["evaluate", "score_prediction"]
