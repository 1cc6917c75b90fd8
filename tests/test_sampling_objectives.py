"""The objectives that train on their own samples (train/rollout.py): GRPO (objectives/grpo.py:
TRL 1.16's loss as the oracle, advantages, the completion mask, gradient-accumulation invariance)
and RAFT (objectives/raft.py: the kept set), rewards, exact resume, and learning a reward."""

from __future__ import annotations

import contextlib
import copy
import json
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import tunelab
from helpers import assert_tensors_equal, kill_and_resume, load_adapter, read_metrics, tiny_run_config
from tunelab.data.batching import BatchLayout
from tunelab.errors import TunelabError
from tunelab.generation import sample_completions
from tunelab.models.tiny import tiny_llama
from tunelab.objectives.base import StepTotals, step_loss
from tunelab.objectives.grpo import Grpo, GrpoOptions, group_advantages
from tunelab.objectives.reference import LiveReference
from tunelab.scoring.answers import fenced_code
from tunelab.scoring.rewards import Rewards, RewardSpec

VOCAB = 64
GROUP = 3
TEMPERATURE = 0.7
MAX_COMPLETION = 9


def completion_samples(old_shift: float | None) -> list[dict]:
    """Two prompts' groups of completions of varying lengths, random advantages; with `old_shift`,
    sampling log-probs set later (μ > 1) so that the ratio moves off 1 and some tokens clip."""
    generator = torch.Generator().manual_seed(3)
    samples = []
    for prompt_length in (4, 6):
        prompt = torch.randint(1, VOCAB, (prompt_length,), generator=generator).tolist()
        for length in torch.randint(2, MAX_COMPLETION + 1, (GROUP,), generator=generator).tolist():
            completion = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
            samples.append({"prompt_ids": prompt, "completion_ids": completion, "advantage": float(torch.randn(1, generator=generator)), "trained": True})
    return samples


def our_loss(model, reference_model, samples, options: GrpoOptions):
    objective = Grpo(options)
    layout = BatchLayout(max_length=64, packing=False, pad_id=0)
    batches = objective.forward_batches(samples, layout, 0)
    totals = StepTotals()
    for batch in batches:
        totals.add_counts(batch.counts)
    reference = LiveReference(reference_model) if options.beta else None
    loss = sum(step_loss(objective.output(model, batch, reference), totals.counts) for batch in batches)
    return loss


def trl_loss(model, reference_model, samples, options: GrpoOptions):
    """TRL's GRPOTrainer._compute_loss on the same completions, called on a stand-in trainer."""
    from trl import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, temperature=TEMPERATURE, cast_lm_head_to_fp32=False, outputs=("log_probs", "entropy"))
    add_fused_lm_head(reference_model, temperature=TEMPERATURE, cast_lm_head_to_fp32=False)
    width_p = max(len(s["prompt_ids"]) for s in samples)
    width_c = max(len(s["completion_ids"]) for s in samples)
    n = len(samples)
    prompt_ids, prompt_mask = torch.zeros(n, width_p, dtype=torch.long), torch.zeros(n, width_p, dtype=torch.long)
    completion_ids, completion_mask = torch.zeros(n, width_c, dtype=torch.long), torch.zeros(n, width_c, dtype=torch.long)
    old = torch.zeros(n, width_c)
    for i, s in enumerate(samples):
        p, c = s["prompt_ids"], s["completion_ids"]
        prompt_ids[i, width_p - len(p) :], prompt_mask[i, width_p - len(p) :] = torch.tensor(p), 1  # TRL left-pads prompts
        completion_ids[i, : len(c)], completion_mask[i, : len(c)] = torch.tensor(c), 1
        if s.get("old_log_probs") is not None:
            old[i, : len(c)] = torch.tensor(s["old_log_probs"])
    accelerator = types.SimpleNamespace(
        autocast=contextlib.nullcontext, num_processes=1, is_main_process=True, gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x
    )
    trainer = types.SimpleNamespace(
        accelerator=accelerator,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=options.beta,
        args=types.SimpleNamespace(use_bias_correction_kl=options.use_bias_correction_kl, delta=None, steps_per_generation=1),
        loss_type=options.loss_type,
        epsilon_low=options.epsilon,
        epsilon_high=options.epsilon_high or options.epsilon,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=model,
        current_gradient_accumulation_steps=1,
        max_completion_length=options.max_completion_length,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    trainer._get_per_token_logps_and_entropies = types.MethodType(GRPOTrainer._get_per_token_logps_and_entropies, trainer)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([s["advantage"] for s in samples]),
        "num_items_in_batch": completion_mask.sum(),
    }
    if samples[0].get("old_log_probs") is not None:
        inputs["old_per_token_logps"] = old
    if options.beta:
        with torch.no_grad():
            ids = torch.cat([prompt_ids, completion_ids], dim=1)
            inputs["ref_per_token_logps"] = trainer._get_per_token_logps_and_entropies(reference_model, ids, torch.cat([prompt_mask, completion_mask], dim=1), width_c)[0]
    return GRPOTrainer._compute_loss(trainer, model, inputs)


