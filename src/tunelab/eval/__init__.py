from tunelab.eval.evaluate import evaluate
from tunelab.scoring.answers import score_prediction

__all__ = ["evaluate", "score_prediction"]
