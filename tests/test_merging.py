"""`tunelab merge` and the merge arithmetic (tunelab/merging) against independent references.

- The tensor math against peft's `merge_utils` (task_arithmetic, magnitude_prune, ties, DARE with
  the same random masks injected), and against formulas written out here (weighted TIES, SLERP's
  closed form, LoRA stacking, truncated-SVD errors).
- Whole merges of full checkpoints against mergekit itself, run on the same YAML.
- Merges of LoRA runs against sums of the runs' own adapter tensors; `output: lora` applied by peft
  against the merged checkpoint; a non-plain-LoRA run against `tunelab export --format merged`.
- Bad inputs: one clear error line, exit 1, nothing written at --out.

Every expected value is computed here, from the inputs, never by the code under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import yaml
from peft.utils import merge_utils
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import tunelab
from helpers import TINY_MODEL, assert_clean_failure, invoke, load_adapter, tiny_run_config, tree_state, write_records_data, write_yaml
from peft_oracle import fresh_base, probe_ids
from tunelab.export import export_run
from tunelab.merging.tensors import linear_weights, magnitude_prune, merge_task_vectors, slerp, stack_lora_factors, truncated_svd
from tunelab.models.tiny import tiny_tokenizer

SHAPES = [(7,), (5, 6), (3, 4, 5)]
ATOL = 1e-6


def random_tasks(shape: tuple, count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def assert_allclose(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert error <= atol, f"{what}: max abs diff {error:.3g} > {atol}"


# ---- Hand-written references


def prune_by_hand(values: np.ndarray, density: float) -> np.ndarray:
    """The `max(1, int(density·n))` largest-magnitude entries kept, the rest zeroed (flat float64)."""
    if density >= 1:
        return values.copy()
    keep = max(1, int(density * values.size))
    largest = np.argsort(-np.abs(values), kind="stable")[:keep]
    kept = np.zeros_like(values)
    kept[largest] = values[largest]
    return kept


def ties_by_hand(tasks: list[torch.Tensor], weights: list[float], densities: list[float]) -> torch.Tensor:
    """TIES, entry by entry: each task vector pruned to its density by magnitude and weighted; the
    elected sign is that of the weighted sum (+ on 0); the result is the sum of the weighted values
    that carry the elected sign divided by the sum of their weights (1 where none does)."""
    weighted = np.stack([w * prune_by_hand(t.double().reshape(-1).numpy(), d) for t, w, d in zip(tasks, weights, densities, strict=True)])
    elected = np.where(weighted.sum(axis=0) >= 0, 1.0, -1.0)
    agrees = np.sign(weighted) == elected  # a pruned (zero) entry agrees with no sign
    divisor = (np.array(weights)[:, None] * agrees).sum(axis=0)
    merged = (weighted * agrees).sum(axis=0) / np.where(divisor == 0, 1.0, divisor)
    return torch.from_numpy(merged).reshape(tasks[0].shape)


def truncation_error_by_hand(delta: torch.Tensor, rank: int) -> float:
    """‖ΔW − best rank-k approximation‖_F / ‖ΔW‖_F, from numpy's singular values."""
    singular = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    return math.sqrt(float((singular[rank:] ** 2).sum() / (singular**2).sum()))


# ---- 1. The tensor math against peft's merge_utils


@pytest.mark.parametrize("shape", SHAPES)
def test_task_arithmetic_equals_peft(shape):
    tasks, weights = random_tasks(shape), [0.7, -0.3, 1.4]
    ours = merge_task_vectors("task_arithmetic", tasks, weights, [1.0] * 3, normalize=False, rescale=False, scale=1.0)
    assert_allclose(ours, merge_utils.task_arithmetic(tasks, torch.tensor(weights)))


@pytest.mark.parametrize("shape", SHAPES)
def test_magnitude_prune_equals_peft(shape):
    tasks, weights = random_tasks(shape, seed=1), [0.7, -0.3, 1.4]
    ours = merge_task_vectors("magnitude_prune", tasks, weights, [0.5] * 3, normalize=False, rescale=False, scale=1.0)
    assert_allclose(ours, merge_utils.magnitude_prune(tasks, torch.tensor(weights), 0.5))
    # The pruning does something: not plain task arithmetic.
    assert not torch.allclose(ours, merge_utils.task_arithmetic(tasks, torch.tensor(weights)))


