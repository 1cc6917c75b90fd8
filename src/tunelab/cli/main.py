"""The `tunelab` command line. Each command is a thin layer over the Python API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from tunelab.console import console
from tunelab.errors import RankLost, RunStopped, TunelabError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Adapt Hugging Face causal LMs: train, evaluate, export.")


def _run(action):
    """Run a command body; bad inputs end in one clear message and exit code 1, not a traceback."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # tunelab shows its own progress
    hf_logging.set_verbosity_error()
    try:
        return action()
    except TunelabError as err:
        if isinstance(err, RankLost):  # every rank of a multi-process run says which peer it lost
            console.quiet = False
        # soft_wrap: no line breaks inserted at the console width, so a long path or file:line
        # stays whole (and greppable) in logs and pipes.
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except OSError as err:
        # The file system refused (disk full, read-only, permissions, a file gone mid-read): the
        # same one line, naming the path; what a command writes is atomic, so nothing is half-written.
        where = " -> ".join(str(name) for name in (err.filename, err.filename2) if name)
        console.print(f"[bold red]error:[/] {escape(where + ': ' if where else '')}{escape(str(err.strerror or err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except RunStopped as stopped:  # SIGINT/SIGTERM in training: a checkpoint was written first
        console.print(f"[yellow]stopped:[/] {escape(str(stopped))}", highlight=False, soft_wrap=True)
        raise typer.Exit(stopped.exit_code) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


@app.command("train")
def train_command(
    config: Path = typer.Argument(..., help="run config (YAML)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. train.lr=1e-4"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in the output dir"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a finished or failed run in the output dir"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="train in N processes on this machine (launches torchrun; train.distributed picks ddp or fsdp)"),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", help="train on a Ray cluster through Ray Train: auto, local (a new local cluster), host:port or ray://host:port"
    ),
    ray_workers: int = typer.Option(2, "--ray-workers", min=1, help="with --ray-address: how many Ray Train workers (ranks)"),
):
    """Fine-tune a model as CONFIG says; writes checkpoints, metrics.jsonl, the weights and report.json."""

    def action():
        from tunelab import load_config

        run_config = load_config(config, overrides)  # a bad config stops here, before any process starts
        flags = ["--resume"] * resume + ["--overwrite"] * overwrite
        if nproc > 1 and ray_address:
            raise TunelabError("give --nproc or --ray-address, not both")
        if nproc > 1:
            from tunelab.train.launch import launch_processes

            raise typer.Exit(launch_processes(nproc, ["train", str(config), *(overrides or []), *flags]))
        if ray_address:
            from tunelab.train.ray_launch import train_on_ray

            result = train_on_ray(run_config, ray_address, ray_workers, resume=resume, overwrite=overwrite)
        else:
            from tunelab.train import train

            result = train(run_config, resume=resume, overwrite=overwrite)
        r = result.report
        console.print(
            f"[bold green]done[/]: final loss {r['final_train_loss']:.4f}"
            + (f", eval loss {r['eval_loss']:.4f}" if "eval_loss" in r else "")
            + f", {r['tokens_per_s']:.0f} tok/s -> {result.output_dir}"
        )

    _run(action)


