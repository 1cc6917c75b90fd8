"""A built-in verifiable task for the objectives that learn from rewards (GRPO, RAFT): arithmetic
questions with numeric answers, generated from a seed. With operands up to 20 (the default),
SmolLM2-135M-Instruct answers about a third of the additions right (greedy), so groups of sampled
completions carry signal.

Each row is a chat prompt ("What is 23 + 58?") and its `answer`, checked by the `math_exact`
reward (the completion's final number). Training and held-out questions never share an operand
pair and operator, so a held-out score is never a memorized answer.
"""

from __future__ import annotations

import random

TASK_NAME = "arithmetic"
INSTRUCTION = "Answer with the number only."
OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def make_splits(n_train: int, n_eval: int, seed: int = 0, max_operand: int = 20, operators: str = "+") -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of distinct questions `a OP b` with 0 ≤ a, b ≤ max_operand."""
    questions = [(a, op, b) for op in operators for a in range(max_operand + 1) for b in range(max_operand + 1)]
    if n_train + n_eval > len(questions):
        raise ValueError(f"only {len(questions)} distinct questions with operands up to {max_operand}")
    chosen = random.Random(seed).sample(questions, n_train + n_eval)
    rows = [question_row(a, op, b) for a, op, b in chosen]
    return rows[:n_train], rows[n_train:]


def question_row(a: int, op: str, b: int) -> dict:
    return {"prompt": [{"role": "user", "content": f"What is {a} {op} {b}? {INSTRUCTION}"}], "answer": str(OPERATORS[op](a, b))}
