"""A real GGUF client: llama.cpp (through llama-cpp-python) runs tunelab's GGUF exports of a LoRA
run, the merged model and the base + LoRA adapter file, and its greedy tokens and last-token logits
are compared with tunelab's own (the run in fp32).

    tunelab quickstart --out runs/quickstart                      # a SmolLM2 LoRA run
    python benchmarks/gguf_llamacpp.py --run runs/quickstart/run --out runs/gguf-llamacpp

Installs llama-cpp-python first if it is missing (pip builds llama.cpp from source: minutes).
Writes OUT/summary.json and the exported files. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tunelab.export import export_run
from tunelab.runs import load_run

PROMPT = [
    {"role": "system", "content": "Extract name, age, city, date (YYYY-MM-DD) and amount (a number) as a JSON object with those keys."},
    {"role": "user", "content": "On March 3, 2021, Maria Lopez (34) from Lisbon paid $1,299.00."},
]


def ensure_llama_cpp() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        print("installing llama-cpp-python (builds llama.cpp) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python"], check=True)


@torch.no_grad()
def tunelab_reference(run_dir: Path, prompt_ids: list[int], new_tokens: int, stored_as: torch.dtype | None = None) -> tuple[list[int], np.ndarray]:
    """tunelab's greedy continuation (fp32, a full forward per token) and its logits after the
    prompt; `stored_as`: the merged matrices first rounded to that dtype, as the file stores them
    (norms stay f32), which separates the file's rounding from llama.cpp's arithmetic."""
    run = load_run(run_dir, dtype="float32")
    model = run.model.eval()
    if stored_as is not None:
        run.method.merge(model)
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(param.to(stored_as).float())
    tokens, last = [], None
    for _ in range(new_tokens):
        logits = model(input_ids=torch.tensor([prompt_ids + tokens])).logits[0, -1].double()
        last = logits.numpy() if last is None else last
        tokens.append(int(logits.argmax()))
    return tokens, last


def llama_cpp_run(model_path: Path, prompt_ids: list[int], new_tokens: int, lora_path: Path | None = None) -> tuple[list[int], np.ndarray, float]:
    """llama.cpp's greedy continuation and logits after the prompt, and its load + run seconds."""
    from llama_cpp import Llama

    started = time.perf_counter()
    llm = Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None, n_ctx=512, logits_all=True, verbose=False, seed=0)
    llm.eval(prompt_ids)
    last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    tokens = []
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
        llm.eval([token])
    return tokens, last, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/quickstart/run"), help="a tunelab LoRA run on a Llama-family model")
    parser.add_argument("--out", type=Path, default=Path("runs/gguf-llamacpp"))
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens compared")
    parser.add_argument("--gguf-type", default="f16")
    args = parser.parse_args()
    ensure_llama_cpp()
    from llama_cpp import Llama

    args.out.mkdir(parents=True, exist_ok=True)
    run = load_run(args.run)
    base_name = run.config.model.name
    files = {"merged": args.out / f"merged-{args.gguf_type}.gguf", "base": args.out / f"base-{args.gguf_type}.gguf", "adapter": args.out / "adapter.gguf"}
    for path in files.values():
        path.unlink(missing_ok=True)
    export_run(args.run, "gguf", files["merged"], args.gguf_type)
    export_run(base_name, "gguf", files["base"], args.gguf_type)
    export_run(args.run, "gguf-adapter", files["adapter"])

    text = run.tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    prompt_ids = run.tokenizer(text, add_special_tokens=False).input_ids
    # The GGUF's own tokenizer (tokens, merges, pre-tokenizer) must encode the prompt as tunelab does.
    vocab_only = Llama(model_path=str(files["merged"]), vocab_only=True, verbose=False)
    llama_ids = vocab_only.tokenize(text.encode(), add_bos=False, special=True)
    reference_tokens, reference_logits = tunelab_reference(args.run, prompt_ids, args.tokens)
    stored = {"f16": torch.float16, "bf16": torch.bfloat16}.get(args.gguf_type)
    rounded_logits = None if stored is None else tunelab_reference(args.run, prompt_ids, 1, stored)[1]
    summary = {
        "run": str(args.run),
        "gguf_type": args.gguf_type,
        "prompt_tokens": len(prompt_ids),
        "tokenizer_ids_equal": llama_ids == prompt_ids,
        "tunelab_completion": run.tokenizer.decode(reference_tokens),
        # What rounding the weights to the file's type alone does to tunelab's logits.
        "max_abs_logit_diff_from_rounding": None if rounded_logits is None else float(np.abs(rounded_logits - reference_logits).max()),
        "sizes_mb": {name: path.stat().st_size / 2**20 for name, path in files.items()},
    }
    for label, model_path, lora_path in (("merged", files["merged"], None), ("base+adapter", files["base"], files["adapter"])):
        tokens, logits, seconds = llama_cpp_run(model_path, prompt_ids, args.tokens, lora_path)
        summary[label] = {
            "greedy_tokens_equal": tokens == reference_tokens,
            "first_difference": next((i for i, (a, b) in enumerate(zip(tokens, reference_tokens)) if a != b), None),
            "max_abs_logit_diff": float(np.abs(logits - reference_logits).max()),
            "max_abs_logit": float(np.abs(reference_logits).max()),
            "top1_equal": int(np.argmax(logits)) == int(np.argmax(reference_logits)),
            # Against tunelab on the weights as the file stores them: llama.cpp's arithmetic alone.
            "max_abs_logit_diff_same_weights": None if rounded_logits is None else float(np.abs(logits - rounded_logits).max()),
            "completion": run.tokenizer.decode(tokens),
            "seconds": seconds,
        }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