ORACLE_CASES = [
    (loss_type, iterations, beta, correction)
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo")
    for iterations, beta, correction in ((1, 0.0, True), (2, 0.0, True), (2, 0.05, True), (2, 0.05, False))
]


@pytest.mark.parametrize(("loss_type", "iterations", "beta", "correction"), ORACLE_CASES)
def test_loss_and_gradients_equal_trl(loss_type, iterations, beta, correction):
    torch.manual_seed(0)
    model = tiny_llama(VOCAB)
    # The output head (tied to the embeddings) frozen, as under every adapter method: TRL's fused
    # log-prob head gives no gradient to its weight.
    model.get_output_embeddings().weight.requires_grad_(False)
    reference_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.train()
    samples = completion_samples(None)
    options = GrpoOptions(
        rewards=[{"name": "format", "pattern": "x"}],
        num_generations=GROUP,
        loss_type=loss_type,
        num_iterations=iterations,
        beta=beta,
        use_bias_correction_kl=correction,
        temperature=TEMPERATURE,
        max_completion_length=MAX_COMPLETION,
        epsilon=0.1,
        epsilon_high=0.15,
    )
    if iterations > 1:  # the sampling policy's log-probs: the current ones moved, so ratios clip
        objective = Grpo(options)
        batch = objective.forward_batches(samples, BatchLayout(64, False, 0), 0)[0]
        with torch.no_grad():
            targets = batch.log_probs(model)
        shifts = 0.3 * torch.randn(len(targets.log_probs), generator=torch.Generator().manual_seed(1))
        for s in samples:
            s["old_log_probs"] = [0.0] * len(s["completion_ids"])
        for value, i, j in zip((targets.log_probs + shifts).tolist(), targets.owner.tolist(), batch.completion_index(targets).tolist()):
            batch.samples[i]["old_log_probs"][j] = value
    ours = our_loss(model, reference_model, samples, options)
    ours.backward()
    our_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    trl_model = copy.deepcopy(model)
    theirs = trl_loss(trl_model, copy.deepcopy(reference_model), samples, options)
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    for name, p in trl_model.named_parameters():
        if p.requires_grad:
            error = (our_grads[name] - p.grad).norm() / p.grad.norm()
            assert error < 1e-5, (name, error.item())


# ---- Advantages, the completion mask, rewards


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_are_trls(scale):
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0], dtype=torch.float64)  # the second group has no spread
    advantages, std = group_advantages(rewards, 3, scale)
    grouped = rewards.view(2, 3)
    mean = grouped.mean(dim=1).repeat_interleave(3)
    group_std = torch.tensor([torch.tensor([1.0, 0.0, 0.5]).std().item(), 0.0], dtype=torch.float64).repeat_interleave(3)
    expected_std = {"group": group_std, "none": group_std, "batch": rewards.std().expand(6)}[scale]
    expected = (rewards - mean) if scale == "none" else (rewards - mean) / (expected_std + 1e-4)
    assert torch.allclose(advantages, expected) and torch.allclose(std, expected_std)
    assert advantages[3:].abs().max() == 0  # a group whose completions scored alike teaches nothing


