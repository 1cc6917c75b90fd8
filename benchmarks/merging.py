"""The measured merges of docs/merging.md: two LoRA adapters of SmolLM2-135M-Instruct trained on
different tasks (the quickstart's record extraction, SST-2 sentiment), merged by every method of
`tunelab merge`, each merge scored on both tasks next to the single-task adapters and the base; then
a sweep over `weight` (task arithmetic) and `density` (TIES).

    python benchmarks/merging.py --shared ../shared            # ~60 min on 2 cores

Writes runs/merging-bench/ (runs, merges, results.json) and docs/merging/sweep.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

import tunelab  # noqa: E402
from tunelab.config import load_config  # noqa: E402
from tunelab.config.schema import ModelConfig  # noqa: E402
from tunelab.data import records_task  # noqa: E402
from tunelab.eval.harness import run_task  # noqa: E402
from tunelab.eval.tasks import load_task  # noqa: E402
from tunelab.merging import merge  # noqa: E402
from tunelab.models.loader import SMOLLM2, load_model  # noqa: E402
from tunelab.quickstart import DEFAULTS, write_rows  # noqa: E402
from tunelab.runs import load_run  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from sst2_leaderboard import write_training_rows  # noqa: E402

OUT = REPO / "runs" / "merging-bench"
PLOT = REPO / "docs" / "merging" / "sweep.png"
# Both adapters: LoRA r 16 / alpha 32 on every linear layer, the quickstart's budget (60 steps of 8).
LORA = {"name": "lora", "r": 16, "alpha": 32, "target": "all-linear"}
TRAIN = {"max_steps": 60, "batch_size": 8, "lr": 2e-3, "warmup": 0.1, "save_every": 0, "eval_every": 0, "seed": 0}
# Each method at the setting its paper or mergekit's examples suggest for two task vectors.
METHODS = {
    "linear": {"parameters": {"weight": 1.0}},
    "task_arithmetic": {"parameters": {"weight": 1.0}},
    "ties": {"parameters": {"weight": 1.0, "density": 0.5}},
    "dare_ties": {"parameters": {"weight": 1.0, "density": 0.5}},
    "dare_linear": {"parameters": {"weight": 1.0, "density": 0.5}},
    "magnitude_prune": {"parameters": {"weight": 1.0, "density": 0.5}},
    "slerp": {"parameters": {"t": 0.5}},
}
SWEEP = {
    "task_arithmetic": ("weight", [0.25, 0.5, 0.75, 1.0]),
    "ties": ("density", [0.2, 0.5, 0.8]),
}


def train_adapters(shared: Path) -> dict[str, Path]:
    """The two single-task LoRA runs (reused when already trained)."""
    data = OUT / "data"
    train_rows, eval_rows = records_task.make_splits(DEFAULTS["n_train"], DEFAULTS["n_eval"], seed=0)
    (data / "records").mkdir(parents=True, exist_ok=True)
    write_rows(data / "records", {"train": train_rows, "eval": eval_rows})
    write_training_rows(shared / "data" / "sst2" / "train.tsv", data / "sst2", n_train=2000, n_eval=200, seed=0)
    runs = {}
    for task, max_length in (("records", 256), ("sst2", 128)):
        run = OUT / "runs" / task
        if not (run / "adapter").is_dir():
            files = {"train": str(data / task / "train.jsonl"), "eval": str(data / task / "eval.jsonl"), "max_length": max_length}
            tunelab.train(load_config({"model": SMOLLM2, "data": files, "method": LORA, "train": TRAIN, "output": str(run)}), overwrite=True)
        runs[task] = run
    return runs


def merge_config(method: str, runs: dict[str, Path], parameters: dict) -> dict:
    models = [{"model": str(runs["records"])}, {"model": str(runs["sst2"])}]
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": str(runs["records"]), "models": models, "parameters": parameters}
    per_model = {k: v for k, v in parameters.items() if k in ("weight", "density")}
    return {"merge_method": method, "base_model": SMOLLM2, "models": [{**m, "parameters": per_model} for m in models], "seed": 0}


def score(model, tokenizer, tasks: dict) -> dict[str, float]:
    return {name: run_task(model, tokenizer, task)[0][metric] for name, (task, metric) in tasks.items()}


def scored_merge(name: str, config: dict, tasks: dict) -> dict:
    out = OUT / "merges" / name
    if not (out / "scores.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        (out.parent / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        started = time.perf_counter()
        if not (out / "merge.json").is_file():
            merge(out.parent / f"{name}.yaml", out)
        seconds = time.perf_counter() - started
        model, tokenizer = load_model(ModelConfig(name=str(out)))
        (out / "scores.json").write_text(json.dumps({**score(model, tokenizer, tasks), "merge_seconds": round(seconds, 1)}))
        del model
        gc.collect()
    return json.loads((out / "scores.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--records-samples", type=int, default=50, help="held-out records scored (of the quickstart's 100)")
    parser.add_argument("--sst2-samples", type=int, default=300, help="SST-2 dev rows scored (of 872)")
    args = parser.parse_args()
    shared = Path(args.shared)
    runs = train_adapters(shared)
    tasks = {
        "records": (load_task("quickstart", overrides=[f"max_samples={args.records_samples}", "max_new_tokens=64"]), "json_record_match"),
        "sst2": (load_task("sst2", shared / "data" / "sst2" / "dev.tsv", [f"max_samples={args.sst2_samples}"]), "accuracy"),
    }
    results = {}
    singles = OUT / "singles.json"
    if not singles.is_file():
        base, tokenizer = load_model(ModelConfig(name=SMOLLM2))
        found = {"base": score(base, tokenizer, tasks)}
        for task, run in runs.items():
            loaded = load_run(run)
            found[f"{task} adapter"] = score(loaded.model, loaded.tokenizer, tasks)
        singles.write_text(json.dumps(found))
    results.update(json.loads(singles.read_text()))
    for method, setting in METHODS.items():
        results[method] = scored_merge(method, merge_config(method, runs, setting["parameters"]), tasks)
    sweep = {}
    for method, (key, values) in SWEEP.items():
        base_setting = dict(METHODS[method]["parameters"])
        # The table's own setting is not merged twice.
        sweep[method] = [
            (v, results[method] if v == base_setting[key] else scored_merge(f"{method}-{key}-{v}", merge_config(method, runs, {**base_setting, key: v}), tasks)) for v in values
        ]
    own = {task: results[f"{task} adapter"][task] for task in tasks}
    print(f"{'model':<18} {'records':>8} {'sst2':>8} {'records kept':>13} {'sst2 kept':>10}")
    for name, found in results.items():
        kept = [found[t] / own[t] if own[t] else float("nan") for t in tasks]
        print(f"{name:<18} {found['records']:>8.3f} {found['sst2']:>8.3f} {kept[0]:>13.1%} {kept[1]:>10.1%}")
    for method, points in sweep.items():
        key = SWEEP[method][0]
        print(f"sweep {method} over {key}: " + ", ".join(f"{v}: {p['records']:.2f}/{p['sst2']:.3f}" for v, p in points))
    (OUT / "results.json").write_text(json.dumps({"results": results, "sweep": {m: [[v, p] for v, p in pts] for m, pts in sweep.items()}, "samples": vars(args)}, indent=2))
    plot_sweep(sweep, own)


def plot_sweep(sweep: dict, own: dict) -> None:
    fig, axes = plt.subplots(1, len(sweep), figsize=(4.2 * len(sweep), 3.4), sharey=True)
    for axis, (method, points) in zip(axes, sweep.items(), strict=True):
        values = [v for v, _ in points]
        for task, marker in (("records", "o"), ("sst2", "s")):
            axis.plot(values, [p[task] / own[task] for _, p in points], marker=marker, label=f"{task} (share of its own adapter's)")
        axis.axhline(0.9, color="grey", linestyle=":", linewidth=1)
        axis.set_title(method)
        axis.set_xlabel(SWEEP[method][0])
    axes[0].set_ylabel("score kept")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=120)


if __name__ == "__main__":
    main()
