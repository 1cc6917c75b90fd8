"""The measured table of docs/methods.md: every method on the quickstart task, same step budget.

Each method trains SmolLM2-135M-Instruct on the quickstart's record-extraction task (the same data,
steps, batch and schedule; the learning rate is the method's usual one, below) and is scored on the
same held-out records by exact-record match, with its eval loss. Each runs in its own process, so
peak memory (max RSS) is the method's own.

    python benchmarks/methods_table.py                 # every row, ~20-30 min on 2 CPU cores
    python benchmarks/methods_table.py --only lora,ia3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tunelab.data import records_task

# (row name, method options, learning rate[, extra train options]). Linear-layer methods of the peft
# family adapt every linear layer except (IA)^3, whose paper fixes its targets (keys, values, FFN
# down projection); the others keep their papers' default targets.
ROWS = [
    ("full", {"name": "full"}, 5e-5),
    ("lora", {"name": "lora", "r": 16, "alpha": 32}, 2e-3),
    ("lora rslora", {"name": "lora", "r": 16, "alpha": 32, "rslora": True}, 2e-3),
    ("lora dora", {"name": "lora", "r": 16, "alpha": 32, "dora": True}, 2e-3),
    ("lora pissa", {"name": "lora", "r": 16, "alpha": 32, "init": "pissa"}, 2e-4),
    ("lora olora", {"name": "lora", "r": 16, "alpha": 32, "init": "olora"}, 2e-4),
    ("lora+ (ratio 16)", {"name": "lora", "r": 16, "alpha": 32, "lora_plus_ratio": 16}, 5e-4),
    ("vera", {"name": "vera", "target": "all-linear"}, 1e-2),
    ("adalora", {"name": "adalora", "target": "all-linear"}, 2e-3),
    ("loha", {"name": "loha", "target": "all-linear"}, 2e-3),
    ("lokr", {"name": "lokr", "target": "all-linear"}, 2e-3),
    ("ia3", {"name": "ia3"}, 1e-2),
    ("prompt_tuning (text init)", {"name": "prompt_tuning", "num_virtual_tokens": 20, "init": "text", "init_text": "Extract the record as JSON with its fields."}, 3e-2),
    ("prefix_tuning", {"name": "prefix_tuning", "num_virtual_tokens": 20, "projection": True, "projection_hidden": 512}, 1e-3),
    ("oft", {"name": "oft", "target": "all-linear"}, 2e-3),
    ("boft", {"name": "boft", "target": "all-linear"}, 2e-3),
    # Method zoo II: methods from the literature that peft does not ship.
    ("series_adapter", {"name": "series_adapter"}, 1e-3),
    ("parallel_adapter", {"name": "parallel_adapter"}, 1e-3),
    ("nola", {"name": "nola"}, 5e-3),
    ("reft", {"name": "reft"}, 2e-3),
    ("lofit", {"name": "lofit"}, 5e-3),
    ("ether", {"name": "ether", "target": "all-linear"}, 3e-3),
    ("ether+", {"name": "ether", "plus": True, "target": "all-linear"}, 3e-3),
    ("diablo", {"name": "diablo"}, 5e-4),
    ("hft", {"name": "hft"}, 5e-5),
    ("freeze (last 2 layers)", {"name": "freeze"}, 1e-4),
    ("subtuning", {"name": "subtuning"}, 1e-4),
    ("lisa", {"name": "lisa", "interval": 5}, 5e-5),
    ("owlore", {"name": "owlore", "interval": 5}, 5e-5),
    ("s2ft", {"name": "s2ft"}, 5e-4),
    ("sparse_ft", {"name": "sparse_ft"}, 2e-4),
    # Training options, with any method.
    ("full + galore", {"name": "full"}, 1e-4, {"optimizer": "galore", "galore_rank": 64, "galore_update_every": 10}),
    ("lora + neftune", {"name": "lora", "r": 16, "alpha": 32}, 2e-3, {"neftune_alpha": 5.0}),
]


def run_one(name: str, out: Path, model: str, steps: int, n_eval: int) -> dict:
    """Train and score one row (in this process)."""
    import tunelab
    from tunelab.eval.evaluate import evaluate

    options, lr, *extra = next(row[1:] for row in ROWS if row[0] == name)
    train_extra = extra[0] if extra else {}
    data = out / "data"
    run_dir = out / name.replace(" ", "_").replace("(", "").replace(")", "")
    config = {
        "model": model,
        "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"), "max_length": 256},
        "method": options,
        "train": {"max_steps": steps, "batch_size": 8, "lr": lr, "warmup": 0.1, "save_every": 0, "eval_every": 0, "seed": 0, **train_extra},
        "output": str(run_dir),
    }
    result = tunelab.train(tunelab.load_config(config), overwrite=True)
    scores = evaluate(run_dir, base=False, max_samples=n_eval, max_new_tokens=64)["tuned"]
    report = result.report
    return {
        "method": name,
        "options": options,
        "lr": lr,
        "train_options": train_extra,
        "trainable_params": report["trainable_params"],
        "percent": 100 * report["trainable_params"] / _base_params(model),
        "json_record_match": scores["json_record_match"],
        "json_field_accuracy": scores["json_field_accuracy"],
        "eval_loss": scores["eval_loss"],
        "first_loss": json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"],
        "final_train_loss": report["final_train_loss"],
        "train_seconds": report["train_seconds"],
        "peak_memory_mb": report["peak_memory_mb"],
    }


def _base_params(model: str) -> int:
    from tunelab.config.schema import ModelConfig
    from tunelab.models.loader import load_model_skeleton

    return sum(p.numel() for p in load_model_skeleton(ModelConfig(name=model)).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--n-eval", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("runs/methods"))
    parser.add_argument("--only", default=None, help="comma-separated row names")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one row here
    args = parser.parse_args()

    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.out, args.model, args.steps, args.n_eval)))
        return
    train_rows, eval_rows = records_task.make_splits(2000, args.n_eval, seed=0)  # the quickstart's split
    (args.out / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        (args.out / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    names = [row[0] for row in ROWS if args.only is None or row[0] in args.only.split(",")]
    results = []
    for name in names:
        started = time.perf_counter()
        command = [sys.executable, __file__, "--one", name, "--model", args.model, "--steps", str(args.steps), "--n-eval", str(args.n_eval), "--out", str(args.out)]
        done = subprocess.run(command, capture_output=True, text=True)
        line = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: FAILED\n{done.stderr[-3000:]}", flush=True)
            continue
        results.append(json.loads(line.removeprefix("RESULT ")))
        r = results[-1]
        print(
            f"{name}: match {r['json_record_match']:.2f}, loss {r['first_loss']:.3f} -> {r['final_train_loss']:.3f}, "
            f"{r['train_seconds']:.0f} s train, {time.perf_counter() - started:.0f} s total",
            flush=True,
        )
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n| method | trainable params | % of model | held-out exact-record match | eval loss | train loss first → last | train s | peak MiB | lr |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['method']} | {r['trainable_params']:,} | {r['percent']:.3f} | {r['json_record_match']:.2f} | {r['eval_loss']:.3f} | "
            f"{r['first_loss']:.2f} → {r['final_train_loss']:.2f} | {r['train_seconds']:.0f} | {r['peak_memory_mb']:.0f} | {r['lr']:g} |"
        )


if __name__ == "__main__":
    main()