@pytest.mark.parametrize("shape", SHAPES)
def test_magnitude_prune_keeps_the_largest_entries(shape):
    (tensor,) = random_tasks(shape, count=1, seed=2)
    for density in (0.0, 0.1, 0.5, 0.99, 1.0):
        expected = torch.from_numpy(prune_by_hand(tensor.double().reshape(-1).numpy(), density)).reshape(shape) if density > 0 else torch.zeros(shape)
        assert torch.equal(magnitude_prune(tensor, density).double(), expected.double()), density


@pytest.mark.parametrize("shape", SHAPES)
def test_ties_with_unit_weights_equals_peft(shape):
    """peft's disjoint merge divides by the count of inputs agreeing with the elected sign, and
    elects the sign of the unweighted sum; mergekit (and tunelab) divide by the summed weights of the
    agreeing inputs and elect the sign of the weighted sum: the same with unit weights."""
    tasks = random_tasks(shape, seed=3)
    ours = merge_task_vectors("ties", tasks, [1.0] * 3, [0.5] * 3, normalize=True, rescale=False, scale=1.0)
    assert_allclose(ours, merge_utils.ties(tasks, torch.ones(3), 0.5))


@pytest.mark.parametrize("shape", SHAPES)
def test_weighted_ties_is_the_weighted_disjoint_mean(shape):
    tasks, weights, densities = random_tasks(shape, seed=4), [0.4, 1.7, 0.9], [0.5, 0.8, 0.3]
    ours = merge_task_vectors("ties", tasks, weights, densities, normalize=True, rescale=False, scale=1.0)
    assert_allclose(ours, ties_by_hand(tasks, weights, densities))
    # lambda scales, normalize: false leaves the sum undivided.
    scaled = merge_task_vectors("ties", tasks, weights, densities, normalize=True, rescale=False, scale=0.6)
    assert_allclose(scaled, 0.6 * ties_by_hand(tasks, weights, densities))
    unnormalized = merge_task_vectors("ties", tasks, weights, densities, normalize=False, rescale=False, scale=1.0)
    assert not torch.allclose(unnormalized, ours)


def with_masks_of(monkeypatch, seed: int, merge):
    """`merge()` (a peft merge_utils call) with `torch.bernoulli` drawing from a generator seeded
    `seed`: the masks tunelab's random_prune draws, input after input, from the same seed."""
    real_bernoulli, generator = torch.bernoulli, torch.Generator().manual_seed(seed)
    calls = []

    def seeded_bernoulli(input, *args, **kwargs):  # noqa: A002  (torch's own argument name)
        calls.append(input.shape)
        return real_bernoulli(input, generator=generator)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "bernoulli", seeded_bernoulli)
        result = merge()
    assert len(calls) == 3, calls  # peft drew one mask per input
    return result


@pytest.mark.parametrize("shape", SHAPES)
def test_dare_linear_equals_peft_with_the_same_masks(shape, monkeypatch):
    tasks, weights, density, seed = random_tasks(shape, seed=5), [0.7, -0.3, 1.4], 0.6, 11
    ours = merge_task_vectors("dare_linear", tasks, weights, [density] * 3, normalize=False, rescale=True, scale=1.0, generator=torch.Generator().manual_seed(seed))
    reference = with_masks_of(monkeypatch, seed, lambda: merge_utils.dare_linear(tasks, torch.tensor(weights), density))
    assert_allclose(ours, reference)
    assert not torch.allclose(ours, merge_utils.task_arithmetic(tasks, torch.tensor(weights)))  # something was dropped


@pytest.mark.parametrize("shape", SHAPES)
def test_dare_ties_equals_peft_with_the_same_masks(shape, monkeypatch):
    tasks, density, seed = random_tasks(shape, seed=6), 0.6, 12
    ours = merge_task_vectors("dare_ties", tasks, [1.0] * 3, [density] * 3, normalize=True, rescale=True, scale=1.0, generator=torch.Generator().manual_seed(seed))
    reference = with_masks_of(monkeypatch, seed, lambda: merge_utils.dare_ties(tasks, torch.ones(3), density))
    assert_allclose(ours, reference)


def test_dare_drops_with_the_density_and_rescales_by_it():
    tensor = torch.ones(20000)
    kept = merge_task_vectors("dare_linear", [tensor], [1.0], [0.3], normalize=False, rescale=True, scale=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kept[kept != 0], torch.full_like(kept[kept != 0], 1 / 0.3))
    assert (kept != 0).float().mean().item() == pytest.approx(0.3, abs=0.02)
    unscaled = merge_task_vectors("dare_linear", [tensor], [1.0], [0.3], normalize=False, rescale=False, scale=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unscaled != 0, kept != 0) and set(unscaled.unique().tolist()) <= {0.0, 1.0}


