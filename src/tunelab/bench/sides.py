"""The two sides of the benchmark, each run in its own process so its peak memory is its own.

    python -m tunelab.bench.sides {tunelab|hf_peft} SPEC.json RESULT.json

SPEC holds a tunelab run config. The tunelab side runs `tunelab.train.train` on it, exactly as
`tunelab train` would; the HF side trains the same samples, in the same order, with the same
settings through `transformers.Trainer` + `peft` (padding each batch to its longest sample, the HF
default). Both sides measure eval loss with the same function.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from tunelab.config import load_config
from tunelab.data.batching import IGNORE
from tunelab.data.dataset import build_datasets
from tunelab.eval.loss import evaluate_loss
from tunelab.files import write_json_atomic
from tunelab.models import load_model
from tunelab.train.loop import planned_sample_order


def run_tunelab(config) -> dict:
    from tunelab.train import train

    report = train(config, overwrite=True).report
    return {
        "tokens": report["tokens"],
        "train_seconds": report["train_seconds"],
        "final_train_loss": report["final_train_loss"],
        "eval_loss": report.get("eval_loss"),
        "trainable_params": report["trainable_params"],
    }


def run_hf_peft(config) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    tcfg, dcfg, mcfg = config.train, config.data, config.method
    torch.manual_seed(tcfg.seed)
    model, tokenizer = load_model(config.model)
    data = build_datasets(dcfg, tokenizer, tcfg.seed)
    # tunelab's sample order, fed sequentially: both sides see the same batches.
    rows = [data.train[i] for i in planned_sample_order(len(data.train), tcfg)]
    samples = [
        {"input_ids": row["input_ids"], "labels": [t if m else IGNORE for t, m in zip(row["input_ids"], row["target_mask"])]}
        for row in rows
    ]
    lora = LoraConfig(r=mcfg.r, lora_alpha=mcfg.alpha, lora_dropout=mcfg.dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    pad_id = tokenizer.pad_token_id

    def pad_to_longest(batch: list[dict]) -> dict:
        width = max(len(s["input_ids"]) for s in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, s in enumerate(batch):
            n = len(s["input_ids"])
            ids[i, :n], labels[i, :n], attention[i, :n] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attention}

    device = next(model.parameters()).device
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="tunelab-bench-hf-"),
        per_device_train_batch_size=tcfg.batch_size,
        gradient_accumulation_steps=tcfg.grad_accum,
        max_steps=tcfg.max_steps,
        learning_rate=tcfg.lr,
        lr_scheduler_type=tcfg.scheduler,
        warmup_steps=0,
        weight_decay=tcfg.weight_decay,
        max_grad_norm=tcfg.max_grad_norm,
        adam_beta1=tcfg.adam_betas[0],
        adam_beta2=tcfg.adam_betas[1],
        adam_epsilon=tcfg.adam_eps,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=tcfg.seed,
    )
    trainer = Trainer(model=peft_model, args=args, train_dataset=samples, data_collator=pad_to_longest)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    eval_loss = None
    if data.eval is not None:
        eval_loss = evaluate_loss(peft_model.base_model.model, data.eval, tcfg.batch_size, dcfg.max_length, dcfg.packing, pad_id)["eval_loss"]
    return {
        "tokens": sum(len(s["input_ids"]) for s in samples),
        "train_seconds": seconds,
        "final_train_loss": losses[-1] if losses else None,
        "eval_loss": eval_loss,
        "trainable_params": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
    }


SIDES = {"tunelab": run_tunelab, "hf_peft": run_hf_peft}


def main(side: str, spec_path: str, result_path: str) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    spec = json.loads(Path(spec_path).read_text())
    result = SIDES[side](load_config(spec["config"]))
    result["tokens_per_s"] = result["tokens"] / result["train_seconds"]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["torch_threads"] = torch.get_num_threads()
    write_json_atomic(Path(result_path), result)


if __name__ == "__main__":
    main(*sys.argv[1:])
