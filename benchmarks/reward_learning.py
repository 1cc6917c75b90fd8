"""GRPO or RAFT on the built-in arithmetic task (data/arithmetic_task.py) with
SmolLM2-135M-Instruct and LoRA: held-out greedy accuracy before and after, the reward curve, the
share of groups with no reward spread (GRPO) or the acceptance rate (RAFT), and seconds per step
split into sampling and update. Both sample 8 completions for 8 prompts a step by default, so the
same --steps is the same sample budget.

    python benchmarks/reward_learning.py --objective grpo --out runs/grpo-arithmetic [--steps 130]
    python benchmarks/reward_learning.py --objective raft --out runs/raft-arithmetic [--steps 130]

Writes OUT/summary.json, OUT/reward.png and the run directory OUT/run (an ordinary tunelab run).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import tunelab
from tunelab.config import ModelConfig
from tunelab.data import arithmetic_task
from tunelab.data.preference import prompt_ids
from tunelab.generation import sample_completions, stop_token_ids
from tunelab.models.loader import load_model
from tunelab.plots import plot_metric
from tunelab.scoring.rewards import math_exact


def greedy_accuracy(model_name: str, rows: list[dict], max_new_tokens: int) -> float:
    """The base model's held-out score, computed as training's eval computes it (one greedy completion each)."""
    model, tokenizer = load_model(ModelConfig(name=model_name))
    prompts = [prompt_ids(row["prompt"], tokenizer) for row in rows]
    completions, _ = sample_completions(model, prompts, 1, max_new_tokens, stop_token_ids(model, tokenizer), tokenizer.pad_token_id, seed=0, temperature=0.0)
    scores = math_exact(tokenizer.batch_decode(completions, skip_special_tokens=True), [row["answer"] for row in rows])
    return sum(scores) / len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", choices=("grpo", "raft"), default="grpo")
    parser.add_argument("--out", type=Path, default=Path("runs/grpo-arithmetic"))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-completion", type=int, default=24)
    parser.add_argument("--train-questions", type=int, default=320)
    parser.add_argument("--eval-questions", type=int, default=100)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    train_rows, eval_rows = arithmetic_task.make_splits(args.train_questions, args.eval_questions, seed=args.seed)
    files = {}
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        files[split] = args.out / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "model": {"name": args.model},
        "data": {"train": str(files["train"]), "eval": str(files["eval"]), "max_length": 256},
        "method": {"name": "lora", "r": 16, "alpha": 32.0, "dropout": 0.0},
        "objective": {"name": args.objective, "num_generations": args.generations, "max_completion_length": args.max_completion, "rewards": [{"name": "math_exact"}]}
        | ({"steps_per_round": 1} if args.objective == "raft" else {}),
        "train": {"max_steps": args.steps, "batch_size": args.prompts_per_step, "lr": args.lr, "warmup": 0, "scheduler": "constant", "save_every": 0, "seed": args.seed},
        "output": str(args.out / "run"),
    }
    before = greedy_accuracy(args.model, eval_rows, args.max_completion)
    print(f"held-out accuracy before: {before:.3f}")
    started = time.perf_counter()
    result = tunelab.train(tunelab.load_config(config), overwrite=True)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    summary = {
        "held_out_accuracy_before": before,
        "held_out_accuracy_after": result.report["eval_reward"],
        "steps": len(records),
        "train_seconds": time.perf_counter() - started,
        "sampling_seconds_per_step": sum(r["generation_seconds"] for r in records) / len(records),
        "update_seconds_per_step": sum(r["seconds"] - r["generation_seconds"] for r in records) / len(records),
        **{key: sum(r[key] for r in records) / len(records) for key in ("frac_reward_zero_std", "raft/acceptance") if key in records[0]},
        "reward_by_step": [r["reward"] for r in records],
        "config": config,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_metric(result.output_dir / "metrics.jsonl", args.out / "reward.png", "reward", "mean reward (math_exact)", f"{args.objective.upper()} on arithmetic: reward by step")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("reward_by_step", "config")}, indent=2))


if __name__ == "__main__":
    main()
