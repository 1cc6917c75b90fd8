"""The training loop: one run from a validated config to its artifacts.

Read it top to bottom: `train()` sets the run up (output dir, model, method, objective, data,
optimizer), restores a checkpoint or prepares a fresh run, then repeats `train_step` (the step's
forward batches, each loss term normalized over the whole accumulated step, clip, optimizer step)
with logging, evaluation and checkpoints in between, and finally writes the weights and report.json.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tunelab.config import RunConfig, changed_keys, dump_config, load_config
from tunelab.console import console
from tunelab.data.batching import BatchLayout, split_by_tokens
from tunelab.data.dataset import build_datasets
from tunelab.errors import RankLost, RunStopped, TrainingDiverged, TunelabError
from tunelab.files import exclusive_directory, read_safetensors, remove_leftovers, write_json_atomic
from tunelab.methods import build_method
from tunelab.methods.peft_io import CONFIG_FILE as PEFT_CONFIG_FILE
from tunelab.methods.peft_io import read_peft_adapter, read_peft_config
from tunelab.models.attention import uses_packed_attention
from tunelab.models.loader import load_model
from tunelab.models.quantize import is_quantized, quantization_report, set_compute_dtype
from tunelab.objectives.base import StepTotals, eval_batches, evaluate_objective, step_loss
from tunelab.objectives.causal_lm import causal_lm_loss, store_head_weight
from tunelab.objectives.reference import PRECOMPUTED_FILE, choose_reference, load_precomputed, precompute, save_precomputed
from tunelab.objectives.registry import build_objective
from tunelab.objectives.sampled import SampledObjective
from tunelab.runs import RUN_FILE, check_run_format, load_peft_model, load_run, save_artifacts, write_run_file
from tunelab.train.allocator import keep_freed_memory, peak_memory_mb, reset_peak_memory
from tunelab.train.checkpoint import TrainState, list_checkpoints, load_checkpoint, newest_intact_checkpoint, save_checkpoint
from tunelab.train.distributed import SINGLE, Ranks, join, leave, resolve_mode, shard_model, training_state_mb, unshard_model, whole
from tunelab.train.galore import GaLoreAdamW, galore_param_groups
from tunelab.train.interrupt import StopRequests
from tunelab.train.neftune import add_embedding_noise
from tunelab.train.precision import resolve_frozen_dtype
from tunelab.train.reporting import MetricsSink, check_trackers
from tunelab.train.rollout import ROUNDS_DIR, Rollouts, evaluate_rewards, teacher_completed
from tunelab.train.schedule import lr_at, warmup_steps

# What a run directory may hold; `overwrite` removes exactly these and nothing else.
RUN_FILES = (
    "checkpoints",
    "adapter",
    "model",
    "metrics.jsonl",
    "report.json",
    "config.yaml",
    RUN_FILE,
    "eval.json",
    "eval_samples.jsonl",
    "eval",
    "loss.png",
    "tensorboard",
    PRECOMPUTED_FILE,
    ROUNDS_DIR,
)
# Config keys that may change between a run and its resumption without breaking exactness.
RESUMABLE_CHANGES = {"save_every", "eval_every", "keep_checkpoints", "log_every", "report_to", "distributed_timeout"}  # under train.


@dataclass
class RunResult:
    output_dir: Path
    report: dict = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        return self.report["final_train_loss"]


@dataclass
class Run:
    """Everything the steps of one run read: built once by `set_up`."""

    config: RunConfig
    model: torch.nn.Module
    tokenizer: object
    method: object
    objective: object
    data: object
    layout: BatchLayout
    device: torch.device
    total_steps: int
    warmup: int
    epoch_steps: int
    tokens_per_forward: int
    reference: object = None
    # Sequences whose reference log-probabilities this session computed (0 when resumed: read back).
    reference_logps_computed: int = 0
    optimizer: torch.optim.Optimizer | None = None
    params: dict = field(default_factory=dict)
    rollouts: Rollouts | None = None  # completions sampled in training (objective.samples_completions)
    quantized: dict | None = None  # what model.quantize stored in low precision (models/quantize.py)
    ranks: Ranks = SINGLE  # this process among the run's processes (train/distributed.py)
    anchor: dict | None = None  # train.proximal_mu: the trainable tensors as the run started

    def micro_batches(self, step: int) -> list[list[dict]]:
        """The step's samples (of all ranks), one list per micro-batch. They follow from the step
        number alone, so a resumed run sees the same data."""
        tcfg = self.config.train
        per_step = tcfg.batch_size * tcfg.grad_accum * self.ranks.world
        indices = step_sample_indices(step, len(self.data.train), per_step, self.epoch_steps, tcfg.seed)
        return [[self.data.train[i] for i in indices[k : k + tcfg.batch_size]] for k in range(0, len(indices), tcfg.batch_size)]

    def step_samples(self, step: int) -> tuple[list[list[dict]], dict]:
        """What the step trains on, by micro-batch: the data's samples, or, for an objective that
        samples completions, those of the data's prompts (train/rollout.py) with the sampling's metrics."""
        if self.rollouts is None:
            return self.micro_batches(step), {}
        return self.rollouts.step_samples(self, step)

    def forward_batches(self, micro_batches: list[list[dict]]) -> list:
        """Each micro-batch runs as one or more forward passes of at most tokens_per_forward tokens:
        that bounds activation memory, and the loss does not depend on it."""
        return [batch for samples in micro_batches for batch in self.objective.forward_batches(samples, self.layout, self.tokens_per_forward)]


def train(config: RunConfig, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Train in this process, or as one rank of several (torchrun, Ray Train: train/distributed.py)."""
    ranks = join(config.train.distributed_timeout)
    try:
        # One process at a time trains into an output directory (the lock is dropped when it
        # exits); of a run's ranks, rank 0 holds it.
        with exclusive_directory(Path(config.output), "tunelab train") if ranks.is_writer else contextlib.nullcontext():
            return _train(config, resume, overwrite, ranks)
    finally:
        leave(ranks)


