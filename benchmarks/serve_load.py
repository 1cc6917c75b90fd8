"""Load on `tunelab serve` from concurrent OpenAI clients: throughput, latency, time to first token.

Compared with the same requests served one at a time, and with `transformers serve` on the base model.

Clients are the official `openai` package (AsyncOpenAI, streaming with usage) over loopback. Each
server is a subprocess, started, warmed up, loaded at each concurrency level in turn, then stopped:

- tunelab (batched): the base and 3 LoRA adapters, requests round-robin over the four models;
- tunelab (one at a time): the same server and requests with --max-batch 1, the baseline;
- tunelab (base only) and the peer, `transformers serve` (continuous batching, falling back to its
  default if that fails): the base model alone, the same prompts, for the tunelab/peer ratio.

    python benchmarks/serve_load.py                                     # ~13 min on 2 CPU cores
    python benchmarks/serve_load.py --requests 8 --out runs/serve-load-quick.json   # ~5 min
    python benchmarks/serve_load.py --adapter a=runs/x/run --adapter b=... --adapter c=...

Without --adapter, 3 tiny LoRA adapters are trained once (a few steps each on the quickstart's
record task) and cached under --adapter-cache. The server's memory (RSS of the process and its
children) is sampled at idle before the load, during it (peak) and at idle after it. Prints a table
and the ratios, writes --out (JSON). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openai
import psutil
import transformers

import tunelab
from tunelab.data import records_task
from tunelab.models.loader import SMOLLM2, local_source

# Short, varied instructions whose answers mostly run past 64 tokens, so most requests generate
# max_tokens on every server and the servers' throughputs count the same work.
PROMPTS = [
    "Explain how a rainbow forms.",
    "Write a short story about a lighthouse keeper.",
    "List ten uses for a paperclip and explain each briefly.",
    "Describe the water cycle step by step.",
    "What are the benefits of regular exercise? Answer in detail.",
    "Write a poem about the ocean at night.",
    "Explain the difference between a virus and a bacterium.",
    "Give step-by-step instructions for baking bread.",
    "Describe a typical day in the life of a honeybee.",
    "Explain why the sky is blue to a ten-year-old.",
    "Write a letter to a friend about a recent trip to the mountains.",
    "What is photosynthesis? Explain the process in detail.",
    "Describe how a computer stores information.",
    "Write a short dialogue between a cat and a dog.",
    "Explain how vaccines train the immune system.",
    "Summarize the main causes of climate change.",
    "Describe your ideal garden and what you would grow in it.",
    "Explain how an airplane stays in the air.",
    "Write a recipe for a vegetable soup with all the steps.",
    "What makes a good teacher? Give several reasons.",
    "Describe the life cycle of a butterfly.",
    "Explain what a budget is and how to make one.",
    "Write a short fairy tale about a clever fox.",
    "How do volcanoes erupt? Explain the process.",
    "Give advice to someone starting their first job.",
    "Explain how the moon causes tides.",
    "Describe a busy city market in the morning.",
    "List the planets of the solar system and describe each one.",
    "Explain how to plant and care for a tree.",
    "Write a motivational speech for a sports team.",
    "Describe how recycling works, from the bin to a new product.",
    "Explain the rules of chess to a beginner.",
]

TARGET_RATIO_AT_16 = 4.0  # the issue's contract: batched >= 4x one at a time at concurrency 16


# -- adapters ----------------------------------------------------------------------------------------


def trained_adapters(model: str, cache: Path, count: int = 3, steps: int = 3) -> dict[str, Path]:
    """`count` tiny LoRA runs of `model` (different data seeds), trained once: a run whose adapter
    file exists is reused. They only need to be real LoRA weights of the right shapes."""
    adapters = {}
    for index in range(count):
        name, run_dir = f"adapter-{index}", cache / f"adapter-{index}"
        adapters[name] = run_dir
        if (run_dir / "adapter" / "adapter.safetensors").is_file():
            continue
        train_rows, _ = records_task.make_splits(steps * 4, 0, seed=index)
        data_file = cache / f"train-{index}.jsonl"
        data_file.parent.mkdir(parents=True, exist_ok=True)
        data_file.write_text("".join(json.dumps(row) + "\n" for row in train_rows))
        config = {
            "model": {"name": model},
            "data": {"train": str(data_file), "max_length": 256},
            "method": {"name": "lora", "r": 8, "alpha": 16, "target": "all-linear"},
            "train": {"max_steps": steps, "batch_size": 4, "lr": 2e-3, "warmup": 0, "save_every": 0, "eval_every": 0, "seed": index},
            "output": str(run_dir),
        }
        print(f"training {name} ({steps} steps) -> {run_dir}", flush=True)
        tunelab.train(config, overwrite=True)
    return adapters


# -- servers -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_tree(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:  # the server exited: its failure shows in the requests' errors
        return []


def tree_rss_mib(process: psutil.Process) -> float:
    """RSS of the server and its children (transformers serve runs its model in a child process)."""
    total = 0
    for member in process_tree(process):
        try:
            total += member.memory_info().rss
        except psutil.Error:  # a child that just exited
            pass
    return total / 2**20


def tree_cpu_seconds(process: psutil.Process) -> float:
    total = 0.0
    for member in process_tree(process):
        try:
            times = member.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


class PeakSampler:
    """Samples the server tree's RSS in a thread while a load runs; `peak` is the highest seen."""

    def __init__(self, process: psutil.Process, every: float = 0.05):
        self.process, self.every, self.peak = process, every, 0.0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stopping.is_set():
            self.peak = max(self.peak, tree_rss_mib(self.process))
            self.stopping.wait(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join()


class ServerFailed(Exception):
    pass


@dataclass
class Server:
    """A server subprocess (its own session, so stopping it stops its children too) and its log."""

    label: str
    argv: list[str]
    port: int
    log_path: Path
    popen: subprocess.Popen | None = None
    startup_seconds: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # HF_HUB_OFFLINE: the peer loads a local directory and must not reach for the Hub.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
        started = time.perf_counter()
        with self.log_path.open("w") as log:
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while time.perf_counter() - started < timeout:
            if self.popen.poll() is not None:
                raise ServerFailed(f"{self.label} exited with code {self.popen.returncode} before /health answered:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as response:
                    if response.status == 200:
                        self.startup_seconds = time.perf_counter() - started
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise ServerFailed(f"{self.label}: /health did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        os.killpg(self.popen.pid, 15)  # the session we started: the server and its children
        try:
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, 9)
            self.popen.wait()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.is_file() else ""


# -- the load ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    model: str
    seconds: float = 0.0
    ttft: float | None = None  # to the first chunk with text
    completion_tokens: int = 0
    error: str | None = None


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> Outcome:
    outcome, started = Outcome(model), time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = None
        async for chunk in stream:
            if outcome.ttft is None and chunk.choices and chunk.choices[0].delta.content:
                outcome.ttft = time.perf_counter() - started
            usage = chunk.usage or usage
        if usage is None:
            raise RuntimeError("the stream ended without a usage chunk")
        outcome.completion_tokens = usage.completion_tokens
    except Exception as err:  # noqa: BLE001  (every failure is counted and reported, none stops the load)
        outcome.error = f"{type(err).__name__}: {err}"[:500]
    outcome.seconds = time.perf_counter() - started
    return outcome


async def run_load(base_url: str, requests: list[tuple[str, str]], concurrency: int, max_tokens: int) -> tuple[list[Outcome], float]:
    """`concurrency` clients, each sending its next request as soon as its last one finished
    (closed loop), until the list is done. Returns the outcomes and the wall seconds."""
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=600)
    pending = list(enumerate(requests))
    outcomes: list[Outcome | None] = [None] * len(requests)

    async def client_loop():
        while pending:
            index, (model, prompt) = pending.pop(0)
            outcomes[index] = await one_request(client, model, prompt, max_tokens)

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    await client.close()
    return outcomes, wall


def summarize(outcomes: list[Outcome], wall: float) -> dict:
    done = [o for o in outcomes if o.error is None]
    latencies = [o.seconds for o in done]
    ttfts = [o.ttft for o in done if o.ttft is not None]
    tokens = sum(o.completion_tokens for o in done)

    def pct(values, q):
        return float(np.percentile(values, q)) if values else None

    return {
        "requests": len(outcomes),
        "errors": len(outcomes) - len(done),
        "error_messages": sorted({o.error for o in outcomes if o.error})[:5],
        "wall_seconds": wall,
        "output_tokens": tokens,
        "mean_output_tokens": tokens / len(done) if done else None,
        "output_tokens_per_s": tokens / wall if wall > 0 else None,
        "latency_p50_s": pct(latencies, 50),
        "latency_p99_s": pct(latencies, 99),
        "ttft_p50_s": pct(ttfts, 50),
        "ttft_p99_s": pct(ttfts, 99),
        # Each request in order (model, seconds, ttft, tokens): outliers can be traced to a request.
        "each": [[o.model, round(o.seconds, 3), None if o.ttft is None else round(o.ttft, 3), o.completion_tokens] for o in outcomes],
    }


def benchmark_server(server: Server, models: list[str], prompts: list[str], levels: list[int], n_requests: int, max_tokens: int) -> dict:
    """Start the server, warm every model up, run each concurrency level, stop it. The request set
    (prompt i with model i mod len(models)) is the same at every level and for every server."""
    requests = [(models[i % len(models)], prompts[i % len(prompts)]) for i in range(n_requests)]
    result = {"command": server.argv, "log": str(server.log_path), "levels": {}}
    try:
        server.start()
        result["startup_seconds"] = server.startup_seconds
        process = psutil.Process(server.popen.pid)
        # First forwards are slow (allocations, lazy init): one short request per model, unmeasured.
        warm_up, _ = asyncio.run(run_load(server.base_url, [(m, prompts[0]) for m in models], 1, 8))
        failed = [o.error for o in warm_up if o.error]
        if failed:
            raise ServerFailed(f"{server.label}: warm-up request failed: {failed[0]}\n{server.log_tail()}")
        time.sleep(1.0)
        idle_before = tree_rss_mib(process)
        for concurrency in levels:
            level_before, cpu_before = tree_rss_mib(process), tree_cpu_seconds(process)
            psutil.cpu_percent()  # starts the machine-wide CPU measure of this level
            with PeakSampler(process) as sampler:
                outcomes, wall = asyncio.run(run_load(server.base_url, requests, concurrency, max_tokens))
            # How busy the server and the whole machine were: a busy machine (another job) shows here.
            cpu = {"server_cpu_seconds": tree_cpu_seconds(process) - cpu_before, "machine_cpu_percent": psutil.cpu_percent()}
            time.sleep(1.0)  # let the server drop finished rows before reading its idle memory
            level = summarize(outcomes, wall) | cpu | {"rss_before_mib": level_before, "rss_peak_mib": sampler.peak, "rss_after_mib": tree_rss_mib(process)}
            result["levels"][str(concurrency)] = level
            print(
                f"  {server.label} c={concurrency}: {level['output_tokens_per_s']:.1f} tok/s, p50 {level['latency_p50_s'] or float('nan'):.2f} s, "
                f"errors {level['errors']}, peak RSS {sampler.peak:.0f} MiB, server CPU {cpu['server_cpu_seconds'] / wall:.2f} cores, machine {cpu['machine_cpu_percent']:.0f}%",
                flush=True,
            )
        idle_after = tree_rss_mib(process)
        result["memory_mib"] = {
            "idle_before": idle_before,
            "peak": max(level["rss_peak_mib"] for level in result["levels"].values()),
            "idle_after": idle_after,
            "after_minus_before": idle_after - idle_before,
        }
    except Exception as err:  # noqa: BLE001  (one server's failure is reported; the others still run)
        result["error"] = str(err) if isinstance(err, ServerFailed) else f"{type(err).__name__}: {err}\n{server.log_tail()}"
        print(f"  {server.label} FAILED: {result['error']}", flush=True)
    finally:
        server.stop()
    return result


# -- faults ------------------------------------------------------------------------------------------


def metric(base_url: str, sample: str) -> float:
    """One sample's value from the server's /metrics (0 if not yet recorded)."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
    return 0.0


def post(base_url: str, path: str, body: bytes | dict, timeout: float = 120) -> tuple[int, str]:
    """(status, error message or "") of a JSON POST."""
    import httpx

    response = httpx.post(base_url + path, content=body if isinstance(body, bytes) else json.dumps(body).encode(), headers={"Content-Type": "application/json"}, timeout=timeout)
    message = response.json().get("error", {}).get("message", "") if response.status_code != 200 else ""
    return response.status_code, message


def fault_drill(server: Server, base: str, adapters: dict[str, str], churn: tuple[str, str], max_queue: int) -> dict:
    """Each fault the issue names, against a live server: what each request got, whether the
    server still answered afterwards, and its memory at idle before and after (and the peak)."""
    import httpx

    rows = []
    result = {"command": server.argv, "log": str(server.log_path), "faults": rows}

    def record(fault: str, statuses: list[int], expected: str, note: str = ""):
        alive = post(server.base_url, "/v1/completions", {"model": base, "prompt": "Hello", "max_tokens": 4})[0] == 200
        counts = {str(status): statuses.count(status) for status in sorted(set(statuses))}
        rows.append({"round": round_number, "fault": fault, "requests": len(statuses), "statuses": counts, "expected": expected, "served_after": alive, "note": note})
        print(f"  {fault}: {counts} (expected {expected}), still serving: {alive} {note}", flush=True)

    try:
        server.start()
        process = psutil.Process(server.popen.pid)
        asyncio.run(run_load(server.base_url, [(m, PROMPTS[0]) for m in [base, *adapters]], 1, 8))  # warm-up, unmeasured
        time.sleep(1.0)
        idle_before = tree_rss_mib(process)
        # Three times: memory that keeps growing round after round would be a leak, not a one-time cost.
        memory = {"idle_before": idle_before}
        for round_number in (1, 2, 3):
            print(f"  round {round_number}", flush=True)
            with PeakSampler(process) as sampler:
                # Clients that leave mid-stream: each reads its first event and closes the connection.
                cancelled = 'tunelab_sequences_total{finish_reason="cancelled"}'
                before = metric(server.base_url, cancelled)
                tokens_before = metric(server.base_url, "tunelab_completion_tokens_total")
                finished_before = {reason: metric(server.base_url, f'tunelab_sequences_total{{finish_reason="{reason}"}}') for reason in ("cancelled", "stop", "length")}

                def leave(index: int) -> int:
                    model, prompt = [base, *adapters][index % (1 + len(adapters))], PROMPTS[index % len(PROMPTS)]
                    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 400, "stream": True}
                    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=120) as response:
                        next(response.iter_lines())
                        return response.status_code

                with ThreadPoolExecutor(16) as pool:
                    statuses = list(pool.map(leave, range(16)))
                deadline = time.monotonic() + 60
                while metric(server.base_url, cancelled) - before < 16 and time.monotonic() < deadline:
                    time.sleep(0.2)
                ended = {reason: metric(server.base_url, f'tunelab_sequences_total{{finish_reason="{reason}"}}') - finished_before[reason] for reason in finished_before}
                generated = metric(server.base_url, "tunelab_completion_tokens_total") - tokens_before
                record("client leaves mid-stream", statuses, "200, then its rows cancelled", f"of the 16: {ended}; {generated:.0f} tokens generated in all (max_tokens 400 each)")

                megabyte = "lorem ipsum " * (1_000_000 // 12)
                started = time.perf_counter()
                outcomes = [post(server.base_url, "/v1/completions", {"model": base, "prompt": megabyte, "max_tokens": 8}) for _ in range(4)]
                record("1 MB prompt", [s for s, _ in outcomes], "400 naming both lengths", f"{(time.perf_counter() - started) / 4:.2f} s each: {outcomes[0][1][:90]}")

                outcomes = [post(server.base_url, "/v1/chat/completions", {"model": base, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10**7}) for _ in range(4)]
                record("max_tokens far past the context", [s for s, _ in outcomes], "400 naming both lengths", outcomes[0][1][:110])

                burst = 4 * max_queue
                with ThreadPoolExecutor(burst) as pool:
                    outcomes = list(
                        pool.map(
                            lambda i: post(server.base_url, "/v1/completions", {"model": base, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 16}, timeout=600), range(burst)
                        )
                    )
                record(f"burst of {burst} past --max-queue {max_queue}", [s for s, _ in outcomes], "200 or 429")

                outcomes = [
                    post(server.base_url, "/v1/completions", body) for body in (b"{not json", b'{"model": 3}', b'{"model": "x", "prompt": "hi", "max_tokens": "many"}', b"\xff\xfe")
                ]
                record("malformed JSON and wrong types", [s for s, _ in outcomes], "400")

                outcomes = [post(server.base_url, "/v1/completions", {"model": f"no-such-adapter-{i}", "prompt": "hi"}) for i in range(4)]
                record("unknown adapters", [s for s, _ in outcomes], "404")

                # Adapters loaded and unloaded while clients keep calling the others (and the churned one).
                name, path = churn
                stopping, statuses, churn_statuses = threading.Event(), [], []

                def traffic(model: str, into: list):
                    while not stopping.is_set():
                        into.append(post(server.base_url, "/v1/completions", {"model": model, "prompt": "Order 7", "max_tokens": 8})[0])

                workers = [threading.Thread(target=traffic, args=(model, statuses)) for model in [base, *adapters]]
                workers.append(threading.Thread(target=traffic, args=(name, churn_statuses)))
                for worker in workers:
                    worker.start()
                cycles = []
                for _ in range(5):
                    cycles.append(post(server.base_url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})[0])
                    time.sleep(1.0)  # traffic reaches it while loaded
                    cycles.append(post(server.base_url, "/v1/unload_lora_adapter", {"lora_name": name})[0])
                stopping.set()
                for worker in workers:
                    worker.join()
                record(
                    "load/unload during traffic",
                    statuses,
                    "200 for the other models",
                    f"load/unload: {sorted(set(cycles))}; churned adapter got {dict(sorted(Counter(churn_statuses).items()))}",
                )
            time.sleep(2.0)  # the last rows leave, the engine goes idle
            memory[f"peak_round_{round_number}"], memory[f"idle_after_round_{round_number}"] = sampler.peak, tree_rss_mib(process)
            print(
                f"  memory (MiB) after round {round_number}: idle {idle_before:.0f} -> peak {sampler.peak:.0f} -> idle {memory[f'idle_after_round_{round_number}']:.0f}", flush=True
            )
        memory["after_minus_before"] = memory["idle_after_round_3"] - idle_before
        memory["round_3_minus_round_2"] = memory["idle_after_round_3"] - memory["idle_after_round_2"]
        result["memory_mib"] = memory
    except Exception as err:  # noqa: BLE001  (reported like a server's failure)
        result["error"] = f"{type(err).__name__}: {err}\n{server.log_tail()}"
        print(f"  fault drill FAILED: {result['error']}", flush=True)
    finally:
        server.stop()
    return result


# -- report ------------------------------------------------------------------------------------------


def throughput(result: dict, concurrency: int) -> float | None:
    """A server's output tokens/s at one level; None where it has no figure (it failed)."""
    return result.get("levels", {}).get(str(concurrency), {}).get("output_tokens_per_s")


def divide(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def print_table(servers: dict[str, dict]) -> None:
    def fmt(value, spec=".2f"):
        return "-" if value is None else format(value, spec)

    print("\n| server | load | c | requests | errors | out tok/s | p50 latency s | p99 latency s | p50 TTFT s | p99 TTFT s | mean out tokens | peak RSS MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, result in servers.items():
        if "error" in result:
            print(f"| {label} | {result['load']} | - | - | - | FAILED (see below) | | | | | | |")
            continue
        for concurrency, level in result["levels"].items():
            print(
                f"| {label} | {result['load']} | {concurrency} | {level['requests']} | {level['errors']} | {fmt(level['output_tokens_per_s'], '.1f')} "
                f"| {fmt(level['latency_p50_s'])} | {fmt(level['latency_p99_s'])} | {fmt(level['ttft_p50_s'], '.3f')} | {fmt(level['ttft_p99_s'], '.3f')} "
                f"| {fmt(level['mean_output_tokens'], '.1f')} | {fmt(level['rss_peak_mib'], '.0f')} |"
            )
    for label, result in servers.items():
        for concurrency, level in result.get("levels", {}).items():
            if level["errors"]:
                print(f"{label} c={concurrency}: {level['errors']} errors, e.g. {level['error_messages'][0]}")
    print("\nmemory (server process tree RSS, MiB): idle before -> peak -> idle after (after - before)")
    for label, result in servers.items():
        memory = result.get("memory_mib")
        if memory:
            print(f"  {label}: {memory['idle_before']:.0f} -> {memory['peak']:.0f} -> {memory['idle_after']:.0f} ({memory['after_minus_before']:+.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SMOLLM2, help="tunelab model: alias, directory, hub id or .gguf; the peer gets its local directory")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="a LoRA run or peft directory (default: 3 trained here)")
    parser.add_argument("--adapter-cache", type=Path, default=Path("runs/serve-load/adapters"), help="where the trained adapters are kept")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--baseline-concurrency",
        type=int,
        nargs="+",
        default=[1],
        help="levels the --max-batch 1 server runs at (its throughput stays flat with concurrency, so 1 by default: one request after another)",
    )
    parser.add_argument("--requests", type=int, default=24, help="requests per concurrency level, the same set at every level and server (24: ~13 min in all on 2 CPU cores)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--no-peer", action="store_true", help="skip transformers serve")
    parser.add_argument("--peer-batching", choices=("continuous", "default"), default="continuous", help="transformers serve mode tried first")
    parser.add_argument("--dtype", default="float32", help="the weights' dtype on both servers (float32: the peer's default for this model)")
    parser.add_argument("--faults-only", action="store_true", help="only the fault drill")
    parser.add_argument("--no-faults", action="store_true", help="skip the fault drill")
    parser.add_argument("--out", type=Path, default=Path("runs/serve-load.json"))
    args = parser.parse_args()

    started = time.perf_counter()
    levels, baseline_levels = sorted(set(args.concurrency)), sorted(set(args.baseline_concurrency))
    if args.requests < max(levels):
        print(f"note: --requests {args.requests} < concurrency {max(levels)}: at most {args.requests} requests are ever in flight at that level", flush=True)
    logs = args.out.with_suffix("")  # runs/serve-load/ beside runs/serve-load.json
    model_dir = Path(local_source(args.model))  # the alias's safetensors copy (converted once), for the peer
    if args.adapter:
        if any("=" not in item for item in args.adapter):
            parser.error("--adapter takes NAME=PATH")
        adapters = dict(item.split("=", 1) for item in args.adapter)
    else:
        adapters = {name: str(path) for name, path in trained_adapters(args.model, args.adapter_cache).items()}
    all_models = [args.model, *adapters]
    tunelab_serve = [sys.executable, "-m", "tunelab", "serve", "--model", args.model, "--dtype", args.dtype]

    def tunelab_server(label: str, max_batch: int, served_adapters: dict[str, str]) -> Server:
        port = free_port()
        argv = [*tunelab_serve, "--port", str(port), "--max-batch", str(max_batch), *(f"{n}={p}" for n, p in served_adapters.items())]
        return Server(label, argv, port, logs / f"{label}.log")

    def peer_server(batching: str) -> Server:
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "transformers.cli.transformers",
            "serve",
            str(model_dir),
            "--device",
            "cpu",
            "--dtype",
            args.dtype,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        argv += ["--continuous-batching"] if batching == "continuous" else []
        return Server(f"transformers-serve-{batching}", argv, port, logs / f"transformers-serve-{batching}.log")

    def run(label: str, server: Server, models: list[str], load: str, server_levels: list[int] = levels) -> dict:
        print(f"{label}: {' '.join(server.argv)}", flush=True)
        return benchmark_server(server, models, PROMPTS, server_levels, args.requests, args.max_tokens) | {"load": load}

    drill = None
    if not args.no_faults:
        # The last adapter is loaded and unloaded through the API (from --adapter-dir) while the rest serve.
        *kept, churned = adapters.items()
        adapter_dir = Path(churned[1]).resolve().parent
        server = tunelab_server("tunelab-faults", 16, dict(kept))
        server.argv += ["--max-queue", "32", "--adapter-dir", str(adapter_dir)]
        print(f"fault drill: {' '.join(server.argv)}", flush=True)
        drill = fault_drill(server, args.model, dict(kept), (churned[0], Path(churned[1]).resolve().name), 32)
        if args.faults_only:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"faults": drill}, indent=2) + "\n")
            print(f"wrote {args.out}")
            return
    mixed = f"base + {len(adapters)} adapters"
    servers = {
        "tunelab": run("tunelab", tunelab_server("tunelab", 16, adapters), all_models, mixed),
        "tunelab one-at-a-time": run("tunelab one-at-a-time", tunelab_server("tunelab-one-at-a-time", 1, adapters), all_models, mixed, baseline_levels),
        "tunelab base": run("tunelab base", tunelab_server("tunelab-base", 16, {}), [args.model], "base only"),
    }
    peer_attempts = []
    if not args.no_peer:
        # The peer names its model by the directory it was started on.
        for batching in dict.fromkeys([args.peer_batching, "default"]):
            peer = run(f"transformers serve ({batching})", peer_server(batching), [str(model_dir)], "base only") | {"batching": batching}
            peer_attempts.append(peer)
            if "error" not in peer:
                break
        servers[f"transformers serve ({peer_attempts[-1]['batching']})"] = peer_attempts[-1]
    peer_label = next((label for label in servers if label.startswith("transformers serve")), None)

    batched, one_at_a_time, tunelab_base = servers["tunelab"], servers["tunelab one-at-a-time"], servers["tunelab base"]
    one_at_a_time_rate = throughput(one_at_a_time, baseline_levels[0])
    ratios = {
        # The contract's figure: the batched server at each level against the one-at-a-time rate.
        "tunelab_vs_one_at_a_time": {str(c): divide(throughput(batched, c), one_at_a_time_rate) for c in levels},
        # Where the --max-batch 1 server also ran at that level: the same requests at the same concurrency.
        "tunelab_vs_one_at_a_time_same_c": {str(c): divide(throughput(batched, c), throughput(one_at_a_time, c)) for c in levels if c in baseline_levels},
        "tunelab_base_vs_peer": {str(c): divide(throughput(tunelab_base, c), throughput(servers[peer_label], c)) for c in levels} if peer_label else None,
    }
    tunelab_errors = sum(level["errors"] for level in batched.get("levels", {}).values())
    at_16 = ratios["tunelab_vs_one_at_a_time"].get("16")
    target = {
        "throughput_ratio_at_16": at_16,
        "required": TARGET_RATIO_AT_16,
        "errors": tunelab_errors,
        "met": at_16 is not None and at_16 >= TARGET_RATIO_AT_16 and tunelab_errors == 0 and "error" not in batched,
    }

    print_table(servers)
    print("\nthroughput ratios (output tokens/s):")
    for c in levels:
        line = f"  c={c}: tunelab / one-at-a-time (c={baseline_levels[0]}) = {fmt_ratio(ratios['tunelab_vs_one_at_a_time'][str(c)])}"
        if str(c) in ratios["tunelab_vs_one_at_a_time_same_c"]:
            line += f", tunelab / one-at-a-time (same c) = {fmt_ratio(ratios['tunelab_vs_one_at_a_time_same_c'][str(c)])}"
        if ratios["tunelab_base_vs_peer"] is not None:
            line += f", tunelab base / {peer_label} = {fmt_ratio(ratios['tunelab_base_vs_peer'][str(c)])}"
        print(line)
    if "16" in ratios["tunelab_vs_one_at_a_time"]:
        print(f"target at c=16: >= {TARGET_RATIO_AT_16:.0f}x one at a time with 0 errors: {'MET' if target['met'] else 'NOT MET'} ({fmt_ratio(at_16)}, {tunelab_errors} errors)")
    for attempt in peer_attempts:
        if "error" in attempt:
            print(f"\ntransformers serve ({attempt['batching']}) could not be benchmarked:\n{attempt['error']}")
    for label, result in servers.items():
        if "error" in result and not label.startswith("transformers serve"):
            print(f"\n{label} FAILED:\n{result['error']}")

    summary = {
        "settings": {
            "model": args.model,
            "model_dir": str(model_dir),
            "adapters": adapters,
            "concurrency": levels,
            "baseline_concurrency": baseline_levels,
            "requests_per_level": args.requests,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "prompts": len(PROMPTS),
            "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "versions": {"tunelab": tunelab.__version__, "transformers": transformers.__version__, "openai": openai.__version__, "python": platform.python_version()},
        },
        "servers": servers,
        "faults": drill,
        "peer_attempts": peer_attempts,
        "ratios": ratios,
        "target": target,
        "total_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {args.out} (total {summary['total_seconds']:.0f} s)")


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


if __name__ == "__main__":
    main()
