"""The objectives' seam: every objective keeps the loop's invariants (gradient accumulation is exact,
a killed run resumes bit for bit), the reference policy is what it should be, continued pretraining
reads text, and metrics reach the trackers. TRL equality lives in test_objectives_trl.py."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from helpers import (
    OBJECTIVES,
    assert_tensors_equal,
    kill_and_resume,
    load_adapter,
    objective_config,
    read_metrics,
    read_report,
    write_objective_data,
)
from tunelab.errors import TunelabError
from tunelab.objectives.reference import PRECOMPUTED_FILE
from tunelab.objectives.registry import objective_names
from tunelab.runs import load_run
from tunelab.train import loop, reporting


@pytest.fixture(scope="module")
def data(module_cache, tmp_path_factory):
    return write_objective_data(tmp_path_factory.mktemp("data"))


def test_every_registered_objective_is_covered():
    assert {options["name"] for options in OBJECTIVES.values()} == set(objective_names())


@pytest.mark.parametrize("case", OBJECTIVES)
def test_grad_accumulation_matches_one_big_batch(case, data, tmp_path):
    """batch 8 x accum 1 == batch 2 x accum 4, step by step: every loss term is divided by its unit's
    count over the whole step, so how the step is cut into micro-batches does not matter."""
    losses, norms = {}, {}
    for batch_size, accum in [(8, 1), (2, 4)]:
        config = objective_config(tmp_path / f"bs{batch_size}", data, case, train={"batch_size": batch_size, "grad_accum": accum, "max_steps": 3, "lr": 1e-2})
        tunelab.train(config)
        losses[batch_size] = [m["loss"] for m in read_metrics(config["output"])]
        norms[batch_size] = [m["grad_norm"] for m in read_metrics(config["output"])]
    assert len(losses[8]) == 3
    assert losses[2] == pytest.approx(losses[8], rel=1e-5, abs=1e-7)
    assert norms[2] == pytest.approx(norms[8], rel=1e-5)
    assert norms[8][0] != norms[8][-1]  # the steps trained: equal figures are not equal no-ops


def test_kto_kl_point_is_the_micro_batches(data, tmp_path):
    """One forward batch per micro-batch whatever max_tokens_per_forward, its KL sequences each
    prompt with the previous example's completion within that micro-batch (TRL's rotation)."""
    from tunelab.data.batching import BatchLayout
    from tunelab.objectives.kto import Kto, KtoOptions

    samples = [{"prompt_ids": [1, 10 + i], "completion_ids": [20 + i, 2], "label": i % 2 == 0, "row": i} for i in range(4)]
    batches = Kto(KtoOptions()).forward_batches(samples, BatchLayout(64, True, 0, True), max_tokens=4)
    assert len(batches) == 1 and batches[0].rows == [0, 1, 2, 3] and batches[0].kl_rows == [3, 0, 1, 2]
    assert batches[0].kl_sequences.input_ids[0].tolist() == [1, 10, 23, 2, 1, 11, 20, 2, 1, 12, 21, 2, 1, 13, 22, 2]
    config = objective_config(tmp_path / "run", data, "kto", train={"max_steps": 2, "batch_size": 4, "grad_accum": 2})
    config["objective"] = {"name": "kto"}
    first = read_metrics(tunelab.train(config).output_dir)[0]
    assert first["kto_batches"] == 2 and first["examples"] == 8 and first["desirable"] + first["undesirable"] == 8


@pytest.mark.parametrize("case", ["dpo", "dpo-precomputed", "distill-on-policy", "distill-prompts"])
def test_resume_after_sigkill_is_bitwise_exact(case, data, tmp_path):
    """Also where steps train on sampled completions: a resumed step samples what it sampled before."""
    config = objective_config(tmp_path / "run", data, case, method={"dropout": 0.1}, train={"max_steps": 10, "batch_size": 8, "save_every": 2, "keep_checkpoints": 2})
    run_dir, reference_dir = kill_and_resume(tmp_path, config, kill_after=4)
    assert_tensors_equal(load_adapter(run_dir), load_adapter(reference_dir))
    assert [m["loss"] for m in read_metrics(run_dir)] == [m["loss"] for m in read_metrics(reference_dir)]
    report, reference_report = read_report(run_dir), read_report(reference_dir)
    assert report["eval_loss"] == reference_report["eval_loss"]
    if case == "dpo-precomputed":
        # The resumed run read the reference log-probabilities back instead of computing them again.
        # chosen and rejected of every training row (10 steps x 8 of 16) and eval row
        assert reference_report["reference_logps_computed"] == 2 * (16 + 4)
        assert report["reference_logps_computed"] == 0 and (run_dir / PRECOMPUTED_FILE).is_file()


def test_a_frozen_copy_reference_stays_fixed_while_the_policy_trains(data, tmp_path, monkeypatch):
    """`full` has no adapter to switch off: its reference is a copy of the initial model, which
    training must not move (the policy's own weights do move)."""
    chosen = {}
    real_choose = loop.choose_reference

    def keep(*args, **kwargs):
        live, precompute = real_choose(*args, **kwargs)
        chosen["live"], chosen["start"] = live, {k: v.clone() for k, v in live.model.state_dict().items()}
        return live, precompute

    monkeypatch.setattr(loop, "choose_reference", keep)
    config = objective_config(tmp_path / "run", data, "dpo", method={"name": "full"}, train={"max_steps": 3, "lr": 1e-3})
    report = tunelab.train(config).report
    assert report["reference"] == "frozen copy"
    live = chosen["live"]
    assert all(not p.requires_grad for p in live.model.parameters())
    assert_tensors_equal(dict(live.model.state_dict()), chosen["start"])
    trained = load_run(config["output"]).model.state_dict()
    assert any(not torch.equal(trained[k], chosen["start"][k]) for k in chosen["start"] if k in trained)
    # The rewards moved away from 0: the policy left its (fixed) reference.
    assert read_metrics(config["output"])[-1]["rewards/margins"] != 0


REFERENCE_CASES = {
    "lora": ({"name": "lora"}, {}, "adapter off"),
    "lora-dropout": ({"name": "lora", "dropout": 0.1}, {}, "adapter off"),
    "vera": ({"name": "vera"}, {}, "adapter off"),
    "lora-precomputed": ({"name": "lora", "dropout": 0.1}, {"precompute_reference": True}, "precomputed"),
    "pissa": ({"name": "lora", "init": "pissa"}, {}, "precomputed"),  # the initial policy's
}


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_the_reference_computes_the_frozen_weights_as_the_policy_does(case, data, tmp_path):
    """Training on a bf16 copy of the frozen weights (fast-bf16 CPUs): the reference (adapter off, or
    precomputed from the policy before step 1) must compute on the same copy in training and on the
    fp32 weights in eval, as the policy does, or the two differ before the first step. At lr 1e-30 the
    policy stays the reference (an update of 1e-30 rounds away): every implicit reward, train and eval, is 0."""
    method, objective, kind = REFERENCE_CASES[case]
    config = objective_config(tmp_path / "run", data, "dpo", method=method, train={"max_steps": 1, "lr": 1e-30, "frozen_dtype": "bfloat16"})
    config["objective"] = {**config["objective"], **objective}
    report = tunelab.train(config).report
    first = read_metrics(config["output"])[0]
    assert report["reference"] == kind
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert report["eval_rewards/chosen"] == 0.0 and report["eval_rewards/rejected"] == 0.0


def test_reference_choices_follow_the_method(data, tmp_path):
    """Adapter off for LoRA, precomputed for PiSSA (its base is a residual) and for an adapter
    imported from trained weights, a given model when named."""
    kinds = {}
    for label, method, objective in [
        ("lora", {"name": "lora"}, {}),
        ("pissa", {"name": "lora", "init": "pissa"}, {}),
        ("named", {"name": "lora"}, {"reference": "tiny-random-llama"}),
    ]:
        config = objective_config(tmp_path / label, data, "dpo", method=method, train={"max_steps": 1})
        config["objective"] = {**config["objective"], **objective}
        kinds[label] = tunelab.train(config).report["reference"]
    assert kinds == {"lora": "adapter off", "pissa": "precomputed", "named": "model tiny-random-llama"}


def test_a_named_reference_without_packed_attention_gets_whole_pairs(data, tmp_path, monkeypatch):
    """Shared prompts need the reference to read `shared_prefix_spans`: a reference model without
    tunelab's packed attention makes the run lay pairs out whole, and the reference still equals
    the policy at step 0 (same weights: the DPO loss is ln 2)."""
    packed = loop.uses_packed_attention
    seen = []
    monkeypatch.setattr(loop, "uses_packed_attention", lambda model: packed(model) and (seen.append(model) or len(seen) == 1))
    layouts = []
    train_step = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda run, step: layouts.append(run.layout.share_prefixes) or train_step(run, step))
    config = objective_config(tmp_path / "run", data, "dpo", train={"max_steps": 1})
    config["objective"] = {**config["objective"], "reference": "tiny-random-llama"}
    tunelab.train(config)
    assert len(seen) == 2 and layouts == [False]
    assert read_metrics(config["output"])[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_pretrain_targets_every_token_and_splits_long_texts(data, tmp_path):
    config = objective_config(tmp_path / "run", data, "pretrain", data={"max_length": 64}, train={"max_steps": 2, "batch_size": 4})
    report = tunelab.train(config).report
    stats = report["data"]["train"]
    assert stats["split"] == stats["rows"] == 16  # every text is longer than 64 tokens
    first = read_metrics(config["output"])[0]
    # Every token but each piece's first is a target (the first is never predicted).
    assert first["target_tokens"] == first["tokens"] - 4


def test_pretrain_refuses_chat_rows_naming_the_key(data, tmp_path):
    config = objective_config(tmp_path / "run", data, "pretrain", data={"format": "messages"})
    with pytest.raises(TunelabError, match="data.format"):
        tunelab.train(config)
    config = objective_config(tmp_path / "run2", data, "sft")
    config["objective"] = {"name": "pretrain"}
    with pytest.raises(TunelabError, match=r"records.*:1: missing field 'text'|:1: missing field 'text'"):
        tunelab.train(config)
    assert not (tmp_path / "run2").exists()


def test_objective_options_are_validated_by_the_objective(data, tmp_path):
    for objective, message in [
        ({"name": "dpo", "label_smoothing": 0.1}, "loss_type: robust"),
        ({"name": "dpo", "betta": 0.1}, "objective.betta"),
        ({"name": "orpo-typo"}, "unknown objective"),
        ({"name": "dpo", "reference_free": True, "precompute_reference": True}, "reference_free"),
        ({"name": "distill", "teacher": "tiny-random-llama", "loss": "forward_kl", "beta": 0.3}, "loss: jsd only"),
        ({"name": "distill"}, "objective.teacher"),
        ({"name": "distill", "teacher": "tiny-random-llama", "on_policy_fraction": 1.5}, "objective.on_policy_fraction"),
        ({"name": "grpo", "rewards": [{"name": "format"}]}, "needs a 'pattern'"),
        ({"name": "grpo", "rewards": [{"name": "length", "function": "m:f"}]}, "exactly one of 'name'"),
        ({"name": "grpo", "rewards": []}, "objective.rewards"),
        ({"name": "grpo", "rewards": [{"name": "math_exact"}], "reference": "tiny-random-llama"}, "beta > 0 only"),
        ({"name": "raft", "rewards": [{"function": "no_colon"}]}, "module:function"),
    ]:
        config = objective_config(tmp_path / "run", data, "dpo")
        config["objective"] = objective
        with pytest.raises(TunelabError, match=message):
            tunelab.train(config)


def test_reference_free_dpo_needs_no_reference(data, tmp_path):
    config = objective_config(tmp_path / "run", data, "dpo", train={"max_steps": 1})
    config["objective"] = {"name": "dpo", "reference_free": True}
    report = tunelab.train(config).report
    first = read_metrics(config["output"])[0]
    assert report["reference"] is None
    # Against a uniform reference the rewards are β times the policy's own log-probabilities.
    assert first["rewards/chosen"] == pytest.approx(0.1 * first["logps/chosen"], rel=1e-6)


# --- reward models ------------------------------------------------------------------------------------


def test_the_reward_is_read_at_the_last_real_token_even_when_pad_is_eos():
    """Padded rows whose pad id is the EOS id that ends every sequence: the reward is still the
    head on each sequence's own last token (its EOS), as an unpadded forward of it alone gives."""
    from trl_oracle import EOS, PAIRS
    from tunelab.data.batching import BatchLayout
    from tunelab.models.loader import load_model
    from tunelab.objectives.reward import Reward, RewardOptions

    model, _ = load_model(tunelab.config.ModelConfig(name="tiny-random-llama", dtype="float32", device="cpu"))
    objective = Reward(RewardOptions())
    objective.attach(model)
    samples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r, "row": i} for i, (p, c, r) in enumerate(PAIRS)]
    for packing in (False, True):
        batch = objective.forward_batches(samples, BatchLayout(64, packing, EOS, False), 0)[0]
        with torch.no_grad():
            rewards = objective.rewards(model, batch)
            sequences = [p + c for p, c, _ in PAIRS] + [p + r for p, _, r in PAIRS]
            alone = [objective.head(model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]).item() for ids in sequences]
        assert rewards.tolist() == pytest.approx(alone, abs=1e-5)