def test_linear_weights():
    assert linear_weights([1.0, 3.0], normalize=True) == [0.25, 0.75]
    assert linear_weights([1.0, 3.0], normalize=False) == [1.0, 3.0]


# ---- 2. SLERP


@pytest.mark.parametrize("shape", SHAPES)
def test_slerp_end_points_are_the_inputs(shape):
    start, end = random_tasks(shape, count=2, seed=7)
    assert torch.equal(slerp(0.0, start, end), start)
    assert torch.equal(slerp(1.0, start, end), end)
    assert slerp(0.5, start, end).dtype == start.dtype


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.85, 1.0])
def test_slerp_closed_form_on_orthonormal_directions(t):
    """a = 3·e1, b = 0.5·(cos φ e1 + sin φ e2) with e1 ⟂ e2 unit vectors: the angle θ is φ by
    construction; the tensors are matrices, taken as one vector each."""
    q, _ = torch.linalg.qr(torch.randn(24, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64))
    e1, e2 = q[:, 0], q[:, 1]
    phi = 1.1
    a, b = 3.0 * e1, 0.5 * (math.cos(phi) * e1 + math.sin(phi) * e2)
    expected = math.sin((1 - t) * phi) / math.sin(phi) * a + math.sin(t * phi) / math.sin(phi) * b
    assert_allclose(slerp(t, a.reshape(4, 6), b.reshape(4, 6)), expected.reshape(4, 6), atol=1e-12)


@pytest.mark.parametrize("factor", [2.5, -0.7, "nearly"])
def test_slerp_of_parallel_inputs_is_linear(factor):
    (a,) = random_tasks((5, 6), count=1, seed=9)
    a = a.double()
    b = a * (1 + 1e-3 * torch.randn(a.shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64)) if factor == "nearly" else factor * a
    for t in (0.2, 0.7):
        assert_allclose(slerp(t, a, b), (1 - t) * a + t * b, atol=1e-12)


# ---- 3. LoRA stacking and truncated SVD


