"""TRL (pinned in the dev extra) as the oracle of tunelab's preference objectives.

The same tiny Llama twice: TRL's trainer computes its loss on a batch it collates from token ids
(its own loss code, fp32, CPU, no hub), and tunelab's objective computes its loss on the same pairs
through the objectives' seam. `trl_dpo` / `ours` return the loss, the metrics and the gradient of
every trainable tensor under peft's names, so a test compares them one to one.

Import from a test module as `from trl_oracle import ...`.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

from tunelab.config import ModelConfig, parse_config
from tunelab.data.batching import BatchLayout
from tunelab.methods import build_method
from tunelab.methods.base import PEFT_PREFIX
from tunelab.models.attention import enable_packed_attention, uses_packed_attention
from tunelab.models.loader import load_model
from tunelab.models.tiny import tiny_llama, tiny_tokenizer
from tunelab.objectives.base import StepTotals, step_loss
from tunelab.objectives.reference import LiveReference
from tunelab.objectives.registry import build_objective

BOS, EOS = 1, 2
# (prompt ids, chosen ids, rejected ids); completions end with EOS as tunelab's and TRL's tokenization make them.
PAIRS = [
    ([BOS, 40, 41, 42], [60, 61, 62, EOS], [70, 71, EOS]),
    ([BOS, 43, 44], [80, EOS], [81, 82, 83, 84, EOS]),
    ([BOS, 90, 91, 92, 93], [100, 101, EOS], [102, 103, 104, EOS]),
    ([BOS, 45], [110, 111, 112, 113, 114, EOS], [120, EOS]),
]
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
REFERENCE_SEED = 99  # the explicit reference model: another random tiny Llama


def _quiet_trl() -> None:
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", WANDB_DISABLED="true")
    warnings.filterwarnings("ignore")
    logging.getLogger("trl").setLevel(logging.ERROR)


def _trl_args(config_cls, output_dir, **options):
    # TRL's base config defaults to bf16 and gradient checkpointing: an fp32 oracle turns both off.
    common = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        logging_strategy="no",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return config_cls(**common, per_device_train_batch_size=len(PAIRS), **options)


def _text_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})


def lora_start() -> dict[str, torch.Tensor]:
    """Nonzero LoRA factors under peft's names, so the policy differs from its adapter-off reference."""
    method, model = _our_lora_model()
    generator = torch.Generator().manual_seed(7)
    tensors = {name: torch.randn(t.shape, generator=generator) * 0.3 for name, t in method.peft_export(model)[1].items()}
    return tensors


def _our_lora_model():
    model, _ = load_model(ModelConfig(name="tiny-random-llama", dtype="float32", device="cpu"))
    config = parse_config({"model": "tiny-random-llama", "data": {"train": "x"}, "method": {"name": "lora", **LORA}})
    method = build_method(config.method)
    method.attach(model)
    return method, model


def trl_dpo(tmp_path, options: dict, lora: dict[str, torch.Tensor] | None) -> dict:
    """TRL DPOTrainer's loss, metrics and gradients: a peft LoRA policy starting from `lora` with the
    adapter-off base as reference, or (lora None) the full model against an explicit reference."""
    _quiet_trl()
    from trl import DPOConfig, DPOTrainer

    trainer = _with_reference(DPOTrainer, _trl_args(DPOConfig, tmp_path, **options), _text_dataset(), lora)
    batch = trainer.data_collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in PAIRS])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: float(v[-1]) for k, v in trainer._metrics["train"].items() if v}
    grads = {_peft_name(n): p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return {"loss": loss.item(), "metrics": metrics, "grads": grads}


def trl_pairwise(tmp_path, trainer: str, options: dict) -> dict:
    """TRL's CPOTrainer (cpo, simpo) or ORPOTrainer loss, metrics and gradients on the full model."""
    _quiet_trl()
    if trainer == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer

    tokenizer = tiny_tokenizer()
    trainer = Trainer(model=tiny_llama(len(tokenizer)), args=_trl_args(Config, tmp_path, **options), train_dataset=_text_dataset(), processing_class=tokenizer)
    trainer.model.train()
    features = []
    for prompt, chosen, rejected in PAIRS:
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for key, completion in (("chosen", chosen), ("rejected", rejected)):
            row[f"{key}_input_ids"] = prompt + completion
            row[f"{key}_attention_mask"] = [1] * (len(prompt) + len(completion))
            row[f"{key}_labels"] = [-100] * len(prompt) + completion
        features.append(row)
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(features), train_eval="train")
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return {"loss": loss.item(), "metrics": {k: float(v) for k, v in metrics.items()}, "grads": grads}