def _train(config: RunConfig, resume: bool, overwrite: bool, ranks: Ranks) -> RunResult:
    started = time.perf_counter()
    run, replaced = set_up(config, resume, overwrite, ranks)
    tcfg, output, ranks = config.train, Path(config.output), run.ranks
    checkpoint, state = restore_or_prepare(run, output, resume, replaced)

    last_loss = float("nan")
    eval_metrics: dict = {}
    if tcfg.activation_checkpointing:
        _enable_activation_checkpointing(run.model)
    run.model.train()
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} tok/s"),
        TextColumn("{task.fields[extra]}"),
        TimeRemainingColumn(),
        console=console,
    )
    try:
        sink = MetricsSink(output, tcfg.report_to, state.step, config.to_dict()) if ranks.is_writer else None
        with progress, sink or contextlib.nullcontext(), StopRequests() as stop:
            bar = progress.add_task("train", total=run.total_steps, completed=state.step, loss="-", speed="-", extra="")
            for step in range(state.step + 1, run.total_steps + 1):
                with ranks.collective(f"training step {step}"):  # FSDP's collectives run inside forward and backward
                    record = train_step(run, step)
                state = replace(state, step=step, tokens_seen=state.tokens_seen + record["tokens"], train_seconds=state.train_seconds + record["seconds"])
                last_loss = record["loss"]
                if run.data.eval is not None and ((tcfg.eval_every and step % tcfg.eval_every == 0) or step == run.total_steps):
                    eval_reference = run.reference.for_split("eval") if run.reference is not None else None
                    with ranks.collective(f"evaluating at step {step}"):  # every rank evaluates (FSDP's forwards gather)
                        if isinstance(run.objective, SampledObjective):  # score the policy's held-out completions
                            eval_metrics = evaluate_rewards(run)
                        else:
                            eval_metrics = evaluate_objective(run.objective, run.model, run.data.eval, tcfg.batch_size, run.layout, eval_reference)
                    record.update(eval_metrics)
                signum = next((s for s in ranks.gather(stop.signum) if s is not None), None)  # all ranks stop at one step
                if sink and (step % tcfg.log_every == 0 or "eval_loss" in record or step == run.total_steps or signum):
                    sink.log(record)
                stopping = signum is not None and step < run.total_steps
                if (tcfg.save_every and step % tcfg.save_every == 0 and step < run.total_steps) or stopping:
                    if run.rollouts is not None:
                        state = replace(state, rollout=run.rollouts.checkpoint_state(step, run.objective.round_steps))
                    with ranks.collective(f"writing the checkpoint of step {step}"):
                        saved = save_checkpoint(output / "checkpoints", state, checkpoint_tensors(run), run.optimizer, tcfg.keep_checkpoints, ranks, run.model)
                if stopping:
                    name = signal.Signals(signum).name
                    raise RunStopped(f"{name} at step {step} of {run.total_steps}: checkpoint {saved} written; continue with --resume", signum)
                shown = "  ".join(f"{key} {record[key]:.3f}" for key in run.objective.progress_metrics if key in record)
                progress.update(bar, completed=step, loss=f"{record['loss']:.4f}", speed=f"{record['tokens_per_s']:.0f}", extra=shown)

        run.model.eval()
        state_per_rank = ranks.gather(training_state_mb(run.model, run.optimizer))
        with ranks.collective("gathering the final weights"):
            whole_state = unshard_model(run.model) if ranks.sharded else None  # rank 0 writes the whole weights
        memory_per_rank = ranks.gather(peak_memory_mb())
        if ranks.is_writer:
            save_artifacts(run.method, run.model, run.tokenizer, config, output, run.objective, whole_state)
        report = {
            "final_train_loss": last_loss,
            **eval_metrics,
            "steps": run.total_steps,
            "tokens": state.tokens_seen,
            "train_seconds": state.train_seconds,
            "tokens_per_s": state.tokens_seen / state.train_seconds if state.train_seconds else None,
            "prepare_seconds": state.prepare_seconds,
            "reference": getattr(run.reference, "kind", None),
            "reference_logps_computed": run.reference_logps_computed,
            "total_seconds": time.perf_counter() - started,
            "peak_memory_mb": memory_per_rank[0],
            "processes": ranks.world,
            "distributed": ranks.mode,
            "peak_memory_mb_per_rank": memory_per_rank,
            "training_state_mb_per_rank": state_per_rank,
            "trainable_params": sum(p.numel() for p in run.params.values()),
            "total_params": sum(p.numel() for p in run.model.parameters()),
            "method": run.method.name,
            "objective": run.objective.name,
            "model": config.model.name,
            "data": {split: stats.as_dict() for split, stats in run.data.stats.items()},
            "resumed_from_step": int(checkpoint.name.split("-")[1]) if checkpoint is not None else None,
            "quantize": run.quantized,
        }
        if ranks.is_writer:
            write_json_atomic(output / "report.json", report)
        ranks.barrier("writing the final weights")
    except TunelabError as err:  # mid-run (disk full, divergence): say what is kept, keeping the error's type
        good = list_checkpoints(output / "checkpoints")
        err.args = (f"{err}; " + (f"the last good checkpoint is {good[-1]} (continue with --resume)" if good else "no checkpoint was written yet"),)
        if not ranks.is_writer and not isinstance(err, RankLost):  # a failure of this rank's own: say so, naming it
            err.args = (f"rank {ranks.rank} of {ranks.world}: {err}",)
            console.quiet = False
        raise
    return RunResult(output_dir=output, report=report)


