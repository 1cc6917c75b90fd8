"""The training loop: one run from a validated config to its artifacts.

Read `train()` top to bottom: set up the output dir, model, method, data and optimizer; resume
if asked; then each step gathers its micro-batches, normalizes the loss by the target tokens of the
whole accumulated batch, clips, steps, logs, evaluates and checkpoints.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tunelab.config import RunConfig, changed_keys, dump_config, load_config
from tunelab.console import console
from tunelab.data.batching import make_batch, split_by_tokens
from tunelab.data.dataset import build_datasets
from tunelab.errors import TrainingDiverged, TunelabError
from tunelab.files import write_json_atomic, write_text_atomic
from tunelab.eval.loss import evaluate_loss
from tunelab.methods import build_method
from tunelab.methods.peft_io import read_peft_adapter
from tunelab.models import load_model
from tunelab.models.attention import uses_packed_attention
from tunelab.objectives import causal_lm_loss
from tunelab.train.allocator import keep_freed_memory, peak_memory_mb, reset_peak_memory
from tunelab.train.artifacts import save_artifacts
from tunelab.train.precision import resolve_frozen_dtype
from tunelab.train.checkpoint import TrainState, clean_staging, list_checkpoints, load_checkpoint, save_checkpoint
from tunelab.train.galore import GaLoreAdamW, galore_param_groups
from tunelab.train.neftune import add_embedding_noise
from tunelab.train.schedule import lr_at, warmup_steps

# What a run directory may hold; `overwrite` removes exactly these and nothing else.
RUN_FILES = ("checkpoints", "adapter", "model", "metrics.jsonl", "report.json", "config.yaml", "eval.json", "eval_samples.jsonl", "eval", "loss.png")
# Config keys that may change between a run and its resumption without breaking exactness.
RESUMABLE_CHANGES = {"save_every", "eval_every", "keep_checkpoints", "log_every"}  # under train.


@dataclass
class RunResult:
    output_dir: Path
    report: dict = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        return self.report["final_train_loss"]


def train(config: RunConfig, resume: bool = False, overwrite: bool = False) -> RunResult:
    started = time.perf_counter()
    tcfg, dcfg = config.train, config.data
    output = Path(config.output)
    checkpoints_dir = output / "checkpoints"
    replaced = _check_output(output, config, resume, overwrite)  # fails before any work or write

    _seed_everything(tcfg.seed)
    keep_freed_memory()
    reset_peak_memory()
    model, tokenizer = load_model(config.model)
    method = build_method(config.method)
    method.attach(model)
    if tcfg.neftune_alpha:
        add_embedding_noise(model, tcfg.neftune_alpha)  # training forwards only: model.eval() turns it off
    params = method.trainable_parameters(model)
    if not params:
        raise TunelabError(f"method '{method.name}' left no trainable parameter on this model")
    device = next(iter(params.values())).device
    model_dtype = model.dtype
    frozen_dtype = resolve_frozen_dtype(tcfg.frozen_dtype, model_dtype, device)
    if frozen_dtype != model_dtype and method.store_frozen_weights(model, frozen_dtype):
        console.print(f"frozen weights compute in {str(frozen_dtype).removeprefix('torch.')} (train.frozen_dtype)")
    data = build_datasets(dcfg, tokenizer, tcfg.seed)
    _report_data(data.stats)
    _init_output(output, config, replaced)

    if config.method.from_peft:
        method.peft_import(model, *read_peft_adapter(config.method.from_peft))
    samples_per_step = tcfg.batch_size * tcfg.grad_accum
    epoch_steps = steps_per_epoch(len(data.train), samples_per_step)
    total_steps = tcfg.max_steps or math.ceil((tcfg.epochs or 1.0) * epoch_steps)
    warmup = warmup_steps(tcfg.warmup, total_steps)

    pad_id = tokenizer.pad_token_id
    padding_free = dcfg.packing and uses_packed_attention(model)
    if dcfg.packing and not padding_free and not method.supports_mask_packing:
        raise TunelabError(
            f"method '{method.name}' cannot train on rows packed behind a mask ({type(model).__name__} has no "
            "padding-free attention); set data.packing: false"
        )
    tokens_per_forward = resolve_tokens_per_forward(tcfg.max_tokens_per_forward, device)

    def micro_batches_of(step: int) -> list:
        # The step's samples follow from the step number alone, so a resumed run sees the same data.
        indices = step_sample_indices(step, len(data.train), samples_per_step, epoch_steps, tcfg.seed)
        # Each micro-batch runs as one or more forward passes of at most tokens_per_forward
        # tokens: that bounds activation memory, and the loss does not depend on it.
        return [
            make_batch(group, dcfg.max_length, dcfg.packing, pad_id, padding_free)
            for k in range(0, len(indices), tcfg.batch_size)
            for group in split_by_tokens([data.train[i] for i in indices[k : k + tcfg.batch_size]], tokens_per_forward)
        ]

    state = TrainState(step=0, tokens_seen=0, train_seconds=0.0)
    checkpoint = list_checkpoints(checkpoints_dir)[-1] if resume and list_checkpoints(checkpoints_dir) else None
    if checkpoint is None and method.prepare_steps:
        # A choice made from training data (LoFiT's heads, SubTuning's layers), on a fresh run only:
        # the method's state holds it for resume and load_run. Its forwards leave the RNG as it was.
        prepare_started = time.perf_counter()
        with torch.random.fork_rng():
            batches = [batch.to(device) for step in range(1, method.prepare_steps + 1) for batch in micro_batches_of(step)]
            method.prepare(model, batches, causal_lm_loss)
        state.prepare_seconds = time.perf_counter() - prepare_started
        params = method.trainable_parameters(model)
    optimizer = build_optimizer(tcfg, model, method.param_groups(model))
    if checkpoint is not None:
        # The method's init above drew from the RNG; the checkpoint restores the RNG to its saved point.
        state, trainable = load_checkpoint(checkpoint, optimizer)
        method.load_checkpoint_state(model, trainable, source=str(checkpoint))
        if method.prepare_steps:
            # The state holds prepare's choice, which may train other tensors than attach's placeholder
            # (SubTuning's layers, all of one shape): move the restored optimizer state onto them.
            params = method.trainable_parameters(model)
            restored = optimizer.state_dict()
            optimizer = build_optimizer(tcfg, model, method.param_groups(model))
            optimizer.load_state_dict(restored)
        console.print(f"Resuming from {checkpoint} (step {state.step} of {total_steps})")
    metrics_path = output / "metrics.jsonl"
    _truncate_metrics(metrics_path, after_step=state.step)

    max_grad_norm = tcfg.max_grad_norm or float("inf")
    last_loss = float("nan")
    eval_metrics: dict = {}
    if tcfg.activation_checkpointing:
        _enable_activation_checkpointing(model)
    model.train()
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} tok/s"),
        TimeRemainingColumn(),
        console=console,
    )
    with progress, metrics_path.open("a") as metrics_file:
        task = progress.add_task("train", total=total_steps, completed=state.step, loss="-", speed="-")
        for step in range(state.step + 1, total_steps + 1):
            step_started = time.perf_counter()
            lr = lr_at(step, total_steps, tcfg.lr, tcfg.scheduler, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]

            micro_batches = micro_batches_of(step)
            # Normalize by the targets of the whole accumulated batch, not per micro-batch: then
            # batch 8 x accum 1 and batch 1 x accum 8 give the same loss and gradient.
            step_targets = sum(b.n_targets for b in micro_batches)
            step_loss = 0.0
            for batch in micro_batches:
                loss = causal_lm_loss(model, batch.to(device)) / step_targets
                loss.backward()
                step_loss += loss.item()
            regularization = method.regularization(model)
            if regularization is not None:
                regularization.backward()
                step_loss += regularization.item()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params.values(), max_grad_norm))
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                good = list_checkpoints(checkpoints_dir)
                raise TrainingDiverged(
                    f"training diverged at step {step}: loss={step_loss}, grad_norm={grad_norm}; try a lower train.lr. "
                    + (f"The last good checkpoint is {good[-1]}." if good else "No checkpoint was written yet.")
                )
            optimizer.step()
            method.after_step(model, step, total_steps)
            optimizer.zero_grad(set_to_none=True)

            step_seconds = time.perf_counter() - step_started
            step_tokens = sum(b.n_tokens for b in micro_batches)
            state = TrainState(step, state.tokens_seen + step_tokens, state.train_seconds + step_seconds, state.prepare_seconds)
            last_loss = step_loss
            record = {
                "step": step,
                "loss": step_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": step_tokens,
                "target_tokens": step_targets,
                "seconds": step_seconds,
                "tokens_per_s": step_tokens / step_seconds,
            }
            if data.eval is not None and ((tcfg.eval_every and step % tcfg.eval_every == 0) or step == total_steps):
                eval_metrics = evaluate_loss(model, data.eval, tcfg.batch_size, dcfg.max_length, dcfg.packing, pad_id)
                record.update(eval_metrics)
            if step % tcfg.log_every == 0 or "eval_loss" in record or step == total_steps:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if tcfg.save_every and step % tcfg.save_every == 0 and step < total_steps:
                save_checkpoint(checkpoints_dir, state, method.checkpoint_state(model), optimizer, tcfg.keep_checkpoints)
            progress.update(task, completed=step, loss=f"{step_loss:.4f}", speed=f"{record['tokens_per_s']:.0f}")

    model.eval()
    save_artifacts(method, model, tokenizer, config, output)
    report = {
        "final_train_loss": last_loss,
        **eval_metrics,
        "steps": total_steps,
        "tokens": state.tokens_seen,
        "train_seconds": state.train_seconds,
        "tokens_per_s": state.tokens_seen / state.train_seconds if state.train_seconds else None,
        "prepare_seconds": state.prepare_seconds,
        "total_seconds": time.perf_counter() - started,
        "peak_memory_mb": peak_memory_mb(),
        "trainable_params": sum(p.numel() for p in params.values()),
        "total_params": sum(p.numel() for p in model.parameters()),
        "method": method.name,
        "model": config.model.name,
        "data": {split: stats.as_dict() for split, stats in data.stats.items()},
        "resumed_from_step": int(checkpoint.name.split("-")[1]) if checkpoint is not None else None,
    }
    write_json_atomic(output / "report.json", report)
    return RunResult(output_dir=output, report=report)


def build_optimizer(tcfg, model, groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW, or GaLore's AdamW (train/galore.py) with the targeted matrices' gradients projected."""
    adam = {"lr": tcfg.lr, "betas": tcfg.adam_betas, "eps": tcfg.adam_eps, "weight_decay": tcfg.weight_decay}
    if tcfg.optimizer == "galore":
        groups = galore_param_groups(
            model, groups, tcfg.galore_target, tcfg.galore_rank, tcfg.galore_update_every, tcfg.galore_scale
        )
        return GaLoreAdamW(groups, **adam)
    return torch.optim.AdamW(groups, **adam)