@app.command("eval")
def eval_command(
    target: Path = typer.Argument(..., help="a run directory or a config file; with --task also a peft adapter directory or a model"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides (of the task, with --task)"),
    task: Optional[str] = typer.Option(None, help="a task YAML or a built-in task: gsm8k, sst2, humaneval, humaneval-chat, quickstart"),
    data: Optional[Path] = typer.Option(None, help="the task's data file (gsm8k and sst2 need one)"),
    model: Optional[str] = typer.Option(None, help="with --task and a peft adapter: its base model (default: the adapter's)"),
    base: bool = typer.Option(True, "--base/--no-base", help="also score the base model (run directories, without --task)"),
    max_samples: Optional[int] = typer.Option(None, help="score only the first N samples"),
    max_new_tokens: Optional[int] = typer.Option(None, help="generation length limit (default: the task's, or 128)"),
    out: Optional[Path] = typer.Option(None, help="where eval.json goes"),
):
    """Score a model on a task (--task), or a run's eval split: loss and generation scores."""

    def action():
        if task is not None:
            from tunelab.eval.harness import evaluate_task
            from tunelab.eval.tasks import load_task

            limits = {k: v for k, v in {"max_samples": max_samples, "max_new_tokens": max_new_tokens}.items() if v is not None}
            chosen = load_task(task, data, [*(overrides or []), *(f"{k}={v}" for k, v in limits.items())])
            results = evaluate_task(target, chosen, out=out, base_model=model)
            results.pop("task_config")
        else:
            from tunelab.eval import evaluate

            results = evaluate(target, overrides, base=base, max_samples=max_samples, max_new_tokens=max_new_tokens or 128, out=out)
        print(json.dumps(results, indent=2))

    _run(action)


@app.command("compare")
def compare_command(
    sweep_file: Path = typer.Argument(..., help="a sweep YAML: base config, task, grid of methods, seeds"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides of the sweep"),
    backend: str = typer.Option("sequential", help="sequential | process | ray"),
    workers: int = typer.Option(2, help="worker processes (--backend process)"),
    ray_address: Optional[str] = typer.Option(None, help="a Ray cluster to join (--backend ray; default: start one here)"),
    ray_cpus_per_cell: float = typer.Option(1, help="CPUs each cell holds on Ray (its torch threads)"),
    ray_gpus_per_cell: float = typer.Option(0, help="GPUs each cell holds on Ray (0: it trains on CPU)"),
):
    """Train every cell of a sweep under one budget, score each on the task, write the leaderboard."""

    def action():
        from rich.markup import escape

        from tunelab.compare import compare

        rows = compare(sweep_file, overrides, backend, workers, ray_address, ray_cpus_per_cell, ray_gpus_per_cell)
        for row in rows:
            rank = "-" if row["rank"] is None else row["rank"]
            console.print(f"{rank:>3}  {escape(row['cell']):<32} {row['score_mean']:.4f} ± {row['score_std']:.4f}  {row['trainable_params']:,} params")

    _run(action)


@app.command("federate")
def federate_command(
    fed_file: Path = typer.Argument(..., help="a federation YAML: base run config, clients, rounds, aggregator, task"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides of the federation, e.g. rounds=10"),
    resume: bool = typer.Option(False, "--resume", help="continue the federation in its output directory (finished rounds are kept)"),
    backend: str = typer.Option("sequential", help="sequential | process | ray: where a round's clients train"),
    workers: int = typer.Option(2, help="worker processes (--backend process)"),
    ray_address: Optional[str] = typer.Option(None, help="a Ray cluster to join (--backend ray; default: start one here)"),
    ray_cpus_per_client: float = typer.Option(1, help="CPUs each client holds on Ray (its torch threads)"),
    ray_gpus_per_client: float = typer.Option(0, help="GPUs each client holds on Ray (0: it trains on CPU)"),
):
    """Federated fine-tuning: rounds of client training from the global model, aggregated (fedavg, flora, fedprox) and scored."""

    def action():
        from tunelab.federated import federate

        report = federate(fed_file, overrides, resume, backend, workers, ray_address, ray_cpus_per_client, ray_gpus_per_client)
        for rnd, score in report["scores"]:
            console.print(f"round {rnd:>3}  {report['metric']} {score:.4f}")
        console.print(
            f"[bold green]done[/]: {report['aggregator']}, {report['rounds']} rounds, final {report['metric']} {report['final_score']:.4f}, "
            f"clients sent {report['bytes_sent'] / 1e6:.1f} MB -> {report['global_model']}"
        )

    _run(action)


@app.command("generate")
def generate_command(
    run_dir: Path = typer.Argument(..., help="a run directory"),
    prompt: str = typer.Argument(..., help="the user message"),
    base: bool = typer.Option(False, "--base", help="use the run's base model instead of the fine-tuned one"),
    system: Optional[str] = typer.Option(None, help="a system message"),
    raw: bool = typer.Option(False, "--raw", help="send PROMPT as plain text, without the chat template"),
    max_new_tokens: int = typer.Option(256),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples"),
    top_p: float = typer.Option(1.0),
    seed: int = typer.Option(0),
):
    """Generate a reply from a fine-tuned run (or its base model)."""

    def action():
        from tunelab.config import load_config
        from tunelab.generation import generate
        from tunelab.models.loader import load_model
        from tunelab.runs import load_run

        if max_new_tokens < 1:
            raise TunelabError(f"--max-new-tokens {max_new_tokens}: at least 1")
        if temperature < 0:
            raise TunelabError(f"--temperature {temperature}: 0 (greedy) or more")
        if not 0 < top_p <= 1:
            raise TunelabError(f"--top-p {top_p}: more than 0, at most 1")
        if base:
            model, tokenizer = load_model(load_config(run_dir / "config.yaml").model)
        else:
            loaded = load_run(run_dir)
            model, tokenizer = loaded.model, loaded.tokenizer
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        request = prompt if raw else messages
        reply = generate(model, tokenizer, [request], max_new_tokens, temperature, top_p, seed=seed)[0]
        print(reply)

    _run(action)


@app.command("export")
def export_command(
    run_dir: str = typer.Argument(..., help="a run directory (for --format gguf also a model: alias, HF directory, hub id)"),
    format: str = typer.Option(..., "--format", help="peft | merged | gguf | gguf-adapter"),
    out: Path = typer.Option(..., "--out", help="the directory to write (gguf, gguf-adapter: the .gguf file)"),
    gguf_type: str = typer.Option("f16", "--gguf-type", help="--format gguf: f32 | f16 | bf16 | q8_0 | q4_0 (norms stay f32); a gguf-adapter is written in f32"),
):
    """Export a run as a peft adapter, merged full weights, or GGUF for llama.cpp (merged model or LoRA adapter)."""

    def action():
        from tunelab.export import export_run

        console.print(f"exported -> {export_run(run_dir, format, out, gguf_type)}")

    _run(action)


@app.command("merge")
def merge_command(
    config: Path = typer.Argument(..., help="a merge config (YAML, mergekit's shape: merge_method, base_model, models, parameters)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. parameters.lambda=0.8"),
    out: Path = typer.Option(..., "--out", help="the directory to write: a merged checkpoint (output: model) or a peft LoRA adapter (output: lora)"),
):
    """Merge fine-tunings of one base (run directories, peft adapters, checkpoints) without training:
    linear, task_arithmetic, ties, dare_ties, dare_linear, slerp, magnitude_prune."""

    def action():
        from tunelab.merging import merge

        console.print(f"merged -> {merge(config, out, overrides)}")

    _run(action)


@app.command("serve")
def serve_command(
    adapters: Optional[list[str]] = typer.Argument(None, help="NAME=RUN_DIR_OR_PEFT_ADAPTER, one per adapter served"),
    model: str = typer.Option(..., "--model", help="the base model: alias, directory, hub id or .gguf"),
    host: str = typer.Option("127.0.0.1", help="the address to bind (loopback by default)"),
    port: int = typer.Option(8000, help="the port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TUNELAB_API_KEY", help="require this bearer key on /v1/*"),
    adapter_dir: Optional[Path] = typer.Option(None, "--adapter-dir", help="where /v1/load_lora_adapter may load adapters from"),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="sequences decoded together (continuous batching)"),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="sequences waiting to join the batch before 429"),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", min=1, help="context length (default: the model's)"),
    dtype: str = typer.Option("auto", "--dtype", help="the weights' dtype: auto (as model.dtype), float32, bfloat16 or float16"),
):
    """Serve the base model and LoRA adapters over an OpenAI-compatible HTTP API."""

    def action():
        from typing import get_args

        import uvicorn

        from tunelab.config.schema import ModelConfig
        from tunelab.serve.app import ServerSettings, build_engine, create_app

        dtypes = get_args(ModelConfig.model_fields["dtype"].annotation)
        if dtype not in dtypes:
            raise TunelabError(f"--dtype {dtype}: expected one of {', '.join(dtypes)}")
        named = {}
        for item in adapters or []:
            name, sep, source = item.partition("=")
            if not sep or not name or not source:
                raise TunelabError(f"adapter '{item}': expected NAME=RUN_DIR_OR_PEFT_ADAPTER")
            named[name] = source
        settings = ServerSettings(base_name=model, api_key=api_key, adapter_dir=adapter_dir, max_batch=max_batch, max_queue=max_queue, max_model_len=max_model_len, dtype=dtype)
        engine = build_engine(settings, named)
        console.print(f"serving {', '.join(engine.model_names())} at http://{host}:{port}/v1 (playground: http://{host}:{port}/)")
        uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="warning")

    _run(action)


@app.command("import")
def import_command(
    peft_dir: Path = typer.Argument(..., help="a peft adapter directory (adapter_config.json + adapter_model.safetensors)"),
    output: Path = typer.Option(..., "--output", help="the run directory to write"),
    model: Optional[str] = typer.Option(None, help="base model (default: the adapter's base_model_name_or_path)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace what --output holds"),
):
    """Turn a peft adapter into a tunelab run directory (for eval, generate, export, further training)."""

    def action():
        from tunelab.export import import_peft

        console.print(f"imported -> {import_peft(peft_dir, output, model=model, overwrite=overwrite)}")

    _run(action)


@app.command("methods")
def methods_command(
    model: str = typer.Option("smollm2-135m-instruct", help="model alias, directory, hub id or .gguf (only its config is read)"),
    target: Optional[str] = typer.Option(None, help="linear layers for methods that wrap them: all-linear or comma-separated names"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
):
    """Every method, with its trainable parameters (count and % of the model) at default options."""

    def action():
        from rich.table import Table

        from tunelab.methods.catalog import method_rows

        targets = None if target is None else (target if target == "all-linear" else [t.strip() for t in target.split(",")])
        rows = method_rows(model, targets)
        if as_json:
            print(json.dumps([{"method": r.name, "trainable_params": r.trainable, "percent": r.percent, "total_params": r.total} for r in rows], indent=2))
            return
        table = Table(title=f"methods on {model}" + (f" (target: {target})" if target else ""))
        for column, justify in (("method", "left"), ("trainable params", "right"), ("% of model", "right"), ("what it is", "left")):
            table.add_column(column, justify=justify)
        for r in rows:
            table.add_row(r.name, f"{r.trainable:,}", f"{r.percent:.4f}", r.summary)
        console.print(table)

    _run(action)


@app.command("quickstart")
def quickstart_command(
    out: Path = typer.Option(Path("runs/quickstart"), help="output directory"),
    model: str = typer.Option("smollm2-135m-instruct", help="model alias, directory, hub id or .gguf"),
    steps: Optional[int] = typer.Option(None, help="training steps (default: the tuned budget)"),
    objective: str = typer.Option("sft", help="sft, or a preference objective (dpo, simpo, cpo, orpo, kto, reward) on pairs of the same task"),
    quantize: str = typer.Option("none", help="model.quantize: none | nf4 (QLoRA) | int8"),
):
    """Fine-tune SmolLM2-135M-Instruct on a JSON record-extraction task and score it before/after."""

    def action():
        from tunelab.quickstart import run_quickstart

        run_quickstart(out, model=model, steps=steps, objective=objective, quantize=quantize)

    _run(action)


@app.command("bench")
def bench_command(
    model: str = typer.Option("smollm2-135m-instruct", help="model alias, directory, hub id or .gguf"),
    objective: str = typer.Option("sft", help="sft (against HF Trainer + peft) | dpo (against TRL's DPOTrainer + peft) | grpo (against TRL's GRPOTrainer + peft)"),
    data: Optional[str] = typer.Option(
        None,
        help="sft: Alpaca-format JSON (default: ../shared Alpaca demo, else synthetic); dpo: a JSON array of "
        "preference rows (default: record-extraction pairs); grpo: a JSON array of prompt rows {prompt, answer} "
        "scored by math_exact (default: arithmetic questions); 'synthetic': random-length samples",
    ),
    method: str = typer.Option("lora", help="the method both sides train (the peer side runs it through peft)"),
    steps: int = typer.Option(12, help="training steps of batch --batch-size"),
    batch_size: int = typer.Option(8, help="samples (dpo: pairs, grpo: prompts of 8 completions each) per step"),
    max_length: int = typer.Option(512, help="longest sample in tokens (longer ones are truncated)"),
    eval_samples: int = typer.Option(32, min=1, help="held-out samples (dpo: pairs) both sides take the eval loss on"),
    lr: float = typer.Option(1e-3, help="learning rate of both sides"),
    frozen_dtype: str = typer.Option("auto", help="tunelab's train.frozen_dtype: auto (bf16 on CPUs with fast bf16 matmuls) | float32"),
    quantize: str = typer.Option("none", help="model.quantize of both sides: none | nf4 (the sft peer loads the base with bitsandbytes 4-bit, QLoRA)"),
    repeats: int = typer.Option(1, help="runs per side, alternating; speed is the median"),
    long_context: bool = typer.Option(False, "--long-context", help="also find the longest sequence each side trains on (sft)"),
    memory_budget_mb: float = typer.Option(16384, help="the memory budget of --long-context, MiB"),
    out: Path = typer.Option(Path("runs/bench.json"), help="where the JSON result goes"),
):
    """Train the same samples with tunelab and with its peer; compare tokens/s, memory and losses."""

    def action():
        from typing import get_args

        from tunelab.bench import Workload, run_bench
        from tunelab.bench.runner import PEERS
        from tunelab.config import TrainConfig

        frozen_dtypes = get_args(TrainConfig.model_fields["frozen_dtype"].annotation)
        if frozen_dtype not in frozen_dtypes:
            raise TunelabError(f"bench --frozen-dtype {frozen_dtype}: expected one of {', '.join(frozen_dtypes)}")
        if method != "lora":
            raise TunelabError(f"bench --method: only 'lora' has an HF Trainer + peft counterpart here, not '{method}'")
        if objective not in PEERS:
            raise TunelabError(f"bench --objective: one of {', '.join(PEERS)}, not '{objective}'")
        if long_context and objective != "sft":
            raise TunelabError("bench --long-context: measured for --objective sft only")
        if quantize not in ("none", "nf4") or (quantize != "none" and objective != "sft"):
            raise TunelabError(f"bench --quantize: none, or nf4 with --objective sft (against bitsandbytes 4-bit), not '{quantize}' with {objective}")
        workload = Workload(
            model=model,
            objective=objective,
            data=data,
            method=method,
            steps=steps,
            batch_size=batch_size,
            max_length=max_length,
            eval_samples=eval_samples,
            lr=lr,
            frozen_dtype=frozen_dtype,
            quantize=quantize,
        )
        result = run_bench(workload, out, repeats=repeats, long_context_mb=memory_budget_mb if long_context else None)
        ours, theirs = result["tunelab"], result[PEERS[objective]]
        if "seconds_per_step" in ours:  # an objective that samples: seconds per step, sampling and update apart
            figures = (
                f"{ours['seconds_per_step']:.1f} vs {theirs['seconds_per_step']:.1f} s/step (sampling {ours['sampling_seconds_per_step']:.1f} vs "
                f"{theirs['sampling_seconds_per_step']:.1f}, update {ours['update_seconds_per_step']:.1f} vs {theirs['update_seconds_per_step']:.1f})"
            )
        else:
            figures = f"eval loss {ours['eval_loss']:.4f} vs {theirs['eval_loss']:.4f}, useful {result['tunelab_useful_gflops']:.0f} of {result['tunelab_mfu_peak_gflops']:.0f} GFLOP/s peak"
        console.print(
            f"[bold green]speedup {result['speedup']:.2f}x[/], memory ratio {result['memory_ratio']:.2f}, "
            f"step-1 loss {ours['step1_loss']:.6f} vs {theirs['step1_loss']:.6f}, {figures} -> {out}"
        )

    _run(action)


def main() -> None:  # python -m tunelab.cli.main
    app()


if __name__ == "__main__":
    sys.exit(main())
