"""What every registered method must do with the core: exact resume, padded and packed batches,
evaluation, batched generation, serving beside other adapters. Parametrized over the registry, so a new method is covered the
moment it is registered."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import tunelab
from helpers import TINY_MODEL, assert_tensors_equal, load_adapter, read_metrics, read_report, tiny_run_config, write_jsonl, write_preference_data, write_records_data
from peft_oracle import fresh_base, train_tiny_run_checked
from tunelab.errors import TunelabError
from tunelab.eval.likelihood import continuation_logprobs
from tunelab.export import export_run
from tunelab.generation import generate
from tunelab.methods.base import FORWARD_TARGETS, LinearAdapterMethod
from tunelab.methods.registry import get_method_class, method_names
from tunelab.runs import load_run
from tunelab.serve.adapters import AdapterSet, read_adapter, rows_using

# Small options where a method's defaults are sized for real models; every other option is the default.
SMALL = {"prompt_tuning": {"num_virtual_tokens": 4}, "prefix_tuning": {"num_virtual_tokens": 4}}
METHODS = method_names()


def options(name: str) -> dict:
    return {"name": name, **SMALL.get(name, {})}


@pytest.fixture(scope="module")
def records(module_cache, tmp_path_factory):
    return write_records_data(tmp_path_factory.mktemp("records"), n_train=8, n_eval=4)


@pytest.mark.parametrize("name", METHODS)
def test_resume_is_bitwise_exact(name, records, tmp_path):
    train_file, _ = records
    config = tiny_run_config(tmp_path / "run", train_file, method=options(name), train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 5})
    tunelab.train(config)
    weights = "model" if get_method_class(name).artifact == "model" else "adapter"
    finished = load_adapter(config["output"]) if weights == "adapter" else None
    report = tunelab.train(config, resume=True).report
    assert report["resumed_from_step"] == 2
    if finished is not None:
        assert_tensors_equal(load_adapter(config["output"]), finished)


@pytest.mark.parametrize("name", METHODS)
def test_padded_rows_train_and_evaluate(name, records, tmp_path):
    train_file, eval_file = records
    config = tiny_run_config(tmp_path / "run", train_file, eval_file, method=options(name), data={"packing": False}, train={"max_steps": 2})
    tunelab.train(config)
    report = read_report(config["output"])
    assert math.isfinite(report["eval_loss"]) and report["trainable_params"] > 0


@pytest.mark.parametrize("name", METHODS)
def test_batched_generation_and_scoring_equal_one_prompt_at_a_time(name, records, tmp_path):
    """Left padding and a reused KV cache must not change what a method generates or how likely it
    finds a continuation (virtual tokens and positions included): batched generation equals one
    prompt at a time, and cached continuation scoring equals one unpadded forward per pair."""
    train_file, _ = records
    run = tunelab.train(tiny_run_config(tmp_path / "run", train_file, method=options(name), train={"max_steps": 2, "lr": 1e-2})).output_dir
    loaded = load_run(run)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = ["Name: Ana", "A much longer prompt than the first one", "Hi"]
    with torch.no_grad():
        batched = generate(model, tokenizer, prompts, max_new_tokens=6)
        alone = [generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone

    pairs = [(p, c) for p in prompts for c in (" yes", " no way", " a")]
    scored = continuation_logprobs(model, tokenizer, pairs, batch_size=2)
    for (prompt, continuation), (logprob, count) in zip(pairs, scored):
        context = tokenizer(prompt)["input_ids"]
        tokens = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        # As in training: the positions predicting the continuation are targets (ReFT edits the rest).
        predicting = torch.zeros(1, len(context) + len(tokens), dtype=torch.bool)
        predicting[0, len(context) - 1 : -1] = True
        marked = FORWARD_TARGETS.set(predicting)
        try:
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([context + tokens])).logits[0].double().log_softmax(-1)
        finally:
            FORWARD_TARGETS.reset(marked)
        expected = sum(logp[len(context) + j - 1, token].item() for j, token in enumerate(tokens))
        assert count == len(tokens) and logprob == pytest.approx(expected, abs=1e-4), (prompt, continuation)


@pytest.mark.parametrize("name", METHODS)
def test_merged_export_equals_the_adapter_model_or_is_refused(name, records, tmp_path):
    """`tunelab export --format merged` of a trained run: a plain HF checkpoint with the run's logits
    (1e-4), or, for methods that are not a change of weights, a clear refusal that writes nothing."""
    train_file, _ = records
    run = tunelab.train(tiny_run_config(tmp_path / "run", train_file, method=options(name), train={"max_steps": 2, "lr": 1e-2})).output_dir
    out = tmp_path / "merged"
    if not get_method_class(name).mergeable:
        with pytest.raises(TunelabError, match="cannot be merged"):
            export_run(run, "merged", out)
        assert not out.exists() and not list(tmp_path.glob(".merged-*"))
        return
    export_run(run, "merged", out)
    ids = torch.tensor([[1, 17, 42, 99, 7, 23, 64, 5]])
    with torch.no_grad():
        adapted = load_run(run).model.eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
    assert (merged - adapted).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", METHODS)
def test_training_moves_the_trainable_tensors_and_no_other_weight_and_reloads(name, tmp_path, monkeypatch):
    train_tiny_run_checked(monkeypatch, tmp_path, options(name))


@pytest.mark.parametrize("name", [n for n in METHODS if get_method_class(n).peft_type is None])
def test_peft_export_of_a_method_peft_lacks_is_refused_writing_nothing(name, records, tmp_path):
    train_file, _ = records
    run = tunelab.train(tiny_run_config(tmp_path / "run", train_file, method=options(name), train={"max_steps": 1})).output_dir
    out = tmp_path / "exported"
    with pytest.raises(TunelabError, match="no peft equivalent"):
        export_run(run, "peft", out)
    assert not out.exists() and not list(tmp_path.glob(".exported-*"))


@pytest.fixture(scope="module")
def pairs(module_cache, tmp_path_factory):
    return write_preference_data(tmp_path_factory.mktemp("pairs"), n_train=8, n_eval=2)


@pytest.mark.parametrize("name", METHODS)
def test_trains_under_dpo_with_a_reference_equal_to_the_policy_at_step_0(name, pairs, tmp_path):
    """Whatever reference a method gets (its adapter switched off, a frozen copy, or its initial
    policy's precomputed log-probabilities), at step 0 it is the policy: the implicit rewards are 0
    and the DPO loss is exactly ln 2 (plus the method's own regularization: AdaLoRA's)."""
    train_file, eval_file = pairs
    config = tiny_run_config(tmp_path / "run", train_file, eval_file, method=options(name), objective={"name": "dpo"}, train={"max_steps": 2, "lr": 1e-2})
    report = tunelab.train(config).report
    first = read_metrics(config["output"])[0]
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6) and first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    if name != "adalora":
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert report["reference"] in ("adapter off", "frozen copy", "precomputed")
    assert math.isfinite(report["eval_loss"])


@pytest.fixture(scope="module")
def prompt_rows(module_cache, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    rows = [{"prompt": f"Name {i}:", "answer": str(i)} for i in range(8)]
    return write_jsonl(folder / "train.jsonl", rows), write_jsonl(folder / "eval.jsonl", rows[:2])


@pytest.mark.parametrize("name", METHODS)
def test_trains_under_grpo_on_its_own_samples(name, prompt_rows, tmp_path):
    """Sampling in eval mode between training steps, the log-probs of the sampling policy kept for a
    second step (num_iterations 2), and a greedy held-out pass: every method goes through them."""
    train_file, eval_file = prompt_rows
    objective = {"name": "grpo", "num_generations": 2, "max_completion_length": 4, "num_iterations": 2, "rewards": [{"name": "format", "pattern": "[a-z]"}]}
    config = tiny_run_config(tmp_path / "run", train_file, eval_file, method=options(name), objective=objective, train={"max_steps": 2, "batch_size": 2, "lr": 1e-2})
    report = tunelab.train(config).report
    first, second = read_metrics(config["output"])
    assert first["generated_tokens"] > 0 and second["generated_tokens"] == 0
    assert math.isfinite(first["loss"]) and math.isfinite(second["loss"]) and 0.0 <= report["eval_reward"] <= 1.0


@pytest.mark.parametrize("name", METHODS)
def test_trains_under_on_policy_distillation(name, records, tmp_path):
    """Step 1 on the data's completions, step 2 on the student's own (sampled between steps), the
    divergence from a teacher through the method's forward: every method goes through them."""
    train_file, eval_file = records
    objective = {"name": "distill", "teacher": "tiny-random-llama", "on_policy_fraction": 0.5, "max_completion_length": 4, "alpha": 0.5}
    config = tiny_run_config(tmp_path / "run", train_file, eval_file, method=options(name), objective=objective, train={"max_steps": 2, "batch_size": 2, "lr": 1e-2})
    report = tunelab.train(config).report
    first, second = read_metrics(config["output"])
    assert (first["on_policy"], second["on_policy"]) == (0.0, 1.0) and first["generated_tokens"] == 0
    assert second["target_tokens"] == second["generated_tokens"] > 0
    assert math.isfinite(first["divergence"]) and math.isfinite(second["divergence"]) and report["eval_divergence"] >= 0


@pytest.mark.parametrize("name", METHODS)
def test_served_beside_the_base_in_one_batch_or_refused_by_name(name, records, tmp_path):
    """`tunelab serve`: a method that only changes linear layers' weights is served on the shared
    base (its rows of a mixed batch equal the run's own model); any other is refused, named."""
    train_file, _ = records
    run = tunelab.train(tiny_run_config(tmp_path / "run", train_file, method=options(name), train={"max_steps": 2, "lr": 1e-2})).output_dir
    if not issubclass(get_method_class(name), LinearAdapterMethod):
        with pytest.raises(TunelabError, match=f"method '{name}' changes the forward"):
            read_adapter(name, run, TINY_MODEL)
        return
    base = fresh_base().eval()
    adapters = AdapterSet(base)
    adapters.load(read_adapter(name, run, TINY_MODEL))
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with rows_using(adapters.rows([name, None])):
            served = base(input_ids=ids).logits
        trained = load_run(run).model.eval()(input_ids=ids[:1]).logits
    assert (served[0] - trained[0]).abs().max() <= 1e-5 * trained.abs().max()
    assert (served[0] - served[1]).abs().max() > 1e-4  # the adapter acts on its row