def test_stacked_lora_factors_are_the_weighted_sum():
    generator = torch.Generator().manual_seed(11)
    factors = [(torch.randn(r, 9, generator=generator), torch.randn(7, r, generator=generator), s) for r, s in ((2, 0.5), (3, 2.0), (1, -1.5))]
    coefficients = [0.7, -1.3, 0.4]
    a, b = stack_lora_factors(factors, coefficients)
    assert a.shape == (6, 9) and b.shape == (7, 6)
    expected = sum(c * s * bi @ ai for (ai, bi, s), c in zip(factors, coefficients, strict=True))
    assert_allclose(b @ a, expected, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_truncated_svd_error_is_the_frobenius_error(rank):
    delta = torch.randn(12, 9, generator=torch.Generator().manual_seed(12))
    a, b, error = truncated_svd(delta, rank)
    assert a.shape == (rank, 9) and b.shape == (12, rank)
    actual = ((delta.double() - b.double() @ a.double()).norm() / delta.double().norm()).item()
    assert error == pytest.approx(actual, rel=1e-5, abs=1e-7)
    assert error == pytest.approx(truncation_error_by_hand(delta, rank), rel=1e-6)  # the best rank-k (Eckart–Young)
    assert 0 < error < 1


@pytest.mark.parametrize("rank", [3, 5, 20])
def test_truncated_svd_at_the_true_rank_is_exact(rank):
    generator = torch.Generator().manual_seed(13)
    delta = torch.randn(12, 3, generator=generator) @ torch.randn(3, 9, generator=generator)
    a, b, error = truncated_svd(delta, rank)
    assert error < 1e-6
    assert_allclose(b @ a, delta, atol=1e-5)


# ---- 4. Full checkpoints: tunelab merge against mergekit on the same YAML


def save_checkpoint(model, directory: Path) -> str:
    model.save_pretrained(directory, safe_serialization=True)
    tiny_tokenizer().save_pretrained(directory)
    return str(directory)


# A tied head, as SmolLM2 has: mergekit and tunelab must agree on the one tensor both names share.
@pytest.fixture(scope="module", params=[True], ids=["tied-head"])
def checkpoints(request, module_cache, tmp_path_factory) -> dict[str, str]:
    """A tiny random Llama base and three fine-tunings of it (the base plus small perturbations of
    every tensor), as safetensors checkpoints: name -> directory."""
    root = tmp_path_factory.mktemp("checkpoints")
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=request.param,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = LlamaForCausalLM(config)
    paths = {"base": save_checkpoint(base, root / "base")}
    generator = torch.Generator().manual_seed(1)
    for name in ("m1", "m2", "m3"):
        model = LlamaForCausalLM(config)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
        paths[name] = save_checkpoint(model, root / name)
    return paths


MERGEKIT_CONFIGS = {
    "linear": lambda p: {
        "merge_method": "linear",
        "models": [{"model": p["m1"], "parameters": {"weight": 0.3}}, {"model": p["m2"], "parameters": {"weight": 0.9}}, {"model": p["m3"], "parameters": {"weight": 0.5}}],
    },
    "task_arithmetic": lambda p: {
        "merge_method": "task_arithmetic",
        "base_model": p["base"],
        "models": [{"model": p["m1"], "parameters": {"weight": 0.7}}, {"model": p["m2"], "parameters": {"weight": -0.4}}, {"model": p["m3"], "parameters": {"weight": 1.2}}],
        "parameters": {"lambda": 0.8},
    },
    "ties": lambda p: {
        "merge_method": "ties",
        "base_model": p["base"],
        "models": [
            {"model": p["m1"], "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": p["m2"], "parameters": {"weight": 1.3, "density": 0.7}},
            {"model": p["m3"], "parameters": {"weight": 0.9, "density": 0.3}},
        ],
    },
    "slerp": lambda p: {
        "merge_method": "slerp",
        "base_model": p["base"],
        "models": [{"model": p["base"]}, {"model": p["m1"]}],
        "parameters": {"t": 0.3},
    },
}


def run_mergekit(config_file: Path, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(yaml.safe_load(config_file.read_text()))
    run_merge(config, str(out), MergeOptions(device="cpu", quiet=True, write_model_card=False, copy_tokenizer=False))


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def merge_with_both(tmp_path: Path, config: dict, *overrides: str) -> tuple[dict, dict]:
    """(mergekit's tensors, tunelab's tensors) of `config` (float32), written as one YAML."""
    config_file = write_yaml(tmp_path / "merge.yaml", {**config, "dtype": "float32"})
    run_mergekit(config_file, tmp_path / "mergekit")
    result = invoke("merge", config_file, "--out", tmp_path / "tunelab", *overrides)
    assert result.exit_code == 0, result.output
    return read_checkpoint(tmp_path / "mergekit"), read_checkpoint(tmp_path / "tunelab")


def assert_same_tensors(expected: dict, actual: dict, base: dict) -> None:
    common = sorted(set(expected) & set(actual))
    # Every tensor of the base is compared (a tied head may be written by one side only).
    assert set(base) - {"lm_head.weight"} <= set(common), sorted(set(base) - set(common))
    for name in common:
        assert_allclose(actual[name], expected[name], what=name)


@pytest.mark.parametrize("method", list(MERGEKIT_CONFIGS))
def test_checkpoint_merge_equals_mergekit(method, checkpoints, tmp_path):
    expected, actual = merge_with_both(tmp_path, MERGEKIT_CONFIGS[method](checkpoints))
    base = read_checkpoint(Path(checkpoints["base"]))
    assert_same_tensors(expected, actual, base)
    # Not a no-op: the merge moved the base.
    assert any(not torch.allclose(actual[n], base[n]) for n in base)
    report = json.loads((tmp_path / "tunelab" / "merge.json").read_text())
    assert report["merge_method"] == method and report["output"] == "model"


def test_overrides_change_the_merge_like_the_yaml(checkpoints, tmp_path):
    """`parameters.lambda=0.5` on the command line equals a YAML saying lambda: 0.5."""
    config = MERGEKIT_CONFIGS["task_arithmetic"](checkpoints)
    tunelab_config = write_yaml(tmp_path / "tunelab.yaml", {**config, "dtype": "float32"})
    result = invoke("merge", tunelab_config, "--out", tmp_path / "tunelab", "parameters.lambda=0.5")
    assert result.exit_code == 0, result.output
    run_mergekit(write_yaml(tmp_path / "mergekit.yaml", {**config, "parameters": {"lambda": 0.5}, "dtype": "float32"}), tmp_path / "mergekit")
    assert_same_tensors(read_checkpoint(tmp_path / "mergekit"), read_checkpoint(tmp_path / "tunelab"), read_checkpoint(Path(checkpoints["base"])))
    assert yaml.safe_load((tmp_path / "tunelab" / "merge.yaml").read_text())["parameters"]["lambda"] == 0.5


# ---- 5. LoRA runs


@pytest.fixture(scope="module")
def lora_runs(module_cache, tmp_path_factory) -> dict[str, Path]:
    """Two LoRA runs of tiny-random-llama on different data and seeds: `a` on every linear layer
    (r 4, alpha 8), `b` on the queries and values only (r 2, alpha 3)."""
    runs = {}
    for name, seed, method in (("a", 0, {"target": "all-linear"}), ("b", 1, {"target": ["q_proj", "v_proj"], "r": 2, "alpha": 3.0})):
        train_file, _ = write_records_data(tmp_path_factory.mktemp(f"data-{name}"), n_train=8, seed=seed)
        config = tiny_run_config(tmp_path_factory.mktemp(f"run-{name}") / "run", train_file, method=method, train={"max_steps": 2, "lr": 1e-2, "seed": seed})
        runs[name] = tunelab.train(config).output_dir
    return runs


def lora_updates(run_dir: Path) -> dict[str, torch.Tensor]:
    """s·B·A of each layer the run adapts, by weight name, from its adapter file and config.yaml."""
    method = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["method"]
    scale = method["alpha"] / method["r"]
    tensors = load_adapter(run_dir)
    layers = sorted(name.removesuffix(".lora_A.weight") for name in tensors if name.endswith(".lora_A.weight"))
    return {f"{layer}.weight": scale * (tensors[f"{layer}.lora_B.weight"].float() @ tensors[f"{layer}.lora_A.weight"].float()) for layer in layers}


def base_weights() -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in fresh_base().named_parameters()}


def lora_merge_config(runs: dict, method: str, weights: tuple, **extra) -> dict:
    return {
        "merge_method": method,
        "base_model": TINY_MODEL,
        "models": [{"model": str(runs[name]), "parameters": {"weight": w}} for name, w in zip(("a", "b"), weights, strict=True)],
        **extra,
    }


@torch.no_grad()
def logits_of(model) -> torch.Tensor:
    return model.eval()(input_ids=probe_ids()).logits


@pytest.fixture(scope="module")
def task_arithmetic_of_runs(lora_runs, tmp_path_factory) -> tuple[Path, Path]:
    """task_arithmetic (weights 0.8, -1.5) of the two runs, as a checkpoint and as a LoRA adapter."""
    root = tmp_path_factory.mktemp("task-arithmetic")
    outs = []
    for output in ("model", "lora"):
        config = write_yaml(root / f"{output}.yaml", lora_merge_config(lora_runs, "task_arithmetic", (0.8, -1.5), output=output))
        result = invoke("merge", config, "--out", root / output)
        assert result.exit_code == 0, result.output
        outs.append(root / output)
    return outs[0], outs[1]


def test_task_arithmetic_of_loras_is_the_weighted_sum_of_their_updates(lora_runs, task_arithmetic_of_runs):
    merged = load_file(task_arithmetic_of_runs[0] / "model.safetensors")
    base = base_weights()
    updates = {name: lora_updates(run) for name, run in lora_runs.items()}
    assert set(updates["b"]) < set(updates["a"])  # b adapts a subset of a's layers
    assert set(merged) == set(base)
    for name, value in merged.items():
        expected = base[name] + sum(w * u[name] for w, u in ((0.8, updates["a"]), (-1.5, updates["b"])) if name in u)
        if name in updates["a"]:
            assert_allclose(value, expected, what=name)
            assert not torch.allclose(value, base[name])
        else:  # embeddings, norms: the base's, untouched
            assert torch.equal(value, base[name]), name


def test_a_peft_adapter_merges_like_its_run(lora_runs, task_arithmetic_of_runs, tmp_path):
    """Run b given as its peft export (a directory with adapter_config.json) instead of the run."""
    export_run(lora_runs["b"], "peft", tmp_path / "b-peft")
    config = lora_merge_config({"a": lora_runs["a"], "b": tmp_path / "b-peft"}, "task_arithmetic", (0.8, -1.5))
    merged = load_file(merge_runs(tmp_path, "model", config) / "model.safetensors")
    expected = load_file(task_arithmetic_of_runs[0] / "model.safetensors")
    for name in expected:
        assert_allclose(merged[name], expected[name], what=name)


def test_task_arithmetic_to_lora_is_exact_and_peft_applies_it(task_arithmetic_of_runs):
    model_dir, lora_dir = task_arithmetic_of_runs
    report = json.loads((lora_dir / "merge.json").read_text())
    assert report["output"] == "lora" and report["exact"] is True and report["rank"] == 6  # 4 + 2, stacked
    assert "svd_relative_error" not in report
    adapter = peft.PeftModel.from_pretrained(fresh_base(), lora_dir)
    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected = logits_of(merged)
    assert_allclose(logits_of(adapter), expected, atol=1e-5)
    assert not torch.allclose(logits_of(fresh_base()), expected, atol=1e-3)  # the merge changed the model


def test_ties_to_a_rank_2_lora_reports_its_truncation_error(lora_runs, tmp_path):
    weights, density = (1.0, 0.6), 0.5
    config = write_yaml(tmp_path / "ties.yaml", lora_merge_config(lora_runs, "ties", weights, parameters={"density": density}, output="lora", rank=2))
    result = invoke("merge", config, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert report["exact"] is False and report["rank"] == 2
    errors = report["svd_relative_error"]["by_weight"]
    updates = {name: lora_updates(run) for name, run in lora_runs.items()}
    assert sorted(errors) == sorted(updates["a"])
    assert report["svd_relative_error"]["max"] == pytest.approx(max(errors.values()))
    assert report["svd_relative_error"]["mean"] == pytest.approx(sum(errors.values()) / len(errors))

    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        tasks = [updates[run].get(name, torch.zeros_like(updates["a"][name])) for run in ("a", "b")]
        merged = ties_by_hand(tasks, list(weights), [density, density])
        assert errors[name] == pytest.approx(truncation_error_by_hand(merged, 2), rel=1e-4), name
        # The adapter written is that truncation: its own error against the merged update.
        layer = f"base_model.model.{name.removesuffix('.weight')}"
        written = scale * adapter[f"{layer}.lora_B.weight"].double() @ adapter[f"{layer}.lora_A.weight"].double()
        assert ((merged - written).norm() / merged.norm()).item() == pytest.approx(errors[name], rel=1e-4), name


def merge_runs(tmp_path: Path, name: str, config: dict, *overrides: str) -> Path:
    out = tmp_path / name
    result = invoke("merge", write_yaml(tmp_path / f"{name}.yaml", config), "--out", out, *overrides)
    assert result.exit_code == 0, result.output
    return out


def test_linear_of_loras_to_model_and_to_lora(lora_runs, tmp_path):
    """linear, normalize (the default): weights 1 and 3 are 1/4 and 3/4 of each model, the base's
    share summing to 1: base + ¼ΔW_a + ¾ΔW_b; as a LoRA, exactly that, stacked."""
    config = lora_merge_config(lora_runs, "linear", (1.0, 3.0))
    merged = load_file(merge_runs(tmp_path, "model", config) / "model.safetensors")
    base, updates = base_weights(), {name: lora_updates(run) for name, run in lora_runs.items()}
    for name, value in merged.items():
        expected = base[name] + sum(c * u[name] for c, u in ((0.25, updates["a"]), (0.75, updates["b"])) if name in u)
        assert_allclose(value, expected, what=name)
    lora_dir = merge_runs(tmp_path, "lora", {**config, "output": "lora"})
    assert json.loads((lora_dir / "merge.json").read_text())["exact"] is True
    adapter = peft.PeftModel.from_pretrained(fresh_base(), lora_dir)
    assert_allclose(logits_of(adapter), logits_of(AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)), atol=1e-5)


def slerp_by_hand(t: float, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    a, b = start.double().reshape(-1).numpy(), end.double().reshape(-1).numpy()
    cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    if abs(cos) > 0.9995:
        mixed = (1 - t) * a + t * b
    else:
        theta = math.acos(cos)
        mixed = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
    return torch.from_numpy(mixed).reshape(start.shape)


def test_slerp_of_the_base_and_a_lora_run(lora_runs, tmp_path):
    """slerp, t 0.4, from the base (listed first or not) to base + ΔW: each adapted weight by the
    closed form; the others are the base (slerp of a tensor with itself)."""
    config = {"merge_method": "slerp", "base_model": TINY_MODEL, "models": [{"model": str(lora_runs["a"])}, {"model": TINY_MODEL}], "parameters": {"t": 0.4}}
    merged = load_file(merge_runs(tmp_path, "model", config) / "model.safetensors")
    base, updates = base_weights(), lora_updates(lora_runs["a"])
    for name, value in merged.items():
        if name in updates:
            assert_allclose(value, slerp_by_hand(0.4, base[name], base[name] + updates[name]), what=name)
            assert not torch.allclose(value, base[name] + 0.4 * updates[name], rtol=0, atol=1e-7)  # not linear
        else:
            assert_allclose(value, base[name], what=name)


def test_slerp_between_two_lora_runs(lora_runs, tmp_path):
    """base_model a run: slerp, t 0.3, from base + ΔW_a to base + ΔW_b (a layer only one adapts:
    from or to the base's weight); the weights neither adapts are the base's."""
    config = {"merge_method": "slerp", "base_model": str(lora_runs["a"]), "models": [{"model": str(lora_runs["b"])}, {"model": str(lora_runs["a"])}], "parameters": {"t": 0.3}}
    merged = load_file(merge_runs(tmp_path, "model", config) / "model.safetensors")
    base, updates = base_weights(), {name: lora_updates(run) for name, run in lora_runs.items()}
    for name, value in merged.items():
        start, end = (base[name] + updates[run].get(name, torch.zeros_like(base[name])) for run in ("a", "b"))
        assert_allclose(value, slerp_by_hand(0.3, start, end), what=name)
    assert json.loads((tmp_path / "model" / "merge.json").read_text())["base_model"] == TINY_MODEL


def test_linear_with_the_base_listed_to_lora_is_exact(lora_runs, tmp_path):
    """linear of the base (weight 0.5) and a LoRA run (0.5): ΔW = ½ΔW_a, exactly a LoRA."""
    config = {
        "merge_method": "linear",
        "base_model": TINY_MODEL,
        "models": [{"model": TINY_MODEL, "parameters": {"weight": 0.5}}, {"model": str(lora_runs["a"]), "parameters": {"weight": 0.5}}],
    }
    model_dir = merge_runs(tmp_path, "model", config)
    merged = load_file(model_dir / "model.safetensors")
    base, updates = base_weights(), lora_updates(lora_runs["a"])
    for name, value in merged.items():
        assert_allclose(value, base[name] + 0.5 * updates[name] if name in updates else base[name], what=name)
    result = invoke("merge", write_yaml(tmp_path / "lora.yaml", {**config, "output": "lora"}), "--out", tmp_path / "lora")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "lora" / "merge.json").read_text())["exact"] is True
    adapter = peft.PeftModel.from_pretrained(fresh_base(), tmp_path / "lora")
    assert_allclose(logits_of(adapter), logits_of(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)), atol=1e-5)


