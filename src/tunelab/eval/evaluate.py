"""`tunelab eval`: loss/perplexity and generation scores of a base and a fine-tuned model on one split."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tunelab.config import RunConfig, load_config
from tunelab.console import console
from tunelab.data.dataset import build_datasets
from tunelab.data.formats import load_examples
from tunelab.errors import TunelabError
from tunelab.eval.loss import evaluate_loss
from tunelab.files import write_json_atomic
from tunelab.generation import generate
from tunelab.models.loader import load_model
from tunelab.runs import load_run
from tunelab.scoring.answers import score_prediction


def generation_cases(examples: list[dict]) -> list[tuple[list[dict] | str, str]]:
    """(prompt, reference) for examples whose target is a known answer: a chat's final assistant
    turn, or a prompt's completion. Continued-pretraining text has no answer and is skipped."""
    cases = []
    for example in examples:
        if example.get("messages") and example["messages"][-1]["role"] == "assistant":
            cases.append((example["messages"][:-1], example["messages"][-1]["content"]))
        elif example.get("segments") and len(example["segments"]) == 2:
            prompt, completion = example["segments"]
            cases.append((prompt["text"], completion["text"]))
    return cases


def score_model(model, tokenizer, config: RunConfig, eval_set, cases, max_new_tokens: int, label: str) -> tuple[dict, list[str]]:
    """Eval loss on the tokenized split, then mean generation scores over `cases`."""
    metrics = evaluate_loss(model, eval_set, config.train.batch_size, config.data.max_length, config.data.packing, tokenizer.pad_token_id)
    predictions: list[str] = []
    if cases:
        with Progress(TextColumn(f"[bold]generate ({label})"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console) as bar:
            task = bar.add_task("generate", total=len(cases))
            predictions = generate(model, tokenizer, [p for p, _ in cases], max_new_tokens=max_new_tokens, progress=lambda n: bar.advance(task, n))
        scores = [score_prediction(pred, ref) for pred, (_, ref) in zip(predictions, cases)]
        # Each score averages over the cases it applies to (JSON scores: JSON references only), so
        # neither the first case nor a mix of plain and JSON answers decides what is reported.
        for key in dict.fromkeys(key for s in scores for key in s):
            applicable = [s[key] for s in scores if key in s]
            metrics[key] = sum(applicable) / len(applicable)
    return metrics, predictions


def evaluate(
    target: str | Path,
    overrides: list[str] | None = None,
    base: bool = True,
    tuned: bool = True,
    max_samples: int | None = None,
    max_new_tokens: int = 128,
    out: str | Path | None = None,
) -> dict:
    """Evaluate a run directory (base and fine-tuned) or a config file (its base model) on its eval split.

    Writes `eval.json` (metrics per model, seconds) and `eval_samples.jsonl` (per-sample predictions).
    """
    started = time.perf_counter()
    target = Path(target)
    is_run = target.is_dir()
    config = load_config(target / "config.yaml" if is_run else target, overrides)
    if not (config.data.eval or config.data.eval_split):
        raise TunelabError("eval needs data.eval (a file) or data.eval_split in the config")

    models = {}
    if tuned and is_run:
        loaded = load_run(target, device=config.model.device, dtype=config.model.dtype)
        models["tuned"] = (loaded.model, loaded.tokenizer)
    if base or not is_run:
        models["base"] = load_model(config.model)
    tokenizer = next(iter(models.values()))[1]

    eval_set = build_datasets(config.data, tokenizer, config.train.seed).eval
    if max_samples:
        eval_set = eval_set.select(range(min(max_samples, len(eval_set))))
    _, examples = load_examples(config.data.eval or config.data.train, config.data.format)
    cases = generation_cases([examples[row] for row in eval_set["row"]])

    results: dict = {"split": config.data.eval or f"{config.data.train} (eval_split={config.data.eval_split})", "n": len(eval_set)}
    predictions = {}
    for label in sorted(models, reverse=True):  # tuned before base: the answer users wait for comes first
        model, model_tokenizer = models[label]
        results[label], predictions[label] = score_model(model, model_tokenizer, config, eval_set, cases, max_new_tokens, label)
    results["seconds"] = time.perf_counter() - started

    out_dir = Path(out) if out else (target if is_run else Path(config.output))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "eval.json", results)
    with (out_dir / "eval_samples.jsonl").open("w") as f:
        for i, (prompt, reference) in enumerate(cases):
            row = {"prompt": prompt, "reference": reference} | {label: predictions[label][i] for label in predictions}
            f.write(json.dumps(row) + "\n")
    return results