def set_up(config: RunConfig, resume: bool, overwrite: bool, ranks: Ranks = SINGLE) -> tuple[Run, list[str]]:
    """Model, method, objective and data of a run; fails before any write on a bad input (on every
    rank alike: each checks the same inputs)."""
    tcfg, dcfg = config.train, config.data
    replaced = _check_output(Path(config.output), config, resume, overwrite)
    check_trackers(tcfg.report_to)
    _seed_everything(tcfg.seed)
    keep_freed_memory()
    reset_peak_memory()
    model, tokenizer = load_model(config.model)
    quantized = None if config.model.quantize == "none" else quantization_report(model, config.model.quantize).as_dict()
    method = build_method(config.method)
    method.attach(model)
    if config.method.from_peft:  # read before anything is written: a bad adapter leaves the output as it was
        method.peft_import(model, *read_peft_adapter(config.method.from_peft))
    if tcfg.init_weights:  # the method's weights to start from (a federated round's global model)
        load_init_weights(method, model, config)
    objective = build_objective(config.objective)
    objective.attach(model)
    if ranks.world > 1:
        ranks = replace(ranks, mode=resolve_mode(tcfg.distributed, method, objective, tcfg.optimizer))
        if tcfg.proximal_mu and ranks.sharded:
            raise TunelabError("train.proximal_mu needs each trainable tensor whole (its anchor is a copy of them); set train.distributed: ddp")
    teacher = objective.teacher_source()
    if teacher is not None:
        objective.teacher = load_teacher(*teacher, config.model, tokenizer)
    if tcfg.neftune_alpha:
        add_embedding_noise(model, tcfg.neftune_alpha)  # training forwards only: model.eval() turns it off
    params = trainable_tensors(method, objective, model)
    if not params:
        raise TunelabError(f"method '{method.name}' left no trainable parameter on this model")
    trained_quantized = [name for name, p in params.items() if is_quantized(p)]
    if trained_quantized:
        raise TunelabError(
            f"method '{method.name}' trains the base model's own weights ({trained_quantized[0]}, ...), which model.quantize: "
            f"{config.model.quantize} stores frozen in low precision; train an adapter on the quantized base (lora, dora, "
            "ia3, ...) or set model.quantize: none"
        )
    device = next(iter(params.values())).device
    # Sharded weights have no whole copy to keep in another dtype.
    frozen_dtype = model.dtype if ranks.sharded else resolve_frozen_dtype(tcfg.frozen_dtype, model.dtype, device)
    if frozen_dtype != model.dtype:
        copied = method.store_frozen_weights(model, frozen_dtype)
        if set_compute_dtype(model, frozen_dtype) or copied:
            store_head_weight(model, frozen_dtype)  # the output head is ours to compute (objectives/causal_lm.py)
            console.print(f"frozen weights compute in {str(frozen_dtype).removeprefix('torch.')} (train.frozen_dtype)")
    with ranks.writer_first():  # rank 0 fills the tokenized-data cache, the others read it
        data = build_datasets(dcfg, tokenizer, tcfg.seed, objective.rows)
    _report_data(data.stats)
    if teacher is not None and data.eval is not None and "prompt_ids" in data.eval.column_names:  # label-free held-out rows
        with console.status(f"teacher: completing the {len(data.eval)} held-out prompts (greedy)"):
            data = replace(data, eval=teacher_completed(objective, tokenizer, data.eval))

    padding_free = dcfg.packing and uses_packed_attention(model)
    if dcfg.packing and not padding_free and not method.supports_mask_packing:
        raise TunelabError(f"method '{method.name}' cannot train on rows packed behind a mask ({type(model).__name__} has no padding-free attention); set data.packing: false")
    if ranks.sharded:
        shard_model(model)
        params = trainable_tensors(method, objective, model)  # now the ranks' shards
    epoch_steps = steps_per_epoch(len(data.train), tcfg.batch_size * tcfg.grad_accum * ranks.world)
    total_steps = tcfg.max_steps or math.ceil((tcfg.epochs or 1.0) * epoch_steps)
    run = Run(
        config=config,
        model=model,
        tokenizer=tokenizer,
        method=method,
        objective=objective,
        data=data,
        layout=BatchLayout(dcfg.max_length, dcfg.packing, tokenizer.pad_token_id, padding_free, share_prefixes=padding_free and method.shares_prefixes),
        device=device,
        total_steps=total_steps,
        warmup=warmup_steps(tcfg.warmup, total_steps),
        epoch_steps=epoch_steps,
        tokens_per_forward=resolve_tokens_per_forward(tcfg.max_tokens_per_forward, device),
        params=params,
        rollouts=Rollouts() if objective.samples_completions else None,
        quantized=quantized,
        ranks=ranks,
    )
    return run, replaced


