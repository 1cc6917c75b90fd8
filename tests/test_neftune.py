"""NEFTune (train.neftune_alpha): the noise's per-sample scale α/√(L·d) in packed and padded rows,
its composition with prompt tuning's virtual tokens, no noise in eval loss, generation or
model.eval(), exact resume after a crash, alpha 0 == off, and bad values."""

from __future__ import annotations

import math

import pytest
import torch

import tunelab
from helpers import assert_tensors_equal, load_adapter, read_metrics, tiny_run_config, write_records_data
from peft_oracle import assert_close, attach, fresh_base, randomize
from tunelab.config import parse_config
from tunelab.data.batching import make_batch, pack_rows
from tunelab.errors import TunelabError
from tunelab.eval.loss import evaluate_loss
from tunelab.generation import generate
from tunelab.models.attention import enable_packed_attention
from tunelab.models.tiny import tiny_tokenizer
from tunelab.train import loop
from tunelab.train.neftune import add_embedding_noise

ALPHA = 5.0
LENGTHS = [5, 9, 3]
# How make_batch lays the samples out: (batch arguments, the rows as lists of sample indices).
LAYOUTS = {
    "padding-free": ({"packing": True, "padding_free": True}, [[0, 1, 2]]),
    "mask-packed": ({"packing": True}, pack_rows(LENGTHS, 64)),
    "padded": ({"packing": False}, [[0], [1], [2]]),
}


def samples(lengths=LENGTHS) -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(1, 250, (n,), generator=generator).tolist(), "target_mask": [True] * n} for n in lengths]


def backbone_inputs(model, batch, seed: int) -> torch.Tensor:
    """The embeddings the backbone's layers get (after every pre-hook) in a training forward."""
    seen = {}
    handle = model.model.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    model.train()
    torch.manual_seed(seed)
    model(**batch.model_inputs(), use_cache=False)
    handle.remove()
    return seen["inputs_embeds"].detach()