def test_a_reward_model_run_saves_its_head_and_exports_a_sequence_classifier(data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from tunelab.export import export_run

    config = objective_config(tmp_path / "run", data, "reward", train={"max_steps": 4, "lr": 1e-2, "save_every": 2})
    report = tunelab.train(config).report
    assert 0.0 <= report["eval_accuracy"] <= 1.0 and "eval_margin" in report
    assert (tmp_path / "run" / "adapter" / "objective.safetensors").is_file()
    # Resuming from step 2 restores the head with the adapter: the same final head.
    final = load_file(tmp_path / "run" / "adapter" / "objective.safetensors")
    assert tunelab.train(config, resume=True).report["resumed_from_step"] == 2
    assert_tensors_equal(load_file(tmp_path / "run" / "adapter" / "objective.safetensors"), final)

    run = load_run(config["output"])
    assert torch.equal(run.objective.head.weight, final["score.weight"])
    texts = ["Record: Ana, 31, Porto.", "Something else entirely, longer than the first one."]
    ids = [run.tokenizer(t)["input_ids"] + [run.tokenizer.eos_token_id] for t in texts]
    with torch.no_grad():
        ours = [run.objective.head(run.model.model(input_ids=torch.tensor([i])).last_hidden_state[0, -1]).item() for i in ids]
    export_run(config["output"], "merged", tmp_path / "merged")
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        theirs = [classifier(input_ids=torch.tensor([i])).logits.item() for i in ids]
    assert theirs == pytest.approx(ours, abs=1e-4)


@pytest.mark.parametrize("case", ["dpo", "reward"])
def test_a_preference_task_scores_pairwise_accuracy_as_training_eval_does(case, data, tmp_path):
    """`tunelab eval RUN --task` on preference rows: a reward model by its reward, a DPO policy by
    its implicit reward against its base; on the run's eval rows both agree with the run's own eval."""
    from tunelab.eval.harness import evaluate_task
    from tunelab.eval.tasks import load_task

    config = objective_config(tmp_path / "run", data, case, train={"max_steps": 3, "lr": 1e-2})
    report = tunelab.train(config).report
    task = load_task({"type": "preference", "data": str(data["preference_eval"]), "max_length": 384})
    metrics = evaluate_task(config["output"], task)["metrics"]
    expected = report["eval_accuracy"] if case == "reward" else report["eval_rewards/accuracies"]
    assert metrics["pairwise_accuracy"] == pytest.approx(expected)
    assert metrics["scored_by"] == ("reward" if case == "reward" else "implicit reward vs base")
    bare = evaluate_task("tiny-random-llama", task, out=tmp_path / "bare")["metrics"]
    assert bare["scored_by"] == "log-probability" and 0.0 <= bare["pairwise_accuracy"] <= 1.0


# --- metrics sinks -----------------------------------------------------------------------------------


def test_tensorboard_gets_every_logged_record(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = objective_config(tmp_path / "run", data, "dpo", train={"max_steps": 3, "report_to": ["tensorboard"]})
    tunelab.train(config)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/rewards/accuracies", "train/logps/chosen", "eval/loss", "eval/rewards/margins"} <= tags
    logged = [m["loss"] for m in read_metrics(config["output"])]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(logged)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]


def test_wandb_and_mlflow_get_the_same_records(data, tmp_path, monkeypatch):
    """Both trackers through stand-in modules (the real packages are optional extras): every record
    arrives with its step, and each run is closed."""
    calls = {"wandb": [], "mlflow": []}

    class WandbRun:
        def log(self, scalars, step):
            calls["wandb"].append((step, scalars))

        def finish(self):
            calls["wandb"].append("finish")

    wandb = types.ModuleType("wandb")
    wandb.__spec__ = types.SimpleNamespace(name="wandb")
    wandb.init = lambda **kwargs: calls["wandb"].append(("init", kwargs["config"]["objective"]["name"])) or WandbRun()
    mlflow = types.ModuleType("mlflow")
    mlflow.__spec__ = types.SimpleNamespace(name="mlflow")
    mlflow.start_run = lambda run_name: types.SimpleNamespace(info=types.SimpleNamespace(run_id="1"))
    mlflow.log_dict = lambda config, name: None
    mlflow.log_metrics = lambda scalars, step: calls["mlflow"].append((step, scalars))
    mlflow.end_run = lambda: calls["mlflow"].append("finish")
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.setattr(reporting.importlib.util, "find_spec", lambda name: object())

    config = objective_config(tmp_path / "run", data, "sft", train={"max_steps": 2, "report_to": ["wandb", "mlflow"]})
    tunelab.train(config)
    assert calls["wandb"][0] == ("init", "sft") and calls["wandb"][-1] == "finish"
    for tracker in ("wandb", "mlflow"):
        records = [c for c in calls[tracker] if isinstance(c, tuple) and isinstance(c[0], int)]
        assert [step for step, _ in records] == [1, 2]
        assert records[0][1]["train/loss"] == read_metrics(config["output"])[0]["loss"]


def test_a_missing_tracker_package_fails_before_any_write(data, tmp_path, monkeypatch):
    monkeypatch.setattr(reporting.importlib.util, "find_spec", lambda name: None)
    config = objective_config(tmp_path / "run", data, "sft", train={"report_to": ["wandb"]})
    with pytest.raises(TunelabError, match="report_to: wandb needs the 'wandb' package"):
        tunelab.train(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("prompt_length", [0, 1, 5])
def test_a_shared_prompt_gives_every_target_the_log_probability_of_the_pair_laid_out_whole(prompt_length):
    """Computing a pair's prompt once (both completions attend to it) predicts the same tokens at
    the same positions for the same sequences, with the same log-probabilities, as laying out each
    sequence whole; the chosen sequence's prompt targets (ORPO's) stay its own."""
    from tunelab.data.batching import make_batch, make_shared_prefix_batch
    from tunelab.models.loader import load_model
    from tunelab.objectives.causal_lm import target_log_probs

    model, _ = load_model(tunelab.config.ModelConfig(name="tiny-random-llama", dtype="float32", device="cpu"))
    generator = torch.Generator().manual_seed(prompt_length)
    pairs = [[torch.randint(3, 200, (n,), generator=generator).tolist() for n in (prompt_length, 4 + k, 7 - k)] for k in range(3)]
    whole = [{"input_ids": p + c, "target_mask": [1] * len(p) + [1] * len(c)} for p, c, _ in pairs]  # ORPO's chosen
    sequences = whole + [{"input_ids": p + r, "target_mask": [0] * len(p) + [1] * len(r)} for p, _, r in pairs]
    groups = [(prompt_length, [i, len(pairs) + i]) for i in range(len(pairs))]
    alone, shared = make_batch(sequences, 256, True, 0, padding_free=True), make_shared_prefix_batch(sequences, groups)
    assert shared.n_tokens == alone.n_tokens and shared.n_targets == alone.n_targets
    assert shared.input_ids.shape[1] == alone.n_tokens - max(prompt_length - 1, 0) * len(pairs)

    def by_target(batch):
        with torch.no_grad():
            targets = target_log_probs(model, batch)
        labels = batch.labels[batch.labels != -100]
        return {(o, p, y): v for o, p, y, v in zip(targets.owner.tolist(), targets.position.tolist(), labels.tolist(), targets.log_probs.tolist())}

    expected, got = by_target(alone), by_target(shared)
    assert got.keys() == expected.keys()
    assert list(got.values()) == pytest.approx([expected[key] for key in got], abs=1e-5)


def test_shared_prompts_must_be_the_same_tokens():
    from tunelab.data.batching import make_shared_prefix_batch

    sequences = [{"input_ids": [5, 6, 7, 8], "target_mask": [0, 0, 1, 1]}, {"input_ids": [5, 9, 7, 8], "target_mask": [0, 0, 1, 1]}]
    with pytest.raises(ValueError, match="same prefix"):
        make_shared_prefix_batch(sequences, [(2, [0, 1])])