def kto_examples() -> list[dict]:
    """Unpaired examples as TRL unpairs PAIRS (desirable ones first), one rejected left out so the
    two kinds are unbalanced; each KL completion is the previous example's (TRL's rotation)."""
    examples = [{"prompt_ids": p, "completion_ids": c, "label": True} for p, c, _ in PAIRS]
    examples += [{"prompt_ids": p, "completion_ids": r, "label": False} for p, _, r in PAIRS[:-1]]
    return examples


def trl_kto(tmp_path, options: dict, lora: dict[str, torch.Tensor] | None) -> dict:
    """TRL KTOTrainer's loss, metrics and gradients, set up as `trl_dpo`."""
    _quiet_trl()
    from trl import KTOConfig, KTOTrainer

    examples = kto_examples()
    args = _trl_args(KTOConfig, tmp_path, **options)
    args.per_device_train_batch_size = len(examples)
    trainer = _with_reference(KTOTrainer, args, _kto_text_dataset(), lora)
    completions = [e["completion_ids"] for e in examples]
    rotated = [completions[-1]] + completions[:-1]
    batch = trainer.data_collator([{**e, "KL_completion_ids": kl} for e, kl in zip(examples, rotated)])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: float(v[-1]) for k, v in trainer._metrics["train"].items() if v}
    grads = {_peft_name(n): p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return {"loss": loss.item(), "metrics": metrics, "grads": grads}


def _kto_text_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["a", "b"], "completion": [" b", " c"], "label": [True, False]})


def reward_head() -> dict[str, torch.Tensor]:
    """A reward head both sides start from (TRL's model gets it as its `score`)."""
    generator = torch.Generator().manual_seed(11)
    return {"score.weight": torch.randn(1, 64, generator=generator) * 0.1}


def trl_reward(tmp_path, options: dict, head: dict[str, torch.Tensor], pad_is_eos: bool = False) -> dict:
    """TRL RewardTrainer's loss, metrics and gradients: LlamaForSequenceClassification with the tiny
    Llama's backbone and `head`."""
    _quiet_trl()
    from transformers import LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    tokenizer = tiny_tokenizer()
    if pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token
    causal = tiny_llama(len(tokenizer))
    model = LlamaForSequenceClassification(causal.config.__class__(**{**causal.config.to_dict(), "num_labels": 1}))
    missing = model.load_state_dict({**{k: v for k, v in causal.state_dict().items() if k.startswith("model.")}, **head}, strict=False)
    assert not missing.missing_keys, missing.missing_keys
    trainer = RewardTrainer(model=model, args=_trl_args(RewardConfig, tmp_path, **options), train_dataset=_text_dataset(), processing_class=tokenizer)
    trainer.model.train()
    batch = trainer.data_collator([{"chosen_ids": p + c, "rejected_ids": p + r} for p, c, r in PAIRS])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: float(v[-1]) for k, v in trainer._metrics["train"].items() if v}
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return {"loss": loss.item(), "metrics": metrics, "grads": grads}