def test_a_completion_ends_at_its_first_stop_token_whatever_its_id():
    torch.manual_seed(0)
    model = tiny_llama(VOCAB)
    stops = list(range(52, 64))  # many stop ids: most completions stop early, at different ones
    prompts = [[1, 5, 9], [2, 7]]
    completions, truncated = sample_completions(model, prompts, 6, 10, stops, pad_id=0, seed=1)
    assert len(completions) == 12
    assert 0 < sum(truncated) < 12 and len({c[-1] for c, cut in zip(completions, truncated) if not cut}) > 1
    for completion, cut in zip(completions, truncated):
        inside = [t for t in completion[:-1] if t in stops]
        assert not inside, "nothing after the first stop token"
        assert (completion[-1] in stops) != cut and (not cut or len(completion) == 10)
    again, _ = sample_completions(model, prompts, 6, 10, stops, pad_id=0, seed=1)
    assert again == completions, "the same weights and seed sample the same completions"
    assert sample_completions(model, prompts, 6, 10, stops, pad_id=0, seed=2)[0] != completions


def test_training_weights_sample_on_the_training_copies_with_dropout_off():
    """The policy samples as it trains: LoRA layers on their bf16 copies of the frozen weights,
    dropout off; afterwards every module is back in its mode."""
    from tunelab.methods.lora import Lora, LoraOptions

    torch.manual_seed(0)
    model = tiny_llama(VOCAB)
    lora = Lora(LoraOptions(r=4, dropout=0.5))
    lora.attach(model)
    assert lora.store_frozen_weights(model, torch.bfloat16)
    model.train()
    seen = defaultdict(set)
    for module in model.modules():
        module.register_forward_hook(lambda m, args, out: seen[type(m).__name__].add(m.training))
    for training_weights, copies_train in ((False, {False}), (True, {True})):
        seen.clear()
        sample_completions(model, [[1, 5, 9]], 2, 4, [0], pad_id=0, seed=1, training_weights=training_weights)
        assert seen["LoraLinear"] == copies_train and seen["Dropout"] == {False} and seen["LlamaDecoderLayer"] == {False}
    assert all(module.training for module in model.modules())


def test_builtin_rewards_score_with_the_eval_scorers():
    completions = ["so 3 + 4 = 7", '{"name": "Ann", "age": 30}', "<think>x</think> 12", "a" * 30]
    ids = [[1] * 4, [1] * 12, [1] * 8, [1] * 30]
    fields = [{"answer": "7"}, {"answer": {"name": "Ann", "age": 31}}, {"answer": "12.0"}, {"answer": "b"}]
    specs = [
        RewardSpec(name="math_exact"),
        RewardSpec(name="format", pattern=r"^<think>.*</think>"),
        RewardSpec(name="length", target=10),
        RewardSpec(name="exact_match"),
    ]
    scores = Rewards(specs).score(["p"] * 4, completions, ids, fields, ["f:1", "f:2", "f:3", "f:4"])
    assert scores[0] == [1.0, 0.0, 1.0, 0.0]
    assert scores[1] == [0.0, 0.0, 1.0, 0.0]
    assert scores[2] == [0.0, -0.2, 0.0, -1.0]
    assert scores[3] == [0.0, 0.0, 0.0, 0.0]
    assert Rewards([RewardSpec(name="json_fields")]).score(["p"], completions[1:2], ids[1:2], fields[1:2], ["f:2"]) == [[0.5]]


def test_the_code_reward_runs_the_rows_tests_in_the_sandbox():
    reward = Rewards([RewardSpec(name="code")])
    completions = ["def add(a, b):\n    return a + b\n```", "```python\ndef add(a, b):\n    return a - b\n```"]
    tests = [{"tests": ["assert add(2, 3) == 5"]}] * 2
    assert reward.score(["p"] * 2, completions, [[1], [1]], tests, ["f:1", "f:2"]) == [[1.0, 0.0]]


def test_a_reply_that_only_closes_a_fence_is_the_code_before_it():
    assert fenced_code("def f():\n    return 1\n```\n") == "def f():\n    return 1"
    assert fenced_code("Here:\n```python\nx = 1\n```\nDone.") == "x = 1"
    assert fenced_code("x = 1") == "x = 1"


