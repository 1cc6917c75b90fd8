"""`tunelab quickstart`: watch a real model learn a task it could not do, in minutes on a CPU.

SmolLM2-135M-Instruct is LoRA-tuned to extract a structured record as JSON from free text (the
synthetic task in `data/records_task.py`); the base and tuned models are scored on held-out
records, and `report.json` + `loss.png` land in the output directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tunelab.config import load_config
from tunelab.console import console
from tunelab.data import records_task
from tunelab.eval.evaluate import evaluate
from tunelab.files import write_json_atomic
from tunelab.models.loader import SMOLLM2
from tunelab.plots import plot_loss
from tunelab.train import train

# Chosen so the whole quickstart fits in well under 10 minutes on 2 CPU cores (see README).
DEFAULTS = {"n_train": 2000, "n_eval": 100, "steps": 60, "batch_size": 8, "lr": 2e-3, "r": 16, "alpha": 32}


def run_quickstart(out: str | Path = "runs/quickstart", model: str = SMOLLM2, steps: int | None = None, seed: int = 0) -> dict:
    started = time.perf_counter()
    out = Path(out)
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train_rows, eval_rows = records_task.make_splits(DEFAULTS["n_train"], DEFAULTS["n_eval"], seed=seed)
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    config = load_config(
        {
            "model": model,
            "data": {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "eval.jsonl"), "max_length": 256},
            "method": {"name": "lora", "r": DEFAULTS["r"], "alpha": DEFAULTS["alpha"], "target": "all-linear"},
            "train": {
                "max_steps": steps or DEFAULTS["steps"],
                "batch_size": DEFAULTS["batch_size"],
                "lr": DEFAULTS["lr"],
                "warmup": 0.1,
                "save_every": 0,
                "eval_every": 0,
                "seed": seed,
            },
            "output": str(out / "run"),
        }
    )
    console.rule(f"[bold]tunelab quickstart: {records_task.TASK_NAME} with {model}")
    result = train(config, overwrite=True)
    scores = evaluate(out / "run", max_new_tokens=64)
    report = {
        "task": records_task.TASK_NAME,
        "metric": "json_record_match",
        "before": scores["base"]["json_record_match"],
        "after": scores["tuned"]["json_record_match"],
        "field_accuracy_before": scores["base"]["json_field_accuracy"],
        "field_accuracy_after": scores["tuned"]["json_field_accuracy"],
        "eval_loss_before": scores["base"]["eval_loss"],
        "eval_loss_after": scores["tuned"]["eval_loss"],
        "n_eval": scores["n"],
        "train_seconds": result.report["train_seconds"],
        "total_seconds": time.perf_counter() - started,
        "model": model,
        "run_dir": str(out / "run"),
    }
    plot_loss(out / "run" / "metrics.jsonl", out / "loss.png", title=f"quickstart: LoRA on {model}")
    write_json_atomic(out / "report.json", report)
    console.print(
        f"[bold green]exact-record match on {report['n_eval']} held-out records: "
        f"before {report['before']:.2f} -> after {report['after']:.2f}[/]  "
        f"(train {report['train_seconds']:.0f} s, total {report['total_seconds']:.0f} s) -> {out / 'report.json'}"
    )
    return report