def restore_or_prepare(run: Run, output: Path, resume: bool, replaced: list[str]) -> tuple[Path | None, TrainState]:
    """Write the run's config, then either restore the newest checkpoint (`--resume`) or prepare a
    fresh run (peft weights to start from, the method's choice from training data); build the optimizer."""
    config, tcfg, model, method, ranks = run.config, run.config.train, run.model, run.method, run.ranks
    if ranks.is_writer:
        _init_output(output, config, replaced)
    ranks.barrier("preparing the output directory")
    state = TrainState(step=0, tokens_seen=0, train_seconds=0.0)
    checkpoint = ranks.broadcast(newest_intact_checkpoint(output / "checkpoints") if resume and ranks.is_writer else None)
    if checkpoint is None and method.prepare_steps:
        # A choice made from training data (LoFiT's heads, SubTuning's layers), on a fresh run only:
        # the method's state holds it for resume and load_run. Its forwards leave the RNG as it was.
        prepare_started = time.perf_counter()
        with torch.random.fork_rng():
            batches = [
                run.layout.batch(group).to(run.device)
                for step in range(1, method.prepare_steps + 1)
                for samples in run.micro_batches(step)
                for group in split_by_tokens(run.objective.language_model_samples(samples), run.tokens_per_forward)
            ]
            method.prepare(model, batches, causal_lm_loss)
        state.prepare_seconds = time.perf_counter() - prepare_started
        run.params = trainable_tensors(method, run.objective, model)
    if tcfg.proximal_mu:  # FedProx's anchor w0: the trainable tensors now (a checkpoint restores its own)
        run.anchor = {name: p.detach().clone() for name, p in run.params.items()}
    reference_started = time.perf_counter()
    run.reference, run.reference_logps_computed = set_up_reference(run, output, resumed=checkpoint is not None)
    state.prepare_seconds += time.perf_counter() - reference_started if run.reference_logps_computed else 0.0
    run.optimizer = build_optimizer(tcfg, model, param_groups(run))
    if checkpoint is not None:
        # The method's init above drew from the RNG; the checkpoint restores the RNG to its saved point.
        state, trainable = load_checkpoint(checkpoint, run.optimizer, ranks, model)
        if trainable is not None:  # else (fsdp) the shards are already in the model
            own = {name.removeprefix(OBJECTIVE_PREFIX): t for name, t in trainable.items() if name.startswith(OBJECTIVE_PREFIX)}
            run.objective.load_state_dict(own)
            if run.anchor is not None:
                run.anchor = {name.removeprefix(ANCHOR_PREFIX): t for name, t in trainable.items() if name.startswith(ANCHOR_PREFIX)}
            method_state = {n: t for n, t in trainable.items() if not n.startswith((OBJECTIVE_PREFIX, ANCHOR_PREFIX))}
            method.load_checkpoint_state(model, method_state, source=str(checkpoint))
        if method.prepare_steps:
            # The state holds prepare's choice, which may train other tensors than attach's placeholder
            # (SubTuning's layers, all of one shape): move the restored optimizer state onto them.
            run.params = trainable_tensors(method, run.objective, model)
            restored = run.optimizer.state_dict()
            run.optimizer = build_optimizer(tcfg, model, param_groups(run))
            run.optimizer.load_state_dict(restored)
        if run.rollouts is not None:
            run.rollouts.restore(state.rollout)
        console.print(f"Resuming from {checkpoint} (step {state.step} of {run.total_steps})")
    return checkpoint, state


