"""Distillation (objectives/distill.py): the divergence equals TRL's GKD generalized JSD (values and
gradients), its end points are the two KLs, the interpolated form holds near them, and a student
trained on a teacher's distribution moves toward it."""

from __future__ import annotations

import pytest
import torch

import tunelab
from helpers import read_metrics, tiny_run_config, write_jsonl, write_records_data
from tunelab.errors import TunelabError
from tunelab.export.exporters import export_run
from tunelab.objectives.distill import LinearDivergence, completion_prompt, divergence_and_gradient, on_policy_step

ROWS, HIDDEN, VOCAB = 37, 16, 300
pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")


def logits_case(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, HIDDEN, generator=generator, dtype=torch.float64).float()
    weight = torch.randn(VOCAB, HIDDEN, generator=generator, dtype=torch.float64).float()
    teacher_hidden = hidden + 0.5 * torch.randn(ROWS, HIDDEN, generator=generator)
    teacher_weight = weight + 0.5 * torch.randn(VOCAB, HIDDEN, generator=generator)
    return hidden, weight, teacher_hidden, teacher_weight


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergence_and_gradients_equal_trls_generalized_jsd(beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    hidden, weight, teacher_hidden, teacher_weight = logits_case()
    ours_h, ours_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = LinearDivergence.apply(ours_h, ours_w, teacher_hidden, teacher_weight, beta, temperature) / ROWS
    ours.backward()
    theirs_h, theirs_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    theirs = GKDTrainer.generalized_jsd_loss(
        (theirs_h @ theirs_w.t())[None], (teacher_hidden @ teacher_weight.t())[None], labels=torch.zeros(1, ROWS, dtype=torch.long), beta=beta, temperature=temperature
    )
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    for mine, trl in ((ours_h.grad, theirs_h.grad), (ours_w.grad, theirs_w.grad)):
        assert (mine - trl).norm() / trl.norm() < 1e-5


def test_end_points_are_the_two_kls_and_the_mixture_holds_near_them():
    """beta 0: KL(teacher ‖ student), beta 1: KL(student ‖ teacher), exactly; at 0.9 and 0.99 the
    generalized JSD of the definition, computed in float64 (it tends to 0 there, not to a KL)."""
    hidden, weight, teacher_hidden, teacher_weight = logits_case(1)
    student, teacher = (hidden @ weight.t()).double(), (teacher_hidden @ teacher_weight.t()).double()
    p_s, p_t = torch.softmax(student, -1), torch.softmax(teacher, -1)
    forward = (p_t * (p_t.log() - p_s.log())).sum(-1)
    reverse = (p_s * (p_s.log() - p_t.log())).sum(-1)
    assert torch.allclose(divergence_and_gradient(student, teacher, 0.0)[0], forward)
    assert torch.allclose(divergence_and_gradient(student, teacher, 1.0)[0], reverse)
    for beta in (0.9, 0.99):
        m = (1 - beta) * p_s + beta * p_t
        expected = beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)
        ours = LinearDivergence.apply(hidden, weight, teacher_hidden, teacher_weight, beta, 1.0)
        assert ours.item() == pytest.approx(expected.sum().item(), rel=1e-5)
        assert torch.allclose(divergence_and_gradient(student.float(), teacher.float(), beta)[0].double(), expected, rtol=1e-4, atol=1e-7)
    assert (expected < 0.05 * reverse).all(), "near beta 1 the mixture is near the teacher: the JSD is small"


@pytest.fixture(scope="module")
def records(module_cache, tmp_path_factory):
    return write_records_data(tmp_path_factory.mktemp("records"), n_train=16, n_eval=4)


def test_a_student_moves_toward_its_teacher(records, tmp_path):
    """A teacher run (LoRA, trained on the records), then a fresh student distilled from it: the
    divergence on the data falls, and the student ends closer to the teacher than it started."""
    train_file, eval_file = records
    teacher = tiny_run_config(tmp_path / "teacher", train_file, train={"max_steps": 8, "lr": 1e-2})
    tunelab.train(teacher)
    for loss in ("forward_kl", "reverse_kl", "jsd"):
        config = tiny_run_config(
            tmp_path / loss, train_file, eval_file, objective={"name": "distill", "teacher": str(tmp_path / "teacher"), "loss": loss}, train={"max_steps": 8, "lr": 1e-2}
        )
        report = tunelab.train(config).report
        divergences = [m["divergence"] for m in read_metrics(config["output"])]
        assert divergences[0] > 0 and divergences[-1] < 0.5 * divergences[0], (loss, divergences)
        assert report["eval_divergence"] < divergences[0]


