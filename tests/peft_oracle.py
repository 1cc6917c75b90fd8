"""Checks every peft-family method runs against the peft library itself (the reference).

- `assert_equal_to_peft`: the same tiny model twice, the method attached by tunelab and by peft,
  tunelab's (randomized) tensors copied into peft through tunelab's peft export: forward logits and
  the gradients of every trainable tensor agree (relative to their scale).
- `assert_merge_exact`: merged and unmerged logits agree to 1e-4.
- `assert_round_trips`: `tunelab export --format peft` of a trained run loads in
  `peft.PeftModel.from_pretrained` with equal logits, and a peft-saved adapter imported by tunelab
  (`import_peft`) gives peft's logits.
- `trainable_count`: the number of trainable parameters a method leaves on a model.

Import from a test module as `from peft_oracle import ...`.
"""

from __future__ import annotations

from pathlib import Path

import peft
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

import tunelab
from helpers import tiny_run_config, train_keeping_model, write_records_data
from tunelab.config import parse_config
from tunelab.data.batching import make_batch
from tunelab.export import export_run, import_peft
from tunelab.methods import build_method
from tunelab.models.tiny import tiny_llama, tiny_tokenizer
from tunelab.runs import load_run

PROBE_TEXT = "On March 3, 2021, Maria Lopez (34) from Lisbon paid $1,299.00."


def fresh_base(seed: int = 1234):
    return tiny_llama(len(tiny_tokenizer()), seed=seed)


def probe_ids(text: str = PROBE_TEXT) -> torch.Tensor:
    return tiny_tokenizer()(text, return_tensors="pt").input_ids


def smollm2_skeleton():
    """SmolLM2-135M's architecture on the meta device (no weights): for parameter counts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def method_of(options: dict):
    """The method object for a `method:` config mapping (validated as in a run config)."""
    config = parse_config({"model": "tiny-random-llama", "data": {"train": "x"}, "method": options})
    return build_method(config.method)


def attach(options: dict, model=None):
    """(model, method): `options` attached to a fresh tiny model (or to `model`)."""
    model = fresh_base() if model is None else model
    method = method_of(options)
    method.attach(model)
    return model, method


def trainable_count(options: dict, model=None) -> int:
    model, method = attach(options, model)
    return sum(p.numel() for p in method.trainable_parameters(model).values())


@torch.no_grad()
def randomize(method, model, scale: float = 0.1, seed: int = 0) -> None:
    """Move every trainable tensor away from its init (a zero-init B would hide a wrong formula)."""
    generator = torch.Generator().manual_seed(seed)
    for param in method.trainable_parameters(model).values():
        param.add_(torch.randn(param.shape, generator=generator) * scale)


def _logits_and_loss(model, input_ids: torch.Tensor):
    out = model(input_ids=input_ids, labels=input_ids)
    return out.logits, out.loss


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """max |actual − expected| ≤ rtol · max |expected| (a scale-aware bound, as the issue asks)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= rtol * scale + 1e-12, f"{what}: max abs diff {error:.3g} > {rtol} x {scale:.3g}"


def copy_into_peft(method, model, peft_model) -> None:
    """tunelab's tensors, through tunelab's peft export, into the peft model (all keys must land)."""
    _, tensors = method.peft_export(model)
    result = set_peft_model_state_dict(peft_model, tensors)
    if peft_model.active_peft_config.is_prompt_learning:
        # peft loads the virtual-token table into its prompt encoder itself (and still lists its key
        # as unexpected): check that it landed.
        table = peft_model.get_prompt_embedding_to_save("default")
        assert torch.equal(table, tensors["prompt_embeddings"]), "peft did not take tunelab's virtual tokens"
        return
    unexpected = [k for k in result.unexpected_keys if "base_layer" not in k]
    assert not unexpected, f"peft did not take tunelab's tensors: {unexpected[:5]}"


def _by_storage(named: dict[str, torch.Tensor]) -> dict[int, str]:
    return {t.data_ptr(): name for name, t in named.items()}


def assert_equal_to_peft(options: dict, peft_config, *, rtol: float = 1e-5, scale: float = 0.1, input_ids=None) -> None:
    """Logits and trainable-tensor gradients of tunelab's method equal peft's, from the same tensors."""
    input_ids = probe_ids() if input_ids is None else input_ids
    model, method = attach(options)
    randomize(method, model, scale)
    peft_model = get_peft_model(fresh_base(), peft_config)
    copy_into_peft(method, model, peft_model)
    model.train(), peft_model.train()  # dropout is 0 in these configs; train mode checks the training path
    ours_logits, ours_loss = _logits_and_loss(model, input_ids)
    peft_logits, peft_loss = _logits_and_loss(peft_model, input_ids)
    assert_close(ours_logits, peft_logits, rtol, "logits")
    ours_loss.backward(), peft_loss.backward()

    # Pair each tunelab parameter with peft's by the exported name: both state dicts share storage
    # with the parameters, whatever each library calls them internally.
    _, exported = method.peft_export(model)
    ours_names = _by_storage({k: v for k, v in method.state_dict(model).items()})
    exported_of_ours = {name: f"base_model.model.{name}" for name in ours_names.values()}
    peft_saved = _by_storage(get_peft_model_state_dict(peft_model))
    peft_params = {peft_saved[p.data_ptr()]: p for p in peft_model.parameters() if p.requires_grad and p.data_ptr() in peft_saved}
    compared = 0
    for name, param in method.trainable_parameters(model).items():
        key = exported_of_ours[ours_names[param.data_ptr()]]
        if key in peft_params:
            assert_close(param.grad, peft_params[key].grad, rtol, f"gradient of {name}")
            compared += 1
    assert compared == len(method.trainable_parameters(model)), f"only {compared} gradients paired with peft's"