def test_a_user_reward_that_fails_names_itself_and_the_row(tmp_path):
    module = tmp_path / "my_rewards.py"
    module.write_text(
        "def picky(prompts, completions, completion_ids, answer, **_):\n    return [1.0 / (a != 'x') for a in answer]\n\ndef wordy(completions, **_):\n    return ['yes' for _ in completions]\n"
    )
    picky = Rewards([RewardSpec(function=f"{module}:picky")])
    with pytest.raises(TunelabError, match=r"reward 'picky' raised ZeroDivisionError.*\(on data.jsonl:2\)"):
        picky.score(["p", "p"], ["a", "b"], [[1], [1]], [{"answer": "y"}, {"answer": "x"}], ["data.jsonl:1", "data.jsonl:2"])
    wordy = Rewards([RewardSpec(function=f"{module}:wordy")])
    with pytest.raises(TunelabError, match=r"reward 'wordy' returned 'yes' for the completion of data.jsonl:1"):
        wordy.score(["p"], ["a"], [[1]], [{}], ["data.jsonl:1"])
    with pytest.raises(TunelabError, match="has no function 'missing'"):
        Rewards([RewardSpec(function=f"{module}:missing")])


# ---- Runs


@pytest.fixture(scope="module")
def prompts(module_cache, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    train = folder / "prompts.jsonl"
    train.write_text("\n".join(json.dumps({"prompt": f"Say something {i}:", "answer": str(i)}) for i in range(32)))
    held_out = folder / "held_out.jsonl"
    held_out.write_text("\n".join(json.dumps({"prompt": f"Say something {i}:", "answer": str(i)}) for i in range(32, 36)))
    rewards = folder / "char_rewards.py"
    rewards.write_text("def share_of_a(completions, **_):\n    return [c.count('a') / max(1, len(c)) for c in completions]\n")
    return {"train": train, "eval": held_out, "reward": f"{rewards}:share_of_a"}


def grpo_config(output, prompts, objective: dict | None = None, **sections) -> dict:
    config = tiny_run_config(output, prompts["train"], prompts["eval"], **sections)
    config["objective"] = {"name": "grpo", "num_generations": 8, "max_completion_length": 12, "rewards": [{"function": prompts["reward"]}], **(objective or {})}
    return config


def test_the_tiny_model_learns_a_checkable_reward(prompts, tmp_path):
    """From near 0 (the share of one byte in random text) to above 0.5 in a few seconds."""
    config = grpo_config(tmp_path / "run", prompts, {"loss_type": "grpo"}, method={"name": "full"}, train={"max_steps": 30, "batch_size": 4, "lr": 1e-2})
    report = tunelab.train(config).report
    rewards = [m["reward"] for m in read_metrics(config["output"])]
    assert rewards[0] < 0.05 and max(rewards[-3:]) > 0.5
    assert report["eval_reward"] > 0.5 and report["eval_rewards/share_of_a/mean"] == report["eval_reward"]
    first = read_metrics(config["output"])[0]
    assert first["generated_tokens"] > 0 and first["generation_seconds"] > 0 and 0 <= first["frac_reward_zero_std"] <= 1


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])  # bnpo: a per-micro-batch mean by definition
def test_grad_accumulation_keeps_groups_whole_and_the_update_equal(loss_type, prompts, tmp_path):
    """The same losses, KL and gradient norms step by step; the same weights, but for float noise
    that Adam amplifies where a gradient is near its eps (a step of lr for a gradient of ~1e-10)."""
    adapters, figures = {}, {}
    for batch_size, accum in [(8, 1), (2, 4)]:
        config = grpo_config(
            tmp_path / f"bs{batch_size}",
            prompts,
            {"loss_type": loss_type, "num_iterations": 2, "beta": 0.04},
            train={"batch_size": batch_size, "grad_accum": accum, "max_steps": 2, "lr": 1e-2},
        )
        tunelab.train(config)
        adapters[batch_size] = load_adapter(config["output"])
        figures[batch_size] = [[m[key] for key in ("loss", "kl", "grad_norm")] for m in read_metrics(config["output"])]
    for ours, whole in zip(figures[2], figures[8]):
        assert ours == pytest.approx(whole, rel=1e-5, abs=1e-7)
    assert figures[8][1][1] > 0  # the second step's policy is off its reference
    for name, tensor in adapters[8].items():
        assert torch.allclose(adapters[2][name], tensor, rtol=1e-3, atol=1e-5), name
    assert any(t.abs().max() > 1e-3 for name, t in adapters[8].items() if "lora_B" in name)