def expected_noise(rows: list[list[int]], width: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, real-token mask): ε ~ U(−1, 1) from the seed, times α/√(L·d) with L each token's own
    sample length (padding excluded)."""
    torch.manual_seed(seed)
    eps = torch.empty(len(rows), width, d).uniform_(-1, 1)
    scale = torch.zeros(len(rows), width, 1)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            scale[r, start : start + LENGTHS[i]] = ALPHA / math.sqrt(LENGTHS[i] * d)
            start += LENGTHS[i]
    return eps * scale, scale[..., 0] > 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_noise_is_alpha_over_sqrt_Ld_per_sample(layout):
    arguments, rows = LAYOUTS[layout]
    model = fresh_base()
    enable_packed_attention(model)
    add_embedding_noise(model, ALPHA)
    batch = make_batch(samples(), 64, pad_id=0, **arguments)
    assert batch.input_ids.shape[0] == len(rows)
    clean = model.get_input_embeddings()(batch.input_ids).detach()
    noise, real = expected_noise(rows, batch.input_ids.shape[1], clean.shape[-1], seed=7)
    noisy = backbone_inputs(model, batch, seed=7)
    assert_close((noisy - clean)[real], noise[real], 1e-5, f"noise ({layout})")


@pytest.mark.parametrize("layout", ["padding-free", "padded"])
def test_virtual_tokens_stay_noise_free(layout):
    arguments, rows = LAYOUTS[layout]
    n = 4
    model, method = attach({"name": "prompt_tuning", "num_virtual_tokens": n})
    enable_packed_attention(model)
    randomize(method, model)
    add_embedding_noise(model, ALPHA)
    batch = make_batch(samples(), 64, pad_id=0, **arguments)
    clean = model.get_input_embeddings()(batch.input_ids).detach()
    noise, _ = expected_noise(rows, batch.input_ids.shape[1], clean.shape[-1], seed=7)
    noisy_tokens = clean + noise
    prompt = method.prompt_embeddings().detach()
    if layout == "padding-free":  # the virtual tokens before each sample
        bounds = batch.cu_seq_lens.tolist()
        expected = torch.cat([t for a, b in zip(bounds, bounds[1:]) for t in (prompt, noisy_tokens[0, a:b])])[None]
    else:  # the virtual tokens at the start of each row
        expected = torch.cat([prompt.expand(len(rows), -1, -1), noisy_tokens], dim=1)
    noisy = backbone_inputs(model, batch, seed=7)
    if layout == "padding-free":
        assert_close(noisy, expected, 1e-6, "virtual tokens and noisy samples")
        virtual = torch.cat([torch.arange(a + n * k, a + n * (k + 1)) for k, a in enumerate(bounds[:-1])])
        assert torch.equal(noisy[0, virtual], prompt.repeat(len(bounds) - 1, 1))
    else:
        assert torch.equal(noisy[:, :n], expected[:, :n])
        real = torch.arange(batch.input_ids.shape[1])[None, :] < torch.tensor(LENGTHS)[:, None]  # padding may hold anything
        assert_close(noisy[:, n:][real], expected[:, n:][real], 1e-6, "noisy tokens after the virtual ones")


def test_no_noise_in_eval_loss_generation_or_eval_mode():
    plain, noisy = fresh_base(), fresh_base()
    add_embedding_noise(noisy, 50.0)
    ids = torch.tensor([[1, 17, 42, 99, 7, 23]])
    plain.eval(), noisy.eval()
    with torch.no_grad():
        assert torch.equal(noisy(input_ids=ids).logits, plain(input_ids=ids).logits)
        noisy.train()
        assert not torch.allclose(noisy(input_ids=ids).logits, plain(input_ids=ids).logits), "training forwards get noise"

    data = samples()
    plain.train(), noisy.train()  # evaluate_loss and generate must switch the noise off themselves
    assert evaluate_loss(noisy, data, 2, 64, False, 0) == evaluate_loss(plain, data, 2, 64, False, 0)
    plain.train(), noisy.train()
    prompts = ["Name: Ana", "Hi"]
    assert generate(noisy, tiny_tokenizer(), prompts, max_new_tokens=6) == generate(plain, tiny_tokenizer(), prompts, max_new_tokens=6)


@pytest.fixture(scope="module")
def records(module_cache, tmp_path_factory):
    return write_records_data(tmp_path_factory.mktemp("records"), n_train=16)


class Crash(Exception):
    """Stands for a kill: the run stops mid-step, after its last checkpoint."""


def test_resume_after_a_crash_is_bitwise_exact(tmp_path, records, monkeypatch):
    train_file, _ = records
    train = {"max_steps": 6, "save_every": 3, "lr": 1e-2, "neftune_alpha": ALPHA}
    reference = tiny_run_config(tmp_path / "reference", train_file, train=train)
    tunelab.train(reference)

    crashed = tiny_run_config(tmp_path / "crashed", train_file, train=train)
    real_lr_at = loop.lr_at

    def crash_at_step_5(step, *args):
        if step == 5:
            raise Crash
        return real_lr_at(step, *args)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "lr_at", crash_at_step_5)
        with pytest.raises(Crash):
            tunelab.train(crashed)
    assert tunelab.train(crashed, resume=True).report["resumed_from_step"] == 3
    assert_tensors_equal(load_adapter(crashed["output"]), load_adapter(reference["output"]))
    assert [m["loss"] for m in read_metrics(crashed["output"])] == [m["loss"] for m in read_metrics(reference["output"])]


def test_alpha_zero_is_off(tmp_path, records):
    train_file, _ = records
    losses = {}
    for alpha in (None, 0.0, ALPHA):
        config = tiny_run_config(tmp_path / f"alpha-{alpha}", train_file, train={"neftune_alpha": alpha, "lr": 1e-2})
        tunelab.train(config)
        losses[alpha] = [m["loss"] for m in read_metrics(config["output"])]
    assert losses[0.0] == losses[None]
    assert losses[ALPHA] != losses[None]


def test_negative_alpha_fails_naming_the_key():
    with pytest.raises(TunelabError, match=r"train\.neftune_alpha"):
        parse_config({"model": "tiny-random-llama", "data": {"train": "x"}, "train": {"neftune_alpha": -1.0}})
