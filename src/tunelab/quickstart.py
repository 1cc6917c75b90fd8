"""`tunelab quickstart`: watch a real model learn a task it could not do, in minutes on a CPU.

SmolLM2-135M-Instruct is LoRA-tuned to extract a structured record as JSON from free text (the
synthetic task in `data/records_task.py`); the base and tuned models are scored on held-out
records, and `report.json` + `loss.png` land in the output directory.

`--objective dpo|simpo|cpo|orpo|kto|reward` trains from the base on preference pairs of the same task
instead (no SFT first): chosen is the correct record, rejected the base model's own answer (on
policy; a record with one field corrupted where the base happens to be right). The report adds
held-out pair accuracy before and after.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import get_args

from tunelab.config import ModelConfig, load_config
from tunelab.console import console
from tunelab.data import records_task
from tunelab.errors import TunelabError
from tunelab.eval.evaluate import evaluate
from tunelab.files import write_json_atomic
from tunelab.models.loader import SMOLLM2, cache_dir, local_source
from tunelab.plots import plot_loss
from tunelab.train import train

# Chosen so the whole quickstart fits in well under 10 minutes on 2 CPU cores (see README).
DEFAULTS = {"n_train": 2000, "n_eval": 100, "steps": 60, "batch_size": 8, "lr": 2e-3, "r": 16, "alpha": 32}
# The preference quickstart: one pass over steps x batch_size pairs, lower rates than SFT's. DPO
# and KTO (no likelihood term) saturate on these easy pairs within a few steps at 5e-4, after which
# Adam's normalized steps drag the chosen log-probabilities down with the rejected ones: 5e-5.
PREFERENCE = {"lr": 5e-4, "max_new_tokens": 64}
PREFERENCE_LR = {"dpo": 5e-5, "kto": 5e-5}
# sft, then the objectives that train on the task's preference pairs.
OBJECTIVES = ("sft", "dpo", "simpo", "cpo", "orpo", "kto", "reward")
QUANTIZE = get_args(ModelConfig.model_fields["quantize"].annotation)


def run_quickstart(out: str | Path = "runs/quickstart", model: str = SMOLLM2, steps: int | None = None, seed: int = 0, objective: str = "sft", quantize: str = "none") -> dict:
    """`quantize`: model.quantize of the run (nf4: QLoRA)."""
    check_options(Path(out), model, steps, objective, quantize)
    if objective != "sft":
        return run_preference_quickstart(out, model, steps, seed, objective)
    started = time.perf_counter()
    out = Path(out)
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train_rows, eval_rows = records_task.make_splits(DEFAULTS["n_train"], DEFAULTS["n_eval"], seed=seed)
    write_rows(data_dir, {"train": train_rows, "eval": eval_rows})

    config = load_config(
        {
            "model": {"name": model, "quantize": quantize},
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
        "quantize": quantize,
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


def check_options(out: Path, model: str, steps: int | None, objective: str, quantize: str) -> None:
    """Refuse bad options before anything is written."""
    if objective not in OBJECTIVES:
        raise TunelabError(f"quickstart --objective {objective}: expected one of {', '.join(OBJECTIVES)}")
    if quantize not in QUANTIZE:
        raise TunelabError(f"quickstart --quantize {quantize}: expected one of {', '.join(QUANTIZE)}")
    if quantize != "none" and objective != "sft":  # its "before" scores are taken on the base by name, in full precision
        raise TunelabError(f"quickstart --quantize: only with --objective sft, not {objective}")
    if steps is not None and steps < 1:
        raise TunelabError(f"quickstart --steps {steps}: at least 1")
    if out.exists() and not out.is_dir():
        raise TunelabError(f"quickstart --out {out} is a file; the quickstart writes a directory")
    local_source(model)  # a model that is neither an alias, a model directory, a .gguf nor a hub id


def write_rows(folder: Path, splits: dict[str, list[dict]]) -> dict[str, Path]:
    paths = {}
    for name, rows in splits.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def run_preference_quickstart(out: str | Path, model: str, steps: int | None, seed: int, objective: str) -> dict:
    """The quickstart task as preference pairs, trained with `objective` from the base model."""
    from tunelab.eval.harness import evaluate_task
    from tunelab.eval.tasks import load_task

    started = time.perf_counter()
    out = Path(out)
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    steps = steps or DEFAULTS["steps"]
    train_rows, eval_rows = records_task.make_splits(steps * DEFAULTS["batch_size"], DEFAULTS["n_eval"], seed=seed)
    console.rule(f"[bold]tunelab quickstart ({objective}): {records_task.TASK_NAME} with {model}")
    pairs = cached_pairs(model, {"train": train_rows, "eval": eval_rows}, seed)
    paths = write_rows(data_dir, {"pairs_train": pairs["train"], "pairs_eval": pairs["eval"]})
    config = load_config(
        {
            "model": model,
            "data": {"train": str(paths["pairs_train"]), "eval": str(paths["pairs_eval"]), "max_length": 256},
            "method": {"name": "lora", "r": DEFAULTS["r"], "alpha": DEFAULTS["alpha"], "target": "all-linear"},
            "objective": {"name": objective},
            "train": {
                "max_steps": steps,
                "batch_size": DEFAULTS["batch_size"],
                "lr": PREFERENCE_LR.get(objective, PREFERENCE["lr"]),
                "warmup": 0.1,
                "save_every": 0,
                "eval_every": 0,
                "seed": seed,
            },
            "output": str(out / "run"),
        }
    )
    result = train(config, overwrite=True)
    pair_task = load_task({"name": "quickstart-pairs", "type": "preference", "data": str(paths["pairs_eval"]), "max_length": 256})
    pair_before = evaluate_task(model, pair_task, out=out / "eval" / "base-pairs")["metrics"]
    pair_after = evaluate_task(out / "run", pair_task, out=out / "eval" / "pairs")["metrics"]
    report = {
        "task": records_task.TASK_NAME,
        "objective": objective,
        "metric": "json_record_match",
        "before": None,
        "after": None,
        "pair_accuracy_before": pair_before["pairwise_accuracy"],
        "pair_accuracy_after": pair_after["pairwise_accuracy"],
        "pair_scored_by": {"before": pair_before["scored_by"], "after": pair_after["scored_by"]},
        "n_eval": len(eval_rows),
        "train_seconds": result.report["train_seconds"],
        "model": model,
        "run_dir": str(out / "run"),
    }
    if objective != "reward":  # a reward model is not a policy: it has no answers to score
        records = load_task("quickstart", overrides=[f"max_samples={len(eval_rows)}", f"max_new_tokens={PREFERENCE['max_new_tokens']}"])
        report["before"] = evaluate_task(model, records, out=out / "eval" / "base")["metrics"]["json_record_match"]
        report["after"] = evaluate_task(out / "run", records, out=out / "eval" / "tuned")["metrics"]["json_record_match"]
    report["total_seconds"] = time.perf_counter() - started
    plot_loss(out / "run" / "metrics.jsonl", out / "loss.png", title=f"quickstart: {objective} + LoRA on {model}")
    write_json_atomic(out / "report.json", report)
    console.print(
        f"[bold green]{objective}: held-out pair accuracy {report['pair_accuracy_before']:.2f} -> {report['pair_accuracy_after']:.2f}"
        + (f", exact-record match {report['before']:.2f} -> {report['after']:.2f}" if report["after"] is not None else "")
        + f"[/]  (train {report['train_seconds']:.0f} s, total {report['total_seconds']:.0f} s) -> {out / 'report.json'}"
    )
    return report


def cached_pairs(model_name: str, splits: dict[str, list[dict]], seed: int) -> dict[str, list[dict]]:
    """`on_policy_pairs`, kept in the tunelab cache: generating the base's answers is most of a
    preference quickstart's time on a CPU, and every objective's run wants the same pairs."""
    identity = json.dumps([model_name, seed, PREFERENCE["max_new_tokens"], splits], sort_keys=True)
    path = cache_dir() / "quickstart" / f"pairs-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    pairs = on_policy_pairs(model_name, splits, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, pairs)
    return pairs


def on_policy_pairs(model_name: str, splits: dict[str, list[dict]], seed: int) -> dict[str, list[dict]]:
    """Each chat row as a preference pair whose rejected answer is the base model's own greedy
    answer (a corrupted record where that answer is right, or empty)."""
    import random

    from tunelab.config import ModelConfig
    from tunelab.generation import generate
    from tunelab.models.loader import load_model
    from tunelab.scoring.answers import json_scores

    model, tokenizer = load_model(ModelConfig(name=model_name))
    rng = random.Random(f"{seed}-rejected")
    pairs = {}
    for split, rows in splits.items():
        prompts = [row["messages"][:-1] for row in rows]
        with console.status(f"the base model answers {len(prompts)} {split} prompts (the rejected answers)"):
            answers = generate(model, tokenizer, prompts, max_new_tokens=PREFERENCE["max_new_tokens"])
        pairs[split] = []
        for row, answer in zip(rows, answers):
            correct = row["messages"][-1]["content"]
            if not answer.strip() or json_scores(answer, json.loads(correct))["json_record_match"]:
                answer = records_task.record_to_json(records_task.corrupt_record(json.loads(correct), rng))
            pairs[split].append(records_task.preference_row(row, answer))
    return pairs