def resolve_tokens_per_forward(setting: int | str, device: torch.device) -> int:
    """`auto`: 1024 on CPU, where larger forwards only add memory (and page faults) without
    speed; no limit on GPUs, which need large matmuls to be busy. 0 means no limit."""
    if setting == "auto":
        return 0 if device.type == "cuda" else 1024
    return int(setting)


def steps_per_epoch(n_samples: int, per_step: int) -> int:
    return math.ceil(n_samples / per_step)


def planned_sample_order(n_samples: int, tcfg) -> list[int]:
    """Every training sample index a `max_steps` run will see, in the order it sees them."""
    per_step = tcfg.batch_size * tcfg.grad_accum
    epoch_steps = steps_per_epoch(n_samples, per_step)
    return [i for step in range(1, tcfg.max_steps + 1) for i in step_sample_indices(step, n_samples, per_step, epoch_steps, tcfg.seed)]


def step_sample_indices(step: int, n_samples: int, per_step: int, epoch_steps: int, seed: int) -> list[int]:
    """The training samples of 1-based `step`: a fresh seeded permutation each epoch."""
    epoch, position = divmod(step - 1, epoch_steps)
    order = np.random.default_rng([seed, epoch]).permutation(n_samples)
    return order[position * per_step : (position + 1) * per_step].tolist()