def load_teacher(name: str, dtype: str, student_config, student_tokenizer):
    """A frozen teacher for distillation, in `dtype`: a tunelab run directory (its trained model), a
    peft adapter directory (on the base it names, else the student's), or a model (alias | local
    dir | hub id). An adapter is merged into its base where the method can be; the teacher's
    vocabulary must be the student's."""
    if (Path(name) / "config.yaml").is_file():
        loaded = load_run(name, dtype=dtype)
        teacher, tokenizer, method = loaded.model, loaded.tokenizer, loaded.method
    elif (Path(name) / PEFT_CONFIG_FILE).is_file():
        base = read_peft_config(name).get("base_model_name_or_path") or student_config.name
        teacher, tokenizer, method = load_peft_model(name, student_config.model_copy(update={"name": base, "dtype": dtype}))
    else:
        teacher, tokenizer = load_model(student_config.model_copy(update={"name": name, "dtype": dtype}))
        method = None
    if tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise TunelabError(
            f"objective.teacher {name} has another vocabulary ({len(tokenizer)} tokens) than the student {student_config.name} ({len(student_tokenizer)}): distillation compares their distributions token by token"
        )
    if method is not None:
        with contextlib.suppress(TunelabError):  # merged: one matmul per layer; a method that cannot merge runs as it is
            method.merge(teacher)
    teacher.requires_grad_(False)
    return teacher.eval()