def _with_reference(trainer_cls, args, dataset, lora: dict[str, torch.Tensor] | None):
    """A TRL trainer whose policy is a peft LoRA starting from `lora` (its reference: the adapter
    switched off), or (lora None) the full model against an explicit reference model."""
    from peft import LoraConfig, set_peft_model_state_dict

    tokenizer = tiny_tokenizer()
    if lora is not None:
        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=LORA["target"])
        trainer = trainer_cls(model=tiny_llama(len(tokenizer)), args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
        result = set_peft_model_state_dict(trainer.model, lora)
        assert not result.unexpected_keys, result.unexpected_keys[:3]
    else:
        reference = tiny_llama(len(tokenizer), seed=REFERENCE_SEED)
        trainer = trainer_cls(model=tiny_llama(len(tokenizer)), ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.model.train()
    return trainer


def _peft_name(name: str) -> str:
    """A parameter's name as peft saves it (no adapter name), or a plain model's name."""
    return name.replace(".default", "")


def ours(
    objective_options: dict,
    lora: dict[str, torch.Tensor] | None,
    packing: bool = True,
    max_tokens: int = 0,
    samples: list[dict] | None = None,
    objective_state: dict[str, torch.Tensor] | None = None,
) -> dict:
    """tunelab's loss, metrics and gradients for the same pairs, one optimizer step's worth, through
    the loop's arithmetic (each term over its unit's count in the whole step)."""
    config = parse_config({"model": "tiny-random-llama", "data": {"train": "x"}, "objective": objective_options})
    objective = build_objective(config.objective)
    if lora is not None:
        method, model = _our_lora_model()
        method.peft_import(model, lora, source="test")
        reference = LiveReference.adapter_off(method, model)
        params = {PEFT_PREFIX + n: p for n, p in model.named_parameters() if p.requires_grad}
    else:
        model, _ = load_model(ModelConfig(name="tiny-random-llama", dtype="float32", device="cpu"))
        reference_model = tiny_llama(model.config.vocab_size, seed=REFERENCE_SEED).requires_grad_(False)
        enable_packed_attention(reference_model)  # as load_model gives every model that can take it
        reference = LiveReference(reference_model)
        params = dict(model.named_parameters())
    objective.attach(model)
    if objective_state is not None:
        objective.load_state_dict(objective_state)
        params.update(objective.trainable_parameters())
    model.train()
    # Packed as the loop packs: padding-free, each pair's prompt computed once for both completions.
    padding_free = packing and uses_packed_attention(model)
    layout = BatchLayout(256, packing, 0, padding_free, share_prefixes=padding_free)
    if samples is None:
        samples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in PAIRS]
    samples = [{**sample, "row": i} for i, sample in enumerate(samples)]
    batches = objective.forward_batches(samples, layout, max_tokens)
    totals = StepTotals()
    for batch in batches:
        totals.add_counts(batch.counts)
    loss_sum = 0.0
    for batch in batches:
        output = objective.output(model, batch, reference)
        loss = step_loss(output, totals.counts)
        loss.backward()
        loss_sum += loss.item()
        totals.add(output)
    grads = {name: p.grad.detach().clone() for name, p in params.items()}
    return {"loss": loss_sum, "metrics": totals.figures(objective), "grads": grads, "forwards": len(batches)}


def assert_matches(mine: dict, theirs: dict, metrics: list[str], rtol: float = 1e-5) -> None:
    assert abs(mine["loss"] - theirs["loss"]) <= rtol * max(1.0, abs(theirs["loss"])), (mine["loss"], theirs["loss"])
    for key in metrics:
        assert abs(mine["metrics"][key] - theirs["metrics"][key]) <= rtol * max(1.0, abs(theirs["metrics"][key])), (key, mine["metrics"][key], theirs["metrics"][key])
    their_grads = {name: g for name, g in theirs["grads"].items()}
    assert sorted(mine["grads"]) == sorted(their_grads), (sorted(mine["grads"])[:3], sorted(their_grads)[:3])
    for name, grad in mine["grads"].items():
        scale = their_grads[name].abs().max().item()
        assert scale > 0, f"{name}: no gradient to compare"
        torch.testing.assert_close(grad, their_grads[name], rtol=rtol, atol=rtol * scale, msg=name)