def test_a_teacher_with_another_vocabulary_is_refused(records, tmp_path, monkeypatch):
    from tunelab.train import loop

    train_file, _ = records
    real = loop.load_model

    def other_vocabulary(config):
        if config.name != "teacher-model":
            return real(config)
        model, tokenizer = real(config.model_copy(update={"name": "tiny-random-llama"}))
        tokenizer.add_tokens(["<extra>"])
        return model, tokenizer

    monkeypatch.setattr(loop, "load_model", other_vocabulary)
    config = tiny_run_config(tmp_path / "run", train_file, objective={"name": "distill", "teacher": "teacher-model"})
    with pytest.raises(TunelabError, match=r"objective.teacher teacher-model has another vocabulary \(\d+ tokens\) than the student tiny-random-llama"):
        tunelab.train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_on_policy_steps_are_the_exact_share_spread_evenly():
    steps = range(1, 9)
    assert [k for k in steps if on_policy_step(k, 0.0)] == []
    assert [k for k in steps if on_policy_step(k, 0.25)] == [4, 8]
    assert [k for k in steps if on_policy_step(k, 0.5)] == [2, 4, 6, 8]
    assert [k for k in steps if on_policy_step(k, 1.0)] == list(steps)
    assert sum(on_policy_step(k, 0.3) for k in range(1, 101)) == 30


def test_a_rows_prompt_is_what_precedes_its_last_completion():
    chat = {"input_ids": list(range(10)), "target_mask": [0, 0, 0, 1, 1, 0, 0, 1, 1, 1]}
    assert completion_prompt(chat) == list(range(7))
    assert completion_prompt({"prompt_ids": [5, 6], "where": "f:1"}) == [5, 6]


def distill_config(output, train_file, eval_file, objective: dict, **train) -> dict:
    options = {"name": "distill", "max_completion_length": 8, **objective}
    return tiny_run_config(output, train_file, eval_file, objective=options, train={"max_steps": 4, "lr": 1e-2, **train})


@pytest.fixture(scope="module")
def teacher_run(records, tmp_path_factory):
    """A LoRA teacher trained on the records, and its peft export."""
    folder = tmp_path_factory.mktemp("teacher")
    tunelab.train(tiny_run_config(folder / "run", records[0], train={"max_steps": 8, "lr": 1e-2}))
    return folder / "run", export_run(folder / "run", "peft", folder / "peft")


def test_on_policy_steps_train_on_the_students_own_completions(records, teacher_run, tmp_path):
    """Half the steps (2 and 4) sample the student's completions of the rows' prompts: the loss
    falls on exactly the generated tokens; the others train on the data's completions."""
    config = distill_config(tmp_path / "run", *records, {"teacher": str(teacher_run[0]), "on_policy_fraction": 0.5})
    tunelab.train(config)
    metrics = read_metrics(config["output"])
    assert [m["on_policy"] for m in metrics] == [0.0, 1.0, 0.0, 1.0]
    for m in metrics:
        if m["on_policy"]:
            assert m["target_tokens"] == m["generated_tokens"] > 0 and m["completions/max_length"] <= 8
        else:
            assert m["generated_tokens"] == 0 and m["target_tokens"] > 8 * 4


def test_label_free_distillation_trains_on_the_teachers_completions(tmp_path):
    """Prompt-only rows: off-policy steps train on the teacher's sampled completions, held-out
    prompts are scored on its greedy ones. The teacher is the student's base, so the LoRA student
    starts as the teacher: its first divergence is zero."""
    train_file = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about {i}:"} for i in range(16)])
    eval_file = write_jsonl(tmp_path / "held_out.jsonl", [{"prompt": f"About {i}:"} for i in range(3)])
    config = distill_config(tmp_path / "run", train_file, eval_file, {"teacher": "tiny-random-llama", "loss": "forward_kl", "on_policy_fraction": 0.5, "alpha": 0.5})
    report = tunelab.train(config).report
    metrics = read_metrics(config["output"])
    assert [m["on_policy"] for m in metrics] == [0.0, 1.0, 0.0, 1.0]
    assert all(m["target_tokens"] == m["generated_tokens"] > 0 for m in metrics)
    assert metrics[0]["divergence"] == pytest.approx(0.0, abs=1e-6) and metrics[-1]["divergence"] > 1e-4
    assert report["eval_divergence"] > 0 and report["eval_target_tokens"] > 0


def test_a_peft_adapter_teacher_is_the_run_it_was_exported_from(records, teacher_run, tmp_path):
    """The teacher as a run directory or as its peft export (on the student's base): the same run."""
    losses = {}
    for kind, teacher in zip(("run", "peft"), teacher_run):
        config = distill_config(tmp_path / kind, *records, {"teacher": str(teacher)}, max_steps=2)
        tunelab.train(config)
        losses[kind] = [(m["loss"], m["grad_norm"]) for m in read_metrics(config["output"])]
    assert losses["peft"] == pytest.approx(losses["run"], rel=1e-5) and losses["run"][0][0] > 0


def test_on_policy_steps_without_a_prompt_fail_naming_the_option(records, tmp_path):
    """data.train_on: all makes every token a target: a row has no prompt for the student to answer."""
    config = distill_config(tmp_path / "run", *records, {"teacher": "tiny-random-llama", "on_policy_fraction": 1.0})
    config["data"]["train_on"] = "all"
    with pytest.raises(TunelabError, match="objective.on_policy_fraction: on-policy steps need a prompt"):
        tunelab.train(config)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "adapter").exists()