def set_up_reference(run: Run, output: Path, resumed: bool) -> tuple[object, int]:
    """The reference policy of an objective that has one (objectives/reference.py), before step 1,
    and how many reference log-probabilities were computed for it now. Precomputed ones are kept
    with the run; a resumed run reads them back."""
    if not run.objective.needs_reference:
        return None, 0
    options = run.config.objective
    if resumed and (output / PRECOMPUTED_FILE).is_file():
        return load_precomputed(output), 0

    def load_reference_model(name: str):
        return load_model(run.config.model.model_copy(update={"name": name}))[0]

    starts_trained = bool(run.config.method.from_peft or run.config.train.init_weights)
    live, precompute_now = choose_reference(options, run.method, run.model, load_reference_model, starts_trained=starts_trained)
    if run.layout.share_prefixes and not uses_packed_attention(live.model):
        # A model without tunelab's packed attention cannot read shared prompts: lay pairs out whole.
        run.layout = replace(run.layout, share_prefixes=False)
    if not precompute_now:
        console.print(f"reference policy: {live.kind}")
        return live, 0
    if run.objective.samples_completions:
        raise TunelabError(
            f"objective '{run.objective.name}' compares completions sampled during training with its reference, so the "
            f"reference must run live; method '{run.method.name}' switched off is not its initial policy: name a model "
            "in objective.reference, or set objective.beta: 0"
        )
    batches = {"train": (batch for step in range(1, run.total_steps + 1) for batch in run.forward_batches(run.micro_batches(step)))}
    if run.data.eval is not None:
        batches["eval"] = eval_batches(run.objective, run.data.eval, run.config.train.batch_size, run.layout)
    with console.status(f"reference policy ({live.kind}): computing its log-probabilities once"):
        reference = precompute(live, batches, run.device)
    if run.ranks.is_writer:
        save_precomputed(reference, output)
    computed = sum(len(table) for table in reference.tables.values())
    console.print(f"reference policy: {live.kind}, precomputed for {computed} sequences")
    return reference, computed


