"""Distillation (objectives/distill.py): the divergence equals TRL's GKD generalized JSD (values and
gradients), its end points are the two KLs, the interpolated form holds near them, and a student
trained on a teacher's distribution moves toward it."""

from __future__ import annotations

import pytest
import torch

import tunelab
from helpers import read_metrics, tiny_run_config, write_records_data
from tunelab.errors import TunelabError
from tunelab.objectives.distill import LinearDivergence, divergence_and_gradient

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
