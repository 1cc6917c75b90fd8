"""GaLore (train.optimizer: galore): one step against the paper's equations, the projection's
refresh period, equality with AdamW at full rank, the rank-r state, parameter targeting and
groups, exact resume after a crash, a loss that goes down, and bad options."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from helpers import assert_tensors_equal, load_adapter, read_metrics, tiny_run_config, write_records_data
from peft_oracle import assert_close, attach
from tunelab.config import parse_config
from tunelab.errors import TunelabError
from tunelab.train import loop
from tunelab.train.galore import GaLoreAdamW, galore_param_groups

ADAM = {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}


def galore_optimizer(params: list[torch.Tensor], rank: int, update_every: int, scale: float) -> GaLoreAdamW:
    group = {"params": params, "galore_rank": rank, "galore_update_every": update_every, "galore_scale": scale}
    return GaLoreAdamW([group], **ADAM)


def step_with(optimizer, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    optimizer.step()


def reference_galore(weight: torch.Tensor, grads: list[torch.Tensor], rank: int, scale: float) -> torch.Tensor:
    """The paper's steps in float64, with P taken once from the first gradient (T ≥ len(grads))."""
    lr, (beta1, beta2), eps, wd = ADAM["lr"], ADAM["betas"], ADAM["eps"], ADAM["weight_decay"]
    w = weight.double()
    m, n = w.shape
    u, _, vh = torch.linalg.svd(grads[0].double(), full_matrices=False)
    left = m <= n
    p = u[:, :rank] if left else vh[:rank].T
    first = second = 0
    for t, grad in enumerate(grads, start=1):
        g = grad.double()
        r = p.T @ g if left else g @ p
        first = beta1 * first + (1 - beta1) * r
        second = beta2 * second + (1 - beta2) * r * r
        adam = (first / (1 - beta1**t)) / ((second / (1 - beta2**t)).sqrt() + eps)
        back = p @ adam if left else adam @ p.T
        w = w - lr * wd * w - lr * scale * back
    return w


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)], ids=["left m<n", "right m>n"])
def test_steps_equal_the_equations(shape):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator)
    grads = [torch.randn(shape, generator=generator) for _ in range(3)]
    param = weight.clone()
    optimizer = galore_optimizer([param], rank=2, update_every=3, scale=0.25)
    for grad in grads:
        step_with(optimizer, [param], [grad])
    assert_close(param.double(), reference_galore(weight, grads, rank=2, scale=0.25), 1e-6, "weights after 3 steps")
    assert not torch.allclose(param, weight)


def test_projection_refreshes_every_T_steps_from_the_current_gradient():
    generator = torch.Generator().manual_seed(1)
    param = torch.randn(8, 12, generator=generator)
    optimizer = galore_optimizer([param], rank=3, update_every=3, scale=0.25)
    projectors, refreshed = [], []
    for _ in range(8):
        grad = torch.randn(8, 12, generator=generator)
        step_with(optimizer, [param], [grad])
        projector = optimizer.state[param]["projector"].clone()
        refreshed.append(not projectors or not torch.equal(projector, projectors[-1]))
        projectors.append(projector)
        if refreshed[-1]:
            u = torch.linalg.svd(grad.double())[0][:, :3]
            # The span of the top-3 left singular vectors of this step's gradient (signs aside).
            assert_close((projector @ projector.T).double(), u @ u.T, 1e-5, "projector")
    assert refreshed == [True, False, False, True, False, False, True, False]


def test_full_rank_and_scale_1_is_adamw():
    generator = torch.Generator().manual_seed(2)
    start = [torch.randn(5, 8, generator=generator), torch.randn(8, 5, generator=generator), torch.randn(5, generator=generator)]
    ours = [t.clone() for t in start]
    theirs = [t.clone() for t in start]
    galore = GaLoreAdamW([{"params": ours[:2], "galore_rank": 8, "galore_update_every": 2, "galore_scale": 1.0}, {"params": ours[2:]}], **ADAM)
    adamw = torch.optim.AdamW(theirs, **ADAM)
    for _ in range(5):
        grads = [torch.randn(t.shape, generator=generator) for t in start]
        step_with(galore, ours, grads)
        step_with(adamw, theirs, grads)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a, b, 1e-6, f"tensor {k}")
        assert "projector" not in galore.state[ours[k]]
    assert not torch.allclose(ours[0], start[0])


def test_state_is_rank_r_per_targeted_matrix():
    r = 2
    params = [torch.randn(6, 10), torch.randn(10, 6)]
    optimizer = galore_optimizer(params, rank=r, update_every=5, scale=0.25)
    step_with(optimizer, params, [torch.randn(6, 10), torch.randn(10, 6)])
    left, right = optimizer.state[params[0]], optimizer.state[params[1]]
    # m ≤ n: P (m × r), moments (r × n); m > n: P (n × r), moments (m × r); never m × n.
    assert left["projector"].shape == (6, r) and left["exp_avg"].shape == left["exp_avg_sq"].shape == (r, 10)
    assert right["projector"].shape == (6, r) and right["exp_avg"].shape == right["exp_avg_sq"].shape == (10, r)
    assert all(isinstance(v, torch.Tensor) for state in (left, right) for v in state.values())