ROUND_CASES = {
    # killed after step 3 of rounds of 2: the resumed run trains step 4 on step 3's samples
    "grpo": ({"num_iterations": 2, "beta": 0.04}, [True, False] * 3),
    # killed after step 3 of rounds of 2 steps: the same, on RAFT's kept set
    "raft": ({"name": "raft", "num_generations": 4, "steps_per_round": 2, "threshold": 0.05}, [True, False] * 3),
}


@pytest.mark.parametrize("case", ROUND_CASES)
def test_resume_after_sigkill_mid_round_is_exact(case, prompts, tmp_path):
    """The samples of a round that later steps still train on are kept with the checkpoint; the
    next round samples as the uninterrupted run does (same weights, same seed)."""
    objective, sampled = ROUND_CASES[case]
    method = {"dropout": 0.1} if case == "grpo" else {}
    config = grpo_config(tmp_path / "run", prompts, objective, method=method, train={"max_steps": 6, "batch_size": 4, "save_every": 1, "keep_checkpoints": 2, "lr": 1e-2})
    run_dir, reference_dir = kill_and_resume(tmp_path, config, kill_after=3)
    assert_tensors_equal(load_adapter(run_dir), load_adapter(reference_dir))

    def untimed(run: Path) -> list[dict]:
        return [{k: v for k, v in m.items() if "seconds" not in k and "per_s" not in k} for m in read_metrics(run)]

    assert untimed(run_dir) == untimed(reference_dir)
    assert [m["generated_tokens"] > 0 for m in read_metrics(reference_dir)] == sampled


def test_bad_inputs_fail_before_any_write(prompts, tmp_path):
    missing = tmp_path / "no_prompt.jsonl"
    missing.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"question": "no prompt"}) + "\n")
    cases = [
        (grpo_config(tmp_path / "a", {**prompts, "train": missing}), r"no_prompt.jsonl:2: missing field 'prompt'"),
        (grpo_config(tmp_path / "b", {**prompts, "reward": f"{tmp_path}/nowhere.py:f"}), r"nowhere.py not found"),
        (grpo_config(tmp_path / "c", prompts, {"beta": 0.1}, method={"name": "prompt_tuning"}), r"reference must run live"),
    ]
    for config, message in cases:
        with pytest.raises(TunelabError, match=message):
            tunelab.train(config)
        assert not (tmp_path / config["output"] / "checkpoints").exists()
    with pytest.raises(Exception, match="precompute_reference"):
        tunelab.train(grpo_config(tmp_path / "d", prompts, {"beta": 0.1, "precompute_reference": True}))


def test_a_reward_that_fails_mid_run_stops_it_naming_the_reward_and_row(prompts, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def half(completions, answer, **_):\n    return [None if a == '2' else 1.0 for a in answer]\n")
    config = grpo_config(tmp_path / "run", {**prompts, "reward": f"{broken}:half"}, train={"max_steps": 2, "batch_size": 4})
    with pytest.raises(TunelabError, match=r"reward 'half' returned None for the completion of .*prompts.jsonl:\d+"):
        tunelab.train(config)


def test_inverse_cdf_sampling_draws_from_the_tempered_truncated_distribution():
    from tunelab.generation import InverseCdfSampling

    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).expand(20000, 5).contiguous()
    cases = [
        (0.7, 1.0, 0, torch.softmax(logits[0] / 0.7, dim=-1)),
        (1.0, 1.0, 2, torch.softmax(logits[0, :2], dim=-1).tolist() + [0.0] * 3),
        (1.0, 0.8, 0, None),  # the smallest most-likely set reaching 0.8: tokens 0, 1 and 2
    ]
    for temperature, top_p, top_k, expected in cases:
        chosen = InverseCdfSampling(temperature, top_p, top_k)(None, logits).argmax(dim=-1)
        frequencies = torch.bincount(chosen, minlength=5).float() / len(chosen)
        if expected is None:
            kept = torch.softmax(logits[0], dim=-1)[:3]
            expected = (kept / kept.sum()).tolist() + [0.0, 0.0]
        assert torch.allclose(frequencies, torch.as_tensor(expected, dtype=torch.float32), atol=0.012), (temperature, top_p, top_k, frequencies)