@torch.no_grad()
def assert_merge_exact(options: dict, atol: float = 1e-4, scale: float = 0.1) -> None:
    """Folding the (randomized) method into the weights leaves the logits unchanged to `atol`."""
    model, method = attach(options)
    randomize(method, model, scale)
    model.eval()
    unmerged = model(input_ids=probe_ids()).logits
    method.merge(model)
    assert not any(p.requires_grad for p in model.parameters()) or method.artifact == "model"
    assert sum(1 for _ in model.named_modules()) == sum(1 for _ in fresh_base().named_modules()), "merge left wrapper modules"
    merged = model(input_ids=probe_ids()).logits
    assert (merged - unmerged).abs().max().item() <= atol


def tiny_method_config(directory: Path, options: dict, steps: int = 2, lr: float = 1e-2) -> dict:
    """A short tunelab run of the method at a high learning rate (its tensors move far from init)."""
    train_file = write_records_data(directory / "data", n_train=8)[0]
    return tiny_run_config(directory / "run", train_file, method=options, train={"max_steps": steps, "lr": lr})


def train_tiny_run(directory: Path, options: dict, steps: int = 2, lr: float = 1e-2) -> Path:
    return tunelab.train(tiny_method_config(directory, options, steps, lr)).output_dir


def train_tiny_run_checked(monkeypatch, directory: Path, options: dict, steps: int = 3, lr: float = 1e-2) -> tuple[Path, dict]:
    """A short run, checked: every trainable tensor moved, every base weight outside them is bitwise
    the untrained model's (a wrapped layer keeps its weight as `base_layer`), and the saved run
    reloads to the model it trained. Returns the run directory and `train_keeping_model`'s `kept`."""
    result, kept = train_keeping_model(monkeypatch, tiny_method_config(directory, options, steps, lr))
    model, method = kept["model"], kept["method"]
    trainable = method.trainable_parameters(model)
    still = [n for n, p in trainable.items() if torch.equal(p, kept["initial"][id(p)])]
    assert not still, f"trainable tensors did not move: {still[:5]}"
    untrained = dict(fresh_base().named_parameters())
    trained_ids = {id(p) for p in trainable.values()}
    frozen = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if id(p) not in trained_ids}
    changed = [n for n, p in frozen.items() if n in untrained and not torch.equal(p, untrained[n])]
    assert not changed, f"frozen weights changed: {changed[:5]}"
    # Buffers that select what trains (columns, indices, layers) must come back too.
    with torch.no_grad():
        reloaded = load_run(result.output_dir).model.eval()(input_ids=probe_ids()).logits
        assert_close(reloaded, model.eval()(input_ids=probe_ids()).logits, 1e-6, "reloaded run")
    return result.output_dir, kept


def assert_round_trips(options: dict, peft_config, directory: Path, scale: float = 0.1) -> None:
    """tunelab → peft (export of a trained run) and peft → tunelab (import) keep the logits."""
    run = train_tiny_run(directory / "tunelab", options)
    with torch.no_grad():
        _assert_export_and_import(run, peft_config, directory, scale)


def _assert_export_and_import(run: Path, peft_config, directory: Path, scale: float) -> None:
    export_run(run, "peft", directory / "exported")
    peft_model = peft.PeftModel.from_pretrained(fresh_base(), directory / "exported").eval()
    ours = load_run(run).model.eval()
    assert_close(peft_model(input_ids=probe_ids()).logits, ours(input_ids=probe_ids()).logits, 1e-5, "peft-loaded export")

    saved = get_peft_model(fresh_base(), peft_config)
    generator = torch.Generator().manual_seed(1)
    for param in saved.parameters():
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    saved.save_pretrained(directory / "peft-saved")
    imported = import_peft(directory / "peft-saved", directory / "imported", model="tiny-random-llama")
    ours = load_run(imported).model.eval()
    assert_close(ours(input_ids=probe_ids()).logits, saved.eval()(input_ids=probe_ids()).logits, 1e-5, "imported peft adapter")


# ---- Methods with a `prepare` step (a selection made on the first batches before training)


def prepare_batches(n: int = 3) -> list:
    """`n` fixed batches of two random token rows each, the second half of every row a target."""
    generator = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(n):
        samples = []
        for length in (12, 9):
            ids = torch.randint(3, 200, (length,), generator=generator).tolist()
            samples.append({"input_ids": ids, "target_mask": [k >= length // 2 for k in range(length)]})
        batches.append(make_batch(samples, 64, False, 0))
    return batches


def forbid_prepare(monkeypatch, method_class) -> None:
    """Make `method_class.prepare` fail the test if anything calls it (a resume or a reload must not)."""

    def refuse(*args, **kwargs):
        raise AssertionError("prepare must not run here")

    monkeypatch.setattr(method_class, "prepare", refuse)