def train_step(run: Run, step: int) -> dict:
    """One optimizer step; returns its metrics record."""
    tcfg, model, objective, ranks = run.config.train, run.model, run.objective, run.ranks
    step_started = time.perf_counter()
    # This step's learning rate (each group may scale it: LoRA+).
    lr = lr_at(step, run.total_steps, tcfg.lr, tcfg.scheduler, run.warmup)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]

    # Forward and backward, batch by batch. Each loss term is divided by its unit's count over the
    # whole accumulated step (on all ranks), not per batch: then batch 8 x accum 1, batch 1 x
    # accum 8 and 2 ranks x batch 4 agree.
    micro_batches, sampling = run.step_samples(step)
    batches = run.forward_batches(ranks.share(micro_batches))
    totals = StepTotals()
    for batch in batches:
        totals.add_counts(batch.counts)
    counted = ranks.gather((totals.counts, len(batches)))  # every rank's, for the whole step's counts
    for rank, (counts, _) in enumerate(counted):
        if rank != ranks.rank:
            totals.add_counts(counts)
    loss_sum = 0.0
    for batch in batches:
        output = objective.output(model, batch.to(run.device), run.reference)
        loss = step_loss(output, totals.counts)
        loss.backward()
        loss_sum += loss.item()
        totals.add(output)
    if ranks.sharded:
        # FSDP's collectives run inside forward and backward: a rank with fewer forwards than
        # another runs forwards of weight zero until they match.
        missing = max(n for _, n in counted) - len(batches)
        if missing:
            filler = batches[-1] if batches else run.forward_batches([next(samples for samples in micro_batches if samples)[:1]])[0]
            for _ in range(missing):
                (step_loss(objective.output(model, filler.to(run.device), run.reference), totals.counts) * 0.0).backward()

    # The method's own loss term (AdaLoRA's orthogonality), once per step (on rank 0: the ranks' gradients add up).
    regularization = run.method.regularization(model) if ranks.is_writer else None
    if regularization is not None:
        regularization.backward()
        loss_sum += regularization.item()
    # FedProx's proximal term mu/2 * ||w - w0||^2 (train.proximal_mu), once per step too; logged
    # apart from the loss, so that losses compare with and without it.
    proximal = {}
    if run.anchor is not None and ranks.is_writer:
        term = tcfg.proximal_mu / 2 * sum((p - run.anchor[name]).pow(2).sum() for name, p in run.params.items())
        term.backward()
        proximal = {"proximal": term.item()}
    tokens = sum(b.n_tokens for b in batches)
    if ranks.world > 1:  # the step's loss, metrics and tokens are sums over all ranks' forwards
        summed = ranks.gather((loss_sum, totals.sums_share(), tokens))
        loss_sum, tokens = sum(loss for loss, _, _ in summed), sum(n for _, _, n in summed)
        for rank, (_, share, _) in enumerate(summed):
            if rank != ranks.rank:
                totals.add_sums(share)
    ranks.sum_gradients(list(run.params.values()))

    # Clip, stop on a non-finite loss or gradient (the last checkpoint stays good), step.
    grad_norm = float(whole(torch.nn.utils.clip_grad_norm_(run.params.values(), tcfg.max_grad_norm or float("inf"))))
    if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
        raise TrainingDiverged(f"training diverged at step {step}: loss={loss_sum}, grad_norm={grad_norm}; try a lower train.lr")
    run.optimizer.step()
    run.method.after_step(model, step, run.total_steps)
    run.optimizer.zero_grad(set_to_none=True)

    seconds = time.perf_counter() - step_started
    figures = {key: value for key, value in totals.figures(objective).items() if key != "loss"}
    return {
        "step": step,
        "loss": loss_sum,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": tokens,
        **totals.counts,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        **sampling,
        **figures,
        **proximal,
    }


# Checkpoint names of the objective's own tensors (a reward head), apart from the method's.
OBJECTIVE_PREFIX = "objective."
# Checkpoint names of train.proximal_mu's anchor (the trainable tensors as the run started).
ANCHOR_PREFIX = "proximal_anchor."


