"""`tunelab bench`: tunelab's trainer against HF Trainer + peft (SFT), TRL's DPOTrainer + peft (DPO)
or TRL's GRPOTrainer + peft (GRPO), side by side in one invocation."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from tunelab.bench.flops import matmul_peak_gflops, training_flops
from tunelab.bench.workload import (
    OBJECTIVES,
    Workload,
    default_data,
    run_config,
    write_long_text,
    write_splits,
)
from tunelab.config import load_config
from tunelab.console import console
from tunelab.data.dataset import build_datasets
from tunelab.errors import TunelabError
from tunelab.files import write_json_atomic
from tunelab.methods import build_method
from tunelab.models.loader import load_model_skeleton, load_tokenizer, local_source
from tunelab.objectives.registry import build_objective, get_objective_class
from tunelab.train.loop import planned_sample_order
from tunelab.train.precision import resolve_frozen_dtype

# The trainer tunelab is compared with, by objective, and the packages it needs.
PEERS = {"sft": "hf_peft", "dpo": "trl", "grpo": "trl_grpo"}
PEER_PACKAGES = {
    "hf_peft": ("peft", "accelerate"),
    "hf_peft_4bit": ("peft", "accelerate", "bitsandbytes"),
    "trl": ("peft", "accelerate", "trl"),
    "trl_grpo": ("peft", "accelerate", "trl"),
}


def run_bench(workload: Workload, out: Path, repeats: int = 1, long_context_mb: float | None = None) -> dict:
    peer = PEERS[workload.objective]
    side_names = ("tunelab", peer)
    _check_peers_installed(peer + ("_4bit" if workload.quantize == "nf4" else ""))
    if workload.data is None:
        workload.data = default_data(workload.objective)
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        tmp = Path(tmp)
        train_path, eval_path = write_splits(workload, tmp / "data")
        sampled = get_objective_class(OBJECTIVES[workload.objective]["name"]).samples_completions
        # GRPO's eval scores generations, which the peer has no counterpart of here: no eval split.
        config = load_config(run_config(workload, train_path, None if sampled else eval_path, tmp / "tunelab-run"))
        objective = build_objective(config.objective)
        # Done here, once, so that neither side pays for model conversion or tokenizing in its memory.
        local_source(config.model.name)
        data = build_datasets(config.data, load_tokenizer(config.model), config.train.seed, objective.rows)
        out.parent.mkdir(parents=True, exist_ok=True)  # the inputs read, and not after minutes of training
        spec = {"config": config.to_dict()}
        spec_path = tmp / "spec.json"
        spec_path.write_text(json.dumps(spec))

        console.print("measuring the matmul peak ...")
        peak = matmul_peak_gflops()
        bf16_peak = matmul_peak_gflops(dtype=torch.bfloat16)
        runs: dict[str, list[dict]] = {name: [] for name in side_names}
        # Alternate (A B, B A, ...) so that drift of the machine falls on both sides alike. The
        # tunelab side runs first: a GRPO peer trains on its completions.
        for repeat in range(repeats):
            for side in side_names if repeat % 2 == 0 else reversed(side_names):
                runs[side].append(_run_side(side, spec_path, tmp / f"{side}-{repeat}.json"))
                if side == "tunelab" and "completions" not in spec and "completions" in runs[side][-1]:
                    spec["completions"] = runs[side][-1].pop("completions")
                    spec_path.write_text(json.dumps(spec))
        for result in runs["tunelab"]:
            result.pop("completions", None)

    if sampled:
        result = sampled_result(workload, runs, peer)
        write_json_atomic(out, result)
        return result
    sequences = [_sequences(row) for row in data.train]

    seen = [sequence for i in planned_sample_order(len(sequences), config.train) for sequence in sequences[i]]
    flops = _useful_flops(config, seen, reference_forward=objective.needs_reference)
    sides = {name: _summary(results, flops) for name, results in runs.items()}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mfu_peak = bf16_peak if resolve_frozen_dtype(config.train.frozen_dtype, torch.float32, device) == torch.bfloat16 else peak
    ours, theirs = sides["tunelab"], sides[peer]
    result = {
        "workload": workload.as_dict() | {"train_tokens": ours["tokens"], "device": _device_name()},
        **sides,
        "speedup": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "memory_ratio": ours["peak_rss_mb"] / theirs["peak_rss_mb"],
        # The same init, samples and settings: the first step's losses agree to float rounding.
        "step1_loss_diff": abs(ours["step1_loss"] - theirs["step1_loss"]),
        "eval_loss_rel_diff": abs(ours["eval_loss"] - theirs["eval_loss"]) / theirs["eval_loss"],
        "matmul_peak_gflops": peak,  # fp32, the dtype both sides' activations and adapters use
        "matmul_peak_bf16_gflops": bf16_peak,  # tunelab's frozen-weight matmuls may run in bf16 (train.frozen_dtype)
        "tunelab_useful_gflops": ours["useful_gflops"],
        # Against the peak of the dtype tunelab's frozen-weight matmuls (most of its FLOPs) run in.
        "tunelab_mfu_peak_gflops": mfu_peak,
        "tunelab_mfu": ours["useful_gflops"] / mfu_peak,
    }
    if long_context_mb:
        result["long_context"] = longest_trainable(workload, long_context_mb)
    write_json_atomic(out, result)
    return result


def sampled_result(workload: Workload, runs: dict[str, list[dict]], peer: str) -> dict:
    """An objective that samples completions (GRPO): seconds per step, sampling and update apart
    (the median over repeats of each side's total), and the step-1 losses of the same completions."""

    def side(results: list[dict]) -> dict:
        steps = len(results[0]["step_seconds"])
        step = statistics.median(sum(r["step_seconds"]) for r in results) / steps
        sampling = statistics.median(sum(r["sampling_seconds"]) for r in results) / steps
        figures = {"seconds_per_step": step, "sampling_seconds_per_step": sampling, "update_seconds_per_step": step - sampling}
        figures |= {key: results[0][key] for key in ("step1_loss", "train_losses", "completion_mean_lengths")} | {"peak_rss_mb": max(r["peak_rss_mb"] for r in results)}
        if len(results) > 1:
            figures["repeats"] = [{"seconds_per_step": sum(r["step_seconds"]) / steps, "sampling_seconds": sum(r["sampling_seconds"]) / steps} for r in results]
        return figures

    ours, theirs = side(runs["tunelab"]), side(runs[peer])
    return {
        "workload": workload.as_dict() | {"device": _device_name()},
        "tunelab": ours,
        peer: theirs,
        "speedup": theirs["seconds_per_step"] / ours["seconds_per_step"],
        "sampling_speedup": theirs["sampling_seconds_per_step"] / ours["sampling_seconds_per_step"],
        "update_speedup": theirs["update_seconds_per_step"] / ours["update_seconds_per_step"],
        "memory_ratio": ours["peak_rss_mb"] / theirs["peak_rss_mb"],
        "step1_loss_diff": abs(ours["step1_loss"] - theirs["step1_loss"]),
    }


def longest_trainable(workload: Workload, budget_mb: float, start: int = 1024, limit: int = 65536, refine: int = 2) -> dict:
    """The longest single sequence each side of the SFT bench trains a step on within budget_mb:
    doubling from `start` to the first failure, then `refine` bisection steps (to 256 tokens).

    Each try is one training step on one plain-text sample, in its own process, stopped as soon
    as its resident memory passes the budget.
    """
    figures = {}
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-long-") as tmp:
        tmp = Path(tmp)

        def fits(side: str, length: int, tries: list) -> bool:
            probe = replace(workload, steps=1, batch_size=1, max_length=length)
            train_path = write_long_text(tmp / "data", n_words=length, seed=workload.seed)
            spec_path = tmp / f"{side}-{length}.json"
            spec_path.write_text(json.dumps({"config": run_config(probe, train_path, None, tmp / "run")}))
            result = _run_side(side, spec_path, tmp / f"{side}-{length}-result.json", budget_mb=budget_mb)
            tries.append({"tokens": length, "fits": result is not None, "peak_rss_mb": result and result["peak_rss_mb"]})
            return result is not None

        for side in ("tunelab", "hf_peft"):
            tries: list[dict] = []
            longest, failed, length = 0, None, start
            while length <= limit:
                if not fits(side, length, tries):
                    failed = length
                    break
                longest, length = length, length * 2
            for _ in range(refine if failed else 0):
                middle = (longest + failed) // 2 // 256 * 256
                if middle in (longest, failed):
                    break
                if fits(side, middle, tries):
                    longest = middle
                else:
                    failed = middle
            figures[side] = {"longest_tokens": longest, "tries": tries}
    return {"budget_mb": budget_mb, **figures}


def _run_side(side: str, spec_path: Path, result_path: Path, budget_mb: float | None = None) -> dict | None:
    """Run one side in a fresh process; with a memory budget, None if it went over (it is stopped)."""
    console.rule(f"[bold]{side}")
    started = time.perf_counter()
    # No telemetry from TRL's trainers (huggingface_hub reads the switch when imported).
    env = os.environ | {"HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.bench.sides", side, str(spec_path), str(result_path)], env=env)
    over_budget = False
    while proc.poll() is None:
        if budget_mb is not None and _resident_mb(proc.pid) > budget_mb:
            proc.kill()
            over_budget = True
        time.sleep(0.05)
    if budget_mb is not None and (over_budget or proc.returncode < 0):  # killed: by us or by the OOM killer
        console.print(f"{side}: over the {budget_mb:.0f} MiB budget")
        return None
    if proc.returncode != 0 or not result_path.is_file():
        raise TunelabError(f"bench: the {side} side failed (exit {proc.returncode}); its output is above")
    result = json.loads(result_path.read_text())
    eval_note = f", eval loss {result['eval_loss']:.4f}" if result["eval_loss"] is not None else ""
    console.print(f"{side}: {result['tokens_per_s']:.1f} tok/s, peak RSS {result['peak_rss_mb']:.0f} MiB{eval_note} ({time.perf_counter() - started:.0f} s in all)")
    return result