# ---- RAFT


def test_raft_keeps_each_prompts_best_completion_above_the_threshold():
    from tunelab.objectives.raft import Raft, RaftOptions

    objective = Raft(RaftOptions(rewards=[{"name": "format", "pattern": "yes"}], num_generations=2, steps_per_round=2, threshold=0.5))
    rows = [{"prompt_ids": [1, i], "prompt": json.dumps(f"q{i}"), "fields": "{}", "where": f"f:{i}"} for i in range(4)]
    prompt_steps = [[[rows[0]], [rows[1]]], [[rows[2], rows[3]]]]  # two data steps: 2 micro-batches, then 1
    texts = ["no", "yes", "no", "no", "yes", "yes!", "no", "nope"]
    completions = [[10 + i] for i in range(8)]
    steps, metrics, records = objective.round_batches(prompt_steps, objective.round_request(prompt_steps, 1), completions, texts, [False] * 8)
    assert [[len(batch) for batch in step] for step in steps] == [[1, 0], [1]]
    assert steps[0][0][0] == {"input_ids": [1, 0, 11], "target_mask": [0, 0, 1]}  # the first prompt's best is its second
    assert steps[1][0][0]["input_ids"] == [1, 2, 14]  # ties: the first best
    assert [r["kept"] for r in records] == [True, False, True, False] and records[0]["completion"] == "yes"
    assert metrics["raft/acceptance"] == 0.5 and metrics["reward"] == 3 / 8


def test_raft_learns_from_its_kept_completions_and_writes_each_round(prompts, tmp_path):
    config = grpo_config(
        tmp_path / "run", prompts, {"name": "raft", "num_generations": 8, "steps_per_round": 2}, method={"name": "full"}, train={"max_steps": 16, "batch_size": 4, "lr": 3e-2}
    )
    report = tunelab.train(config).report
    records = read_metrics(config["output"])
    rewards = [r["reward"] for r in records if "reward" in r]  # logged by the steps that sampled
    assert len(rewards) == 8 and rewards[0] < 0.05 and max(rewards[-2:]) > 0.25  # measured: 0.003 -> 0.53
    rounds = sorted((tmp_path / "run" / "rounds").iterdir())
    assert [p.name for p in rounds] == [f"round-{i}.jsonl" for i in range(1, 9)]
    kept = [json.loads(line) for line in rounds[0].read_text().splitlines()]
    assert len(kept) == 8 and all(set(k) == {"where", "prompt", "completion", "reward", "kept"} for k in kept)
    assert records[0]["raft/acceptance"] == sum(k["kept"] for k in kept) / 8
    assert 0.0 <= report["eval_reward"] <= 1.0


def test_a_stop_string_ends_a_completion():
    from tunelab.models.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    prompts = [tokenizer("Hello")["input_ids"], tokenizer("Hi there")["input_ids"]]
    completions, truncated = sample_completions(model, prompts, 4, 24, [tokenizer.eos_token_id], tokenizer.pad_token_id, seed=0, stop=["e", "a"], tokenizer=tokenizer)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    ended_by_string = [t for t, ids, cut in zip(texts, completions, truncated) if not cut and ids[-1] != tokenizer.eos_token_id]
    assert ended_by_string and all(t.endswith(("e", "a")) for t in ended_by_string)
    for text, ids, cut in zip(texts, completions, truncated):
        assert "e" not in text[:-1] and "a" not in text[:-1], "nothing after the first stop string"
        assert not cut or len(ids) == 24
