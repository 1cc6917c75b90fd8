"""Label-free distillation on the quickstart's record extraction: the teacher is a `tunelab
quickstart` run (SmolLM2-135M-Instruct + LoRA, merged on load), the student the base model with a
fresh LoRA, trained on the task's prompts only (no reference answers). Reports the held-out exact
record match of the base, the teacher and the distilled student (the quickstart's eval task), the
divergence by step, and seconds per step split into sampling and update.

    tunelab quickstart --out runs/quickstart          # the teacher
    python benchmarks/distillation.py --teacher runs/quickstart/run --out runs/distill-records

Writes OUT/summary.json, OUT/divergence.png and the run directory OUT/run (an ordinary tunelab run).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import tunelab
from tunelab.data import records_task
from tunelab.eval.harness import evaluate_task
from tunelab.eval.tasks import load_task
from tunelab.plots import plot_metric
from tunelab.quickstart import DEFAULTS


def prompt_rows(rows: list[dict]) -> list[dict]:
    """The chat rows' prompts: every turn before the answer."""
    return [{"prompt": row["messages"][:-1]} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=Path("runs/quickstart/run"))
    parser.add_argument("--out", type=Path, default=Path("runs/distill-records"))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--loss", choices=("forward_kl", "reverse_kl", "jsd"), default="jsd")
    parser.add_argument("--on-policy", type=float, default=0.5, help="objective.on_policy_fraction")
    parser.add_argument("--max-completion", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    # The teacher's own splits (quickstart seed 0): the student reads the prompts of its training
    # rows and is scored on the same held-out records as the teacher.
    train_rows, eval_rows = records_task.make_splits(DEFAULTS["n_train"], DEFAULTS["n_eval"], seed=0)
    files = {}
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        files[split] = args.out / f"{split}_prompts.jsonl"
        files[split].write_text("".join(json.dumps(row) + "\n" for row in prompt_rows(rows)))
    config = {
        "model": {"name": args.model},
        "data": {"train": str(files["train"]), "eval": str(files["eval"]), "max_length": 256},
        "method": {"name": "lora", "r": DEFAULTS["r"], "alpha": DEFAULTS["alpha"], "target": "all-linear"},
        "objective": {
            "name": "distill",
            "teacher": str(args.teacher),
            "teacher_dtype": "bfloat16",
            "loss": args.loss,
            "on_policy_fraction": args.on_policy,
            "max_completion_length": args.max_completion,
        },
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": 0.1, "save_every": 0, "seed": args.seed},
        "output": str(args.out / "run"),
    }
    started = time.perf_counter()
    result = tunelab.train(tunelab.load_config(config), overwrite=True)
    train_seconds = time.perf_counter() - started
    task = load_task("quickstart")
    scores = {
        name: evaluate_task(target, task, out=args.out / "eval" / name)["metrics"]
        for name, target in (("base", args.model), ("teacher", args.teacher), ("student", result.output_dir))
    }
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    summary = {
        "record_match": {name: s["json_record_match"] for name, s in scores.items()},
        "field_accuracy": {name: s["json_field_accuracy"] for name, s in scores.items()},
        "student_minus_teacher": scores["student"]["json_record_match"] - scores["teacher"]["json_record_match"],
        "steps": len(trained),
        "train_seconds": train_seconds,
        "sampling_seconds_per_step": sum(r["generation_seconds"] for r in trained) / len(trained),
        "update_seconds_per_step": sum(r["seconds"] - r["generation_seconds"] for r in trained) / len(trained),
        "eval_divergence": result.report["eval_divergence"],
        "divergence_by_step": [r["divergence"] for r in trained],
        "config": config,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_metric(result.output_dir / "metrics.jsonl", args.out / "divergence.png", "divergence", f"{args.loss} per token", "label-free distillation: divergence by step")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("divergence_by_step", "config")}, indent=2))


if __name__ == "__main__":
    main()