def test_slerp_to_lora_reports_its_truncation_error(lora_runs, tmp_path):
    config = {
        "merge_method": "slerp",
        "base_model": TINY_MODEL,
        "models": [{"model": TINY_MODEL}, {"model": str(lora_runs["a"])}],
        "parameters": {"t": 0.4},
        "output": "lora",
        "rank": 4,
    }
    result = invoke("merge", write_yaml(tmp_path / "lora.yaml", config), "--out", tmp_path / "lora")
    assert result.exit_code == 0, result.output
    errors = json.loads((tmp_path / "lora" / "merge.json").read_text())["svd_relative_error"]["by_weight"]
    base, updates = base_weights(), lora_updates(lora_runs["a"])
    assert sorted(errors) == sorted(updates)
    for name in updates:
        expected = truncation_error_by_hand(slerp_by_hand(0.4, base[name], base[name] + updates[name]) - base[name].double(), 4)
        assert errors[name] == pytest.approx(expected, rel=1e-3), name


def test_dare_linear_of_a_lora_drops_entries_of_its_update(lora_runs, tmp_path):
    """One input, density 0.5, rescale (DARE's default): each entry of the merged update is 0 or
    ΔW/0.5, about half of them kept; the drop follows `seed`, and is the same for the same seed."""
    config = {"merge_method": "dare_linear", "base_model": TINY_MODEL, "models": [{"model": str(lora_runs["a"]), "parameters": {"weight": 1.0, "density": 0.5}}]}
    merged = load_file(merge_runs(tmp_path, "seed0", config) / "model.safetensors")
    again = load_file(merge_runs(tmp_path, "seed0-again", config) / "model.safetensors")
    other = load_file(merge_runs(tmp_path, "seed1", config, "seed=1") / "model.safetensors")
    base, updates = base_weights(), lora_updates(lora_runs["a"])
    kept = total = 0
    for name, update in updates.items():
        delta = merged[name] - base[name]
        dropped = delta.abs() < 1e-7 * update.abs().max()
        assert_allclose(delta[~dropped], 2 * update[~dropped], atol=1e-6, what=name)
        kept, total = kept + int((~dropped).sum()), total + dropped.numel()
        assert torch.equal(merged[name], again[name]), name
    assert kept / total == pytest.approx(0.5, abs=0.02)
    assert any(not torch.equal(merged[n], other[n]) for n in updates)