def test_full_finetune_state_on_the_tiny_model():
    model, method = attach({"name": "full"})
    r = 8
    optimizer = GaLoreAdamW(galore_param_groups(model, method.param_groups(model), "attention-mlp", r, 200, 0.25), **ADAM)
    names = {id(p): name for name, p in model.named_parameters()}
    model(input_ids=torch.tensor([[1, 17, 42, 99, 7]]), labels=torch.tensor([[1, 17, 42, 99, 7]])).loss.backward()
    optimizer.step()
    projected = {}
    for param, state in optimizer.state.items():
        if "projector" in state:
            m, n = param.shape
            assert state["exp_avg"].numel() == r * (n if m <= n else m) < m * n
            projected[names[id(param)]] = state["exp_avg"].shape
        else:
            assert state["exp_avg"].shape == param.shape
    # The paper's targets: every attention and MLP linear layer, nothing else (embeddings, norms).
    expected = {n for n, _ in model.named_parameters() if n.endswith("proj.weight")}
    assert set(projected) == expected and len(expected) == 14


def test_target_patterns_and_lr_scale_groups():
    model, method = attach({"name": "lora", "r": 16, "lora_plus_ratio": 4.0})
    groups = method.param_groups(model)
    split = galore_param_groups(model, groups, ["lora_B"], 4, 200, 0.25)
    names = {id(p): name for name, p in model.named_parameters()}
    source_scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert sorted(id(p) for g in split for p in g["params"]) == sorted(source_scale)
    for group in split:
        assert all(group["lr_scale"] == source_scale[id(p)] for p in group["params"])
        targeted = group.get("galore_rank") == 4
        assert all((".lora_B" in names[id(p)]) == targeted for p in group["params"])
    assert {(g["lr_scale"], g.get("galore_rank")) for g in split} == {(1.0, None), (4.0, 4)}

    prompt_model, prompt = attach({"name": "prompt_tuning", "num_virtual_tokens": 4})
    with pytest.raises(TunelabError, match=r"train\.galore_target"):
        galore_param_groups(prompt_model, prompt.param_groups(prompt_model), "attention-mlp", 4, 200, 0.25)


@pytest.fixture(scope="module")
def records(module_cache, tmp_path_factory):
    return write_records_data(tmp_path_factory.mktemp("records"), n_train=16)


class Crash(Exception):
    """Stands for a kill: the run stops mid-step, after its last checkpoint."""


def test_resume_after_a_crash_is_bitwise_exact(tmp_path, records, monkeypatch):
    train_file, _ = records
    # LoRA r=16 with GaLore rank 4 projects both sides (A is 16 x 64, B 64 x 16). P refreshes at
    # steps 1, 4 and 7; the checkpoint at step 5 holds step 4's P, which step 6 must reuse.
    galore = {"optimizer": "galore", "galore_rank": 4, "galore_update_every": 3, "weight_decay": 0.01}
    train = {"max_steps": 8, "save_every": 5, "lr": 1e-2, **galore}
    reference = tiny_run_config(tmp_path / "reference", train_file, method={"r": 16}, train=train)
    tunelab.train(reference)

    crashed = tiny_run_config(tmp_path / "crashed", train_file, method={"r": 16}, train=train)
    real_lr_at = loop.lr_at

    def crash_at_step_7(step, *args):
        if step == 7:
            raise Crash
        return real_lr_at(step, *args)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "lr_at", crash_at_step_7)
        with pytest.raises(Crash):
            tunelab.train(crashed)
    saved = load_file(tmp_path / "crashed" / "checkpoints" / "step-5" / "optimizer.safetensors")
    assert {tuple(t.shape) for k, t in saved.items() if k.endswith(".projector")} == {(16, 4)}

    assert tunelab.train(crashed, resume=True).report["resumed_from_step"] == 5
    assert_tensors_equal(load_adapter(crashed["output"]), load_adapter(reference["output"]))
    assert [m["loss"] for m in read_metrics(crashed["output"])] == [m["loss"] for m in read_metrics(reference["output"])]


def test_full_finetune_loss_goes_down(tmp_path, records):
    train_file, _ = records
    config = tiny_run_config(
        tmp_path / "run",
        train_file,
        method={"name": "full"},
        train={"max_steps": 12, "lr": 1e-2, "optimizer": "galore", "galore_rank": 8, "galore_update_every": 4},
    )
    tunelab.train(config)
    losses = [m["loss"] for m in read_metrics(config["output"])]
    assert len(losses) == 12 and max(losses[-3:]) < losses[0] - 1.0, losses  # ~5.5 -> ~2.8


@pytest.mark.parametrize(
    "train, key",
    [
        ({"optimizer": "galore", "galore_rank": 0}, "train.galore_rank"),
        ({"optimizer": "galore", "galore_update_every": 0}, "train.galore_update_every"),
        ({"optimizer": "galore", "galore_scale": 0}, "train.galore_scale"),
        ({"optimizer": "galore", "galore_target": []}, "train.galore_target"),
        ({"galore_rank": 8}, "train.galore_rank"),
        ({"optimizer": "adamw", "galore_target": ["q_proj"]}, "train.galore_target"),
        ({"optimizer": "sgd"}, "train.optimizer"),
    ],
)
def test_bad_options_name_the_key(train, key):
    with pytest.raises(TunelabError, match=key.replace(".", r"\.")):
        parse_config({"model": "tiny-random-llama", "data": {"train": "x"}, "train": train})


def test_defaults_only_under_galore():
    adamw = parse_config({"model": "tiny-random-llama", "data": {"train": "x"}}).train
    galore = parse_config({"model": "tiny-random-llama", "data": {"train": "x"}, "train": {"optimizer": "galore"}}).train
    assert (adamw.galore_rank, adamw.galore_update_every, adamw.galore_scale, adamw.galore_target) == (None,) * 4
    assert (galore.galore_rank, galore.galore_update_every, galore.galore_scale, galore.galore_target) == (128, 200, 0.25, "attention-mlp")
