"""What each CPU optimization of tunelab's trainer contributes: the `tunelab bench` workload,
trained once as shipped and once with each optimization taken out (one process per run).

    python benchmarks/ablation.py [--out ablation.json] [--steps 12] [--rounds 2]

Every round runs every variant once, so drift of the machine spreads over all of them; prints a
Markdown table (median tokens/s, largest peak RSS, eval loss) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from tunelab.bench.workload import Workload, default_data, run_config, write_splits


def _plain_lora_forward(self, x):
    return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def _full_logits_cross_entropy(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.t()).float(), labels, reduction="sum")


def _without(name: str) -> None:
    """Take one optimization out, in this process only."""
    if name == "fused LoRA autograd":
        from tunelab.methods.lora import LoraLinear

        LoraLinear.forward = _plain_lora_forward
    elif name == "chunked linear cross-entropy":
        from tunelab.objectives import causal_lm

        causal_lm.LinearCrossEntropy.apply = staticmethod(_full_logits_cross_entropy)
    elif name == "padding-free packed attention":
        from tunelab.models import loader

        loader.enable_packed_attention = lambda model: False  # packed rows with a block-causal mask
    elif name == "allocator settings":
        from tunelab.train import loop

        loop.keep_freed_memory = lambda: False


# name -> config changes; the ones without changes are patched in the child by _without.
VARIANTS = {
    "as shipped": {},
    "bf16 matmuls for frozen weights (AMX)": {"train": {"frozen_dtype": "float32"}},
    "fused LoRA autograd": {},
    "chunked linear cross-entropy": {},
    "padding-free packed attention": {},
    "packing (pad to longest instead)": {"data": {"packing": False}},
    "token-bounded forwards (1024)": {"train": {"max_tokens_per_forward": 0}},
    "allocator settings": {},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/ablation.json"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    workload = Workload(data=default_data(), steps=args.steps)
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_path, eval_path = write_splits(workload, tmp / "data")
        for _ in range(args.rounds):
            for name, changes in VARIANTS.items():
                config = run_config(workload, train_path, eval_path, tmp / "run")
                for section, values in changes.items():
                    config[section].update(values)
                spec, result_path = tmp / "spec.json", tmp / "result.json"
                spec.write_text(json.dumps({"config": config}))
                subprocess.run([sys.executable, __file__, "--child", name, str(spec), str(result_path)], check=True)
                runs[name].append(json.loads(result_path.read_text()))
    rows = [
        {
            "without": name,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
            "all_tokens_per_s": [r["tokens_per_s"] for r in results],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "eval_loss": results[0]["eval_loss"],
        }
        for name, results in runs.items()
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"workload": workload.as_dict(), "threads": torch.get_num_threads(), "runs": rows}, indent=2))
    shipped = rows[0]
    print("| taken out | tokens/s (median) | runs | vs shipped | peak RSS MiB | eval loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['without'] if row is not shipped else '(nothing: as shipped)'} | {row['tokens_per_s']:.0f} | "
            f"{', '.join(f'{t:.0f}' for t in row['all_tokens_per_s'])} | "
            f"{row['tokens_per_s'] / shipped['tokens_per_s']:.2f}x | {row['peak_rss_mb']:.0f} | {row['eval_loss']:.4f} |"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, variant, spec_path, result_path = sys.argv
        _without(variant)
        from tunelab.bench.sides import main as side_main

        side_main("tunelab", spec_path, result_path)
    else:
        main()