def _summary(results: list[dict], flops: float) -> dict:
    """One side over its repeats: the median speed, the largest memory."""
    summary = dict(results[0])
    summary["train_seconds"] = statistics.median(r["train_seconds"] for r in results)
    summary["tokens_per_s"] = summary["tokens"] / summary["train_seconds"]
    summary["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
    summary["useful_gflops"] = flops / summary["train_seconds"] / 1e9
    if len(results) > 1:
        summary["repeats"] = [{k: r[k] for k in ("tokens_per_s", "peak_rss_mb", "eval_loss")} for r in results]
    return summary


def _sequences(row: dict) -> list[tuple[int, int]]:
    """(tokens, target tokens) of each sequence a training row runs as: an SFT sample, or a
    preference pair's prompt + chosen and prompt + rejected."""
    if "input_ids" in row:
        return [(len(row["input_ids"]), sum(row["target_mask"][1:]))]
    return [(len(row["prompt_ids"]) + len(row[key]), len(row[key])) for key in ("chosen_ids", "rejected_ids")]


def _useful_flops(config, sequences: list[tuple[int, int]], reference_forward: bool) -> float:
    """FLOPs of the sequences seen in training (and of the reference policy's forward over them),
    counted on a weightless copy of the model."""
    model = load_model_skeleton(config.model)
    with torch.device("meta"):
        build_method(config.method).attach(model)
    flops = training_flops(model, sequences)
    if reference_forward:  # the base with the adapter off, forward only
        flops += training_flops(load_model_skeleton(config.model), sequences, backward=False)
    return flops


def _resident_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone already, or not Linux
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0.0)


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _check_peers_installed(peer: str) -> None:
    missing = [name for name in PEER_PACKAGES[peer] if importlib.util.find_spec(name) is None]
    if missing:
        raise TunelabError(f"bench: the {peer.removesuffix('_4bit')} side needs {', '.join(missing)}: pip install {' '.join(missing)}")