def trainable_tensors(method, objective, model) -> dict[str, torch.nn.Parameter]:
    """What the optimizer trains: the method's tensors and the objective's own."""
    own = {OBJECTIVE_PREFIX + name: p for name, p in objective.trainable_parameters().items()}
    return {**method.trainable_parameters(model), **own}


def param_groups(run: Run) -> list[dict]:
    groups = run.method.param_groups(run.model)
    own = list(run.objective.trainable_parameters().values())
    return groups + [{"params": own, "lr_scale": 1.0}] if own else groups


def checkpoint_tensors(run: Run) -> dict[str, torch.Tensor]:
    own = {OBJECTIVE_PREFIX + name: t for name, t in run.objective.state_dict().items()}
    anchor = {ANCHOR_PREFIX + name: t for name, t in (run.anchor or {}).items()}
    return {**run.method.checkpoint_state(run.model), **own, **anchor}


def load_init_weights(method, model, config: RunConfig) -> None:
    """train.init_weights: the method's tensors loaded over its initialization, before anything is written."""
    path = config.train.init_weights
    if config.method.from_peft:
        raise TunelabError(f"train.init_weights {path} and method.from_peft {config.method.from_peft}: give one set of weights to start from")
    if method.prepare_steps:
        raise TunelabError(f"train.init_weights: method '{method.name}' chooses what it trains from the data of a fresh run (prepare), which would replace the given weights")
    try:
        weights = read_safetensors(path)
    except TunelabError as err:
        raise TunelabError(f"train.init_weights: {err}") from None
    method.load_state_dict(model, weights, source=f"train.init_weights {path}")


def build_optimizer(tcfg, model, groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW, or GaLore's AdamW (train/galore.py) with the targeted matrices' gradients projected."""
    adam = {"lr": tcfg.lr, "betas": tcfg.adam_betas, "eps": tcfg.adam_eps, "weight_decay": tcfg.weight_decay}
    if tcfg.optimizer == "galore":
        groups = galore_param_groups(model, groups, tcfg.galore_target, tcfg.galore_rank, tcfg.galore_update_every, tcfg.galore_scale)
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
        check_run_format(output)
        _check_resumable(output / "config.yaml", config)
        return []
    if existing and not resume and not overwrite:
        raise TunelabError(f"output {output} already holds a run ({', '.join(existing)}); pass --resume to continue it or --overwrite to start over")
    return existing if overwrite and not resume else []


def _init_output(output: Path, config: RunConfig, replaced: list[str]) -> None:
    for name in replaced:
        path = output / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    output.mkdir(parents=True, exist_ok=True)
    remove_leftovers(output)
    remove_leftovers(output / "checkpoints")
    write_run_file(output)
    dump_config(config, output / "config.yaml")


def config_changes(saved_path: Path, config: RunConfig, ignored: frozenset[str] = frozenset()) -> list[str]:
    """The dotted keys where `config` differs from a run's saved config.yaml, except those that
    may change on resume (checkpoint and logging cadence) and `ignored`."""
    return changed_keys(load_config(saved_path).to_dict(), config.to_dict(), ignored | {f"train.{key}" for key in RESUMABLE_CHANGES})


def _check_resumable(saved_path: Path, config: RunConfig) -> None:
    changed = config_changes(saved_path, config, frozenset({"output"}))  # a run directory moved elsewhere resumes
    if changed:
        raise TunelabError(f"--resume: the config differs from the run's saved config.yaml at {', '.join(changed)}")


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
        if s.split:
            notes.append(f"{s.split} longer than data.max_length split into pieces")
        if s.dropped_no_target:
            notes.append(f"{s.dropped_no_target} dropped with no target token left")
        console.print(f"data {split}: " + ", ".join(notes))
        if s.identical_pairs:
            console.print(f"[yellow]warning:[/] data {split}: {s.identical_pairs} rows have chosen identical to rejected (they add nothing to learn)")
