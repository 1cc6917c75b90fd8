from tunelab.eval.evaluate import evaluate
from tunelab.eval.generation import generate
from tunelab.eval.scoring import score_prediction

__all__ = ["evaluate", "generate", "score_prediction"]
