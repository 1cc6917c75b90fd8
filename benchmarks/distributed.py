"""One process against two on this machine: the `tunelab bench` workload (SmolLM2-135M-Instruct on
Alpaca rows) trained with the same global batch in 1 process (batch 8) and in 2 ranks
(`--nproc 2`, batch 4 each), for LoRA under ddp and full fine-tuning under fsdp.

    python benchmarks/distributed.py [--steps 8] [--out distributed.json]

Prints a Markdown table for docs/distributed.md: tokens/s, each rank's peak resident memory and
training state (its parameters or their shards, gradients, AdamW moments), the final loss of each, and the largest difference between the two runs' final weights. Every run is a
fresh `tunelab train` process; the 1-process run gets all the machine's cores as threads, each of
the 2 ranks half of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from safetensors.torch import load_file

from tunelab.bench.workload import Workload, default_data, run_config, write_splits

CASES = [("lora", "ddp"), ("full", "fsdp")]


def train(config: dict, folder: Path, name: str, processes: int) -> dict:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // processes))}
    command = [sys.executable, "-m", "tunelab", "train", str(path)] + (["--nproc", str(processes)] if processes > 1 else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads((Path(config["output"]) / "report.json").read_text())


def final_weights(run_dir: Path) -> dict:
    folder = run_dir / ("model" if (run_dir / "model").is_dir() else "adapter")
    return {name: t for file in folder.glob("*.safetensors") for name, t in load_file(file).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        workload = Workload(data=default_data(), steps=args.steps, max_length=256, eval_samples=8, lr=1e-4)
        train_path, _ = write_splits(workload, folder)
        for method, distributed in CASES:
            reports, runs = {}, {}
            for processes, batch in ((1, 8), (2, 4)):
                name = f"{method}-{processes}"
                config = run_config(Workload(**{**workload.__dict__, "method": method, "batch_size": batch}), train_path, None, folder / name)
                config["train"].update(distributed=distributed, frozen_dtype="float32")
                config["model"]["dtype"] = "float32"
                if method == "full":
                    config["method"] = {"name": "full"}
                reports[processes], runs[processes] = train(config, folder, name, processes), folder / name
            one, two = final_weights(runs[1]), final_weights(runs[2])
            worst = max((one[k] - two[k]).abs().max().item() for k in one)
            rows.append(
                {
                    "method": method,
                    "distributed": distributed,
                    "tokens_per_s": [reports[1]["tokens_per_s"], reports[2]["tokens_per_s"]],
                    "peak_memory_mb_per_rank": [reports[1]["peak_memory_mb_per_rank"], reports[2]["peak_memory_mb_per_rank"]],
                    "training_state_mb_per_rank": [reports[1]["training_state_mb_per_rank"], reports[2]["training_state_mb_per_rank"]],
                    "final_loss": [reports[1]["final_train_loss"], reports[2]["final_train_loss"]],
                    "max_weight_difference": worst,
                    "trainable_params": reports[1]["trainable_params"],
                }
            )
    print(f"{os.cpu_count()} cores, torch threads: 1 process {os.cpu_count()}, 2 ranks {max(1, (os.cpu_count() or 1) // 2)} each; {args.steps} steps of 8 rows\n")
    print("| method | engine | processes | tokens/s | peak RSS per rank (MiB) | training state per rank (MiB) | final loss | max weight difference |")
    print("|---|---|---:|---:|---|---|---:|---:|")
    for row in rows:
        for i, processes in enumerate((1, 2)):
            memory = " / ".join(f"{m:.0f}" for m in row["peak_memory_mb_per_rank"][i])
            state = " / ".join(f"{m:.0f}" for m in row["training_state_mb_per_rank"][i])
            difference = f"{row['max_weight_difference']:.1e}" if i else ""
            print(
                f"| {row['method']} | {row['distributed'] if i else '-'} | {processes} | {row['tokens_per_s'][i]:.0f} | {memory} | {state} | {row['final_loss'][i]:.4f} | {difference} |"
            )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