# ---- 6. A non-plain-LoRA adapter merges by its dense update


def test_a_loha_run_merges_as_its_merged_export(records, tmp_path):
    """LoHa's update (a Hadamard product of two rank-2 products, dense) merges as W' − W."""
    method = {"name": "loha", "target": "all-linear", "r": 2}
    run = tunelab.train(tiny_run_config(tmp_path / "run", records[0], method=method, train={"max_steps": 2, "lr": 1e-2})).output_dir
    export_run(run, "merged", tmp_path / "exported")
    config = write_yaml(tmp_path / "merge.yaml", {"merge_method": "task_arithmetic", "base_model": TINY_MODEL, "models": [{"model": str(run), "parameters": {"weight": 1.0}}]})
    result = invoke("merge", config, "--out", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    exported, merged, base = load_file(tmp_path / "exported" / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors"), base_weights()
    assert set(merged) == set(exported)
    for name in exported:
        assert_allclose(merged[name], exported[name], what=name)
    assert any(not torch.allclose(exported[n], base[n]) for n in base)  # the run moved some weights


# ---- 7. Bad inputs


@pytest.fixture(scope="module")
def prompt_run(module_cache, records, tmp_path_factory) -> Path:
    config = tiny_run_config(tmp_path_factory.mktemp("prompt") / "run", records[0], method={"name": "prompt_tuning", "num_virtual_tokens": 4}, train={"max_steps": 1})
    return tunelab.train(config).output_dir


def assert_refused(tmp_path: Path, config: dict | str, *expected: str, out: Path | None = None) -> str:
    """`tunelab merge` of `config` fails with one error line holding `expected`, writing nothing."""
    if isinstance(config, dict):
        config_file = write_yaml(tmp_path / "bad.yaml", config)
    else:
        config_file = tmp_path / "bad.yaml"
        config_file.write_text(config)
    out = out or tmp_path / "out"
    before = tree_state(tmp_path)
    message = assert_clean_failure(invoke("merge", config_file, "--out", out), *expected)
    assert tree_state(tmp_path) == before
    return message


def test_unknown_merge_method_names_the_key_and_line(lora_runs, tmp_path):
    text = f"base_model: {TINY_MODEL}\nmodels:\n  - model: {lora_runs['a']}\nmerge_method: frankenmerge\n"
    assert_refused(tmp_path, text, "bad.yaml:4:", "`merge_method`", "frankenmerge")


def slerp_without_t(runs: dict) -> dict:
    return {"merge_method": "slerp", "base_model": TINY_MODEL, "models": [{"model": TINY_MODEL}, {"model": str(runs["a"])}], "parameters": {"normalize": True}}


@pytest.mark.parametrize("case", ["slerp without t", "ties without base_model"])
def test_method_requirements_name_their_key_and_line(case, lora_runs, tmp_path):
    if case == "slerp without t":  # `parameters:` is on line 6 of the YAML written
        assert_refused(tmp_path, slerp_without_t(lora_runs), "bad.yaml:6:", "`parameters.t`", "slerp needs t")
    else:
        assert_refused(tmp_path, {"merge_method": "ties", "models": [{"model": str(lora_runs["a"])}]}, "`base_model`", "ties takes task vectors")


def test_a_prompt_tuning_run_is_not_a_weight_update(prompt_run, tmp_path):
    config = {"merge_method": "task_arithmetic", "base_model": TINY_MODEL, "models": [{"model": str(prompt_run)}]}
    assert_refused(tmp_path, config, str(prompt_run), "prompt_tuning", "no update to merge")


def test_lora_output_refuses_a_full_checkpoint(lora_runs, tmp_path_factory, tmp_path):
    checkpoint = save_checkpoint(fresh_base(), tmp_path_factory.mktemp("full") / "checkpoint")
    config = {"merge_method": "task_arithmetic", "base_model": TINY_MODEL, "models": [{"model": str(lora_runs["a"])}, {"model": checkpoint}], "output": "lora"}
    assert_refused(tmp_path, config, "output: lora", "full checkpoint")


def test_a_fine_tuning_as_base_of_task_vectors_is_refused(lora_runs, tmp_path):
    config = {"merge_method": "task_arithmetic", "base_model": str(lora_runs["a"]), "models": [{"model": str(lora_runs["b"])}]}
    assert_refused(tmp_path, config, "base_model", "is a fine-tuning", f"base_model: {TINY_MODEL}")


def test_a_non_empty_out_is_refused(lora_runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    config = {"merge_method": "task_arithmetic", "base_model": TINY_MODEL, "models": [{"model": str(lora_runs["a"])}]}
    assert_refused(tmp_path, config, "--out", "not empty", out=out)


def test_a_missing_model_path_is_refused(tmp_path):
    missing = tmp_path / "no-such-run"
    config = {"merge_method": "task_arithmetic", "base_model": TINY_MODEL, "models": [{"model": str(missing)}]}
    assert_refused(tmp_path, config, str(missing))