def _check_output(output: Path, config: RunConfig, resume: bool, overwrite: bool) -> list[str]:
    """Refuse to mix runs in one directory; return the old run's files that `overwrite` will replace."""
    existing = [name for name in RUN_FILES if (output / name).exists()]
    if resume and (output / "config.yaml").is_file():
        _check_resumable(output / "config.yaml", config)
        return []
    if existing and not resume and not overwrite:
        raise TunelabError(
            f"output {output} already holds a run ({', '.join(existing)}); "
            "pass --resume to continue it or --overwrite to start over"
        )
    return existing if overwrite and not resume else []


def _init_output(output: Path, config: RunConfig, replaced: list[str]) -> None:
    for name in replaced:
        path = output / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    output.mkdir(parents=True, exist_ok=True)
    clean_staging(output / "checkpoints")
    dump_config(config, output / "config.yaml")


def config_changes(saved_path: Path, config: RunConfig, ignored: frozenset[str] = frozenset()) -> list[str]:
    """The dotted keys where `config` differs from a run's saved config.yaml, except those that
    may change on resume (checkpoint and logging cadence) and `ignored`."""
    return changed_keys(load_config(saved_path).to_dict(), config.to_dict(), ignored | {f"train.{key}" for key in RESUMABLE_CHANGES})


def _check_resumable(saved_path: Path, config: RunConfig) -> None:
    changed = config_changes(saved_path, config)
    if changed:
        raise TunelabError(f"--resume: the config differs from the run's saved config.yaml at {', '.join(changed)}")


def _truncate_metrics(path: Path, after_step: int) -> None:
    """Drop metric lines past the step being resumed from (they will be recomputed)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= after_step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _enable_activation_checkpointing(model) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise TunelabError(f"train.activation_checkpointing: {type(model).__name__} does not support it")
    # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings are fine.
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _report_data(stats: dict) -> None:
    for split, s in stats.items():
        notes = [f"{s.rows} rows ({s.format})"]
        if s.truncated:
            notes.append(f"{s.truncated} truncated to data.max_length")
        if s.dropped_too_long:
            notes.append(f"{s.dropped_too_long} dropped as longer than data.max_length")
        if s.dropped_no_target:
            notes.append(f"{s.dropped_no_target} dropped with no target token left")
        console.print(f"data {split}: " + ", ".join(notes))
