"""The sides of the benchmark, each run in its own process so its peak memory is its own.

    python -m tunelab.bench.sides {tunelab|hf_peft|trl} SPEC.json RESULT.json

SPEC holds a tunelab run config. The tunelab side runs `tunelab.train.train` on it, exactly as
`tunelab train` would. A peer trains the same samples, in the same order, from the same LoRA init,
with the same settings: SFT through `transformers.Trainer` + `peft` (padding each batch to its
longest sample, the HF default), DPO through TRL's `DPOTrainer` with a `peft_config` (its reference
policy is the base with the adapter off, as tunelab's is), GRPO through TRL's `GRPOTrainer` with a
`peft_config` (sampling its own completions, timed, then training on the tunelab side's, which
SPEC's `completions` holds). Every side reports its loss at each step.
The SFT eval loss is measured by one function on both sides; TRL's by its own `evaluate`.
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
from tunelab.models.loader import load_model, load_tokenizer, local_source, resolve_device
from tunelab.objectives.registry import get_objective_class
from tunelab.train.loop import planned_sample_order


def run_tunelab(config, spec: dict) -> dict:
    from tunelab.train import rollout, train

    sampled = []  # each round's completions, for the GRPO peer to train on

    def recorded(*args, **kwargs):
        completions, truncated = sampling(*args, **kwargs)
        sampled.append(completions)
        return completions, truncated

    sampling, rollout.generate = rollout.generate, recorded
    report = train(config, overwrite=True).report
    records = [json.loads(line) for line in (Path(config.output) / "metrics.jsonl").read_text().splitlines()]
    result = {
        "tokens": report["tokens"],
        "train_seconds": report["train_seconds"],
        "train_losses": [r["loss"] for r in records],
        "eval_loss": report.get("eval_loss"),
        "trainable_params": report["trainable_params"],
    }
    if sampled:
        result |= {
            "completions": sampled,
            "step_seconds": [r["seconds"] for r in records],
            "sampling_seconds": [r["generation_seconds"] for r in records],
            "completion_mean_lengths": [r["completions/mean_length"] for r in records],
        }
    return result


def run_hf_peft(config, spec: dict) -> dict:
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    model, tokenizer, data, rows, lora = _peer_start(config)
    samples = [{"input_ids": row["input_ids"], "labels": [t if m else IGNORE for t, m in zip(row["input_ids"], row["target_mask"])]} for row in rows]
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

    trainer = Trainer(model=peft_model, args=TrainingArguments(**_peer_arguments(config, model)), train_dataset=samples, data_collator=pad_to_longest)
    result = _peer_train(trainer, tokens=sum(len(s["input_ids"]) for s in samples))
    if data.eval is not None:
        tcfg, dcfg = config.train, config.data
        result["eval_loss"] = evaluate_loss(peft_model.base_model.model, data.eval, tcfg.batch_size, dcfg.max_length, dcfg.packing, pad_id)["eval_loss"]
    return result


def run_trl(config, spec: dict) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class TokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args):
            return dataset  # tokenized by tunelab already: both sides train the same ids

    model, tokenizer, data, rows, lora = _peer_start(config)
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    options = config.objective
    args = DPOConfig(
        **_peer_arguments(config, model),
        beta=options.beta,
        loss_type=[options.loss_type],
        label_smoothing=options.label_smoothing,
        max_length=config.data.max_length,  # tunelab cut the rows to it already
        per_device_eval_batch_size=config.train.batch_size,
        precompute_ref_log_probs=False,
        bf16=False,  # TRL's default is True; both sides train in fp32
        activation_checkpointing=False,  # TRL's default is on; tunelab's is off
    )
    # With a peft_config, TRL seeds (args.seed) right before get_peft_model: the same LoRA init as tunelab's.
    trainer = TokenizedDPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{k: row[k] for k in keys} for row in rows]),
        eval_dataset=None if data.eval is None else Dataset.from_list([{k: row[k] for k in keys} for row in data.eval]),
        processing_class=tokenizer,
        peft_config=lora,
    )
    result = _peer_train(trainer, tokens=sum(2 * len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"]) for row in rows))
    if data.eval is not None:
        result["eval_loss"] = trainer.evaluate()["eval_loss"]
    return result


def run_trl_grpo(config, spec: dict) -> dict:
    """TRL's GRPOTrainer on the same prompts, in the same order, with the same settings. Each step
    samples its completions as TRL does (timed), then trains on the tunelab side's completions of
    that step (`spec["completions"]`), so both sides' losses are of the same samples."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tunelab.scoring.rewards import math_exact

    model, tokenizer, data, rows, lora = _peer_start(config)
    options, tcfg = config.objective, config.train
    completions = spec["completions"]
    sampling_seconds, step_seconds = [], []

    class SameCompletionsGRPOTrainer(GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            started = time.perf_counter()
            _, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            sampling_seconds.append(time.perf_counter() - started)
            return completions[len(sampling_seconds) - 1], logprobs

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_seconds.append(time.perf_counter() - self.started)

    def math_exact_reward(completions, answer, **_):
        return math_exact([c[0]["content"] if isinstance(c, list) else c for c in completions], answer)

    arguments = _peer_arguments(config, model) | {"per_device_train_batch_size": tcfg.batch_size * options.num_generations}
    args = GRPOConfig(
        **arguments,
        num_generations=options.num_generations,
        max_completion_length=options.max_completion_length,
        temperature=options.temperature,
        loss_type=options.loss_type,
        beta=options.beta,
        scale_rewards=options.scale_rewards,
        shuffle_dataset=False,  # tunelab's order, as the rows are given
        bf16=False,  # both sides keep fp32 weights
        activation_checkpointing=False,  # TRL's default is on; tunelab's is off
    )
    # With a peft_config, TRL seeds (args.seed) right before get_peft_model: the same LoRA init as tunelab's.
    trainer = SameCompletionsGRPOTrainer(
        model=model,
        reward_funcs=math_exact_reward,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": json.loads(row["prompt"]), **json.loads(row["fields"])} for row in rows]),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[StepTimer()],
    )
    result = _peer_train(trainer, tokens=sum(len(row["prompt_ids"]) * options.num_generations for row in rows) + sum(len(c) for step in completions for c in step))
    lengths = [entry["completions/mean_length"] for entry in trainer.state.log_history if "completions/mean_length" in entry]
    return result | {"step_seconds": step_seconds, "sampling_seconds": sampling_seconds, "completion_mean_lengths": lengths}


def _peer_start(config):
    """What a peer side starts from: tunelab's model and tokenized rows (in tunelab's training
    order) and the peft config of the run's LoRA."""
    from peft import LoraConfig

    tcfg, mcfg = config.train, config.method
    torch.manual_seed(tcfg.seed)
    model, tokenizer = _peer_4bit_model(config.model) if config.model.quantize == "nf4" else load_model(config.model)
    data = build_datasets(config.data, tokenizer, tcfg.seed, get_objective_class(config.objective.name).rows)
    rows = [data.train[i] for i in planned_sample_order(len(data.train), tcfg)]
    lora = LoraConfig(r=mcfg.r, lora_alpha=mcfg.alpha, lora_dropout=mcfg.dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    return model, tokenizer, data, rows, lora


def _peer_4bit_model(model_config):
    """QLoRA as the peers' users run it: the base loaded by transformers with bitsandbytes NF4 and
    double quantization (compute in fp32, as the peers' other runs), prepared by peft for k-bit
    training without gradient checkpointing (tunelab's side does not checkpoint either)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    device = str(resolve_device(model_config.device))
    model = AutoModelForCausalLM.from_pretrained(local_source(model_config.name), quantization_config=quantization, dtype=torch.float32, device_map=device)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), load_tokenizer(model_config)


def _peer_arguments(config, model) -> dict:
    """The Trainer settings of the run config: sequential samples (tunelab's order), no checkpoints."""
    tcfg = config.train
    return {
        "output_dir": tempfile.mkdtemp(prefix="tunelab-bench-peer-"),
        "per_device_train_batch_size": tcfg.batch_size,
        "gradient_accumulation_steps": tcfg.grad_accum,
        "max_steps": tcfg.max_steps,
        "learning_rate": tcfg.lr,
        "lr_scheduler_type": tcfg.scheduler,
        "warmup_steps": 0,
        "weight_decay": tcfg.weight_decay,
        "max_grad_norm": tcfg.max_grad_norm,
        "adam_beta1": tcfg.adam_betas[0],
        "adam_beta2": tcfg.adam_betas[1],
        "adam_epsilon": tcfg.adam_eps,
        "train_sampling_strategy": "sequential",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": next(model.parameters()).device.type == "cpu",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": tcfg.seed,
    }


def _peer_train(trainer, tokens: int) -> dict:
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {
        "tokens": tokens,
        "train_seconds": seconds,
        "train_losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "eval_loss": None,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }


SIDES = {"tunelab": run_tunelab, "hf_peft": run_hf_peft, "trl": run_trl, "trl_grpo": run_trl_grpo}


def main(side: str, spec_path: str, result_path: str) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    spec = json.loads(Path(spec_path).read_text())
    result = SIDES[side](load_config(spec["config"]), spec)
    result["tokens_per_s"] = result["tokens"] / result["train_seconds"]
    losses = result["train_losses"]
    result["step1_loss"], result["final_train_loss"] = (losses[0], losses[-1]) if losses else (None, None)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["torch_threads"] = torch.get_num_threads()
    write_json_atomic(Path(result_path), result)


if __name__ == "__main__":
    main(*sys.argv[1:])
