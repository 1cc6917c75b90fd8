"""Many LoRA adapters on one base in one batch (serve/adapters.py), against peft's mixed-adapter
batch (`adapter_names`) and against each request generated alone; the continuous-batching engine
(serve/engine.py): requests joining and leaving the batch, seeded sampling, cancel, unload, queue."""

from __future__ import annotations

import peft
import pytest
import torch

import tunelab
from helpers import TINY_MODEL, tiny_run_config, write_records_data
from peft_oracle import assert_close, fresh_base
from tunelab.errors import TunelabError
from tunelab.export import export_run
from tunelab.generation import generate
from tunelab.models.tiny import tiny_tokenizer
from tunelab.runs import load_run
from tunelab.serve.adapters import AdapterSet, MultiLoraLinear, read_adapter, rows_using
from tunelab.serve.engine import Engine, QueueFull, SamplingParams, UnknownModel

ADAPTERS = {
    "a": {"r": 4, "alpha": 8.0, "target": "all-linear"},
    "b": {"r": 2, "alpha": 4.0, "rslora": True, "target": ["q_proj", "v_proj", "down_proj"]},
}


@pytest.fixture(scope="module")
def runs(module_cache, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    train_file, _ = write_records_data(folder, n_train=8)
    made = {}
    for seed, (name, method) in enumerate(ADAPTERS.items()):
        config = tiny_run_config(folder / name, train_file, method={"dropout": 0.0, **method}, train={"max_steps": 3, "lr": 3e-2, "seed": seed})
        made[name] = tunelab.train(config).output_dir
        export_run(made[name], "peft", folder / f"{name}-peft")
    return made


def served(runs, from_peft: bool = False):
    model = fresh_base().eval()
    adapters = AdapterSet(model)
    for name, run in runs.items():
        adapters.load(read_adapter(name, run.parent / f"{name}-peft" if from_peft and name == "b" else run, TINY_MODEL))
    return model, adapters


@torch.no_grad()
def test_a_mixed_adapter_batch_equals_peft_adapter_names(runs):
    model, adapters = served(runs, from_peft=True)
    reference = peft.PeftModel.from_pretrained(fresh_base(), runs["a"].parent / "a-peft", adapter_name="a")
    reference.load_adapter(runs["b"].parent / "b-peft", adapter_name="b")
    reference.eval()
    ids = torch.randint(3, 200, (5, 12), generator=torch.Generator().manual_seed(0))
    names = ["a", "b", None, "a", "b"]
    with rows_using(adapters.rows(names)):
        ours = model(input_ids=ids).logits
    theirs = reference(input_ids=ids, adapter_names=[n or "__base__" for n in names]).logits
    assert_close(ours, theirs, 1e-5, "mixed-adapter logits")
    assert (ours[0] - ours[2]).abs().max() > 1e-3 and (ours[1] - ours[2]).abs().max() > 1e-3  # adapters act
    plain = model(input_ids=ids).logits  # outside rows_using: the base alone
    assert_close(plain[2], ours[2], 1e-6, "base row")


def test_unload_and_bad_adapters_fail_naming_what(runs, tmp_path):
    model, adapters = served(runs)
    adapters.unload("a")
    with pytest.raises(TunelabError, match="unknown adapter.*a.*loaded: b"):
        adapters.rows(["a"])
    assert all(0 not in m.updates for m in model.modules() if isinstance(m, MultiLoraLinear))
    with pytest.raises(TunelabError, match="already loaded"):
        adapters.load(read_adapter("b", runs["b"], TINY_MODEL))
    with pytest.raises(TunelabError, match="neither a tunelab run directory nor a peft adapter"):
        read_adapter("x", tmp_path / "missing", TINY_MODEL)


@pytest.mark.parametrize("variant", [{"dora": True}, {"init": "pissa"}], ids=["dora", "pissa"])
def test_lora_variants_that_are_not_plain_low_rank_are_served_as_merged_layers_from_runs_and_peft(variant, module_cache, tmp_path):
    """DoRA's and PiSSA's change of a layer is not B A on the served base: a run is served as its
    merged layers' change; the peft export too, except PiSSA's, which peft's format holds as a plain
    LoRA of twice the rank on the original base."""
    train_file, _ = write_records_data(tmp_path, n_train=8)
    run = tunelab.train(tiny_run_config(tmp_path / "run", train_file, method={"target": "all-linear", **variant}, train={"max_steps": 2, "lr": 1e-2})).output_dir
    export_run(run, "peft", tmp_path / "peft")
    model = fresh_base().eval()
    adapters = AdapterSet(model)
    kinds = {}
    for name, source in (("run", run), ("peft", tmp_path / "peft")):
        adapter = read_adapter(name, source, TINY_MODEL)
        kinds[name] = adapter.kind
        adapters.load(adapter)
    assert kinds == {"run": "merged", "peft": "merged" if variant.get("dora") else "low-rank"}
    ids = torch.randint(3, 200, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), rows_using(adapters.rows(["run", None, "peft"])):
        served = model(input_ids=ids).logits
    trained = load_run(run).model.eval()
    with torch.no_grad():
        assert_close(served[[0, 2]], trained(input_ids=ids[[0, 2]]).logits, 1e-5, "served rows")
        assert_close(served[1], fresh_base()(input_ids=ids[1:2]).logits[0], 1e-6, "base row")


@pytest.fixture
def engine(runs):
    model, adapters = served(runs)
    engine = Engine(model, tiny_tokenizer(), adapters, "base", max_batch=3, max_queue=16).start()
    yield engine
    engine.close()


def wait(sequences):
    for sequence in sequences:
        assert sequence.done.wait(60), "the engine did not finish a sequence"
    return sequences


def test_requests_joining_and_leaving_a_running_batch_equal_each_alone(runs, engine):
    """Six greedy requests over two adapters and the base, of different prompt and output lengths,
    through a batch of at most 3: later ones join as earlier ones leave, with padding both ways."""
    prompts = ["Name: Ana", "A much longer prompt than the first one, with more tokens", "Hi", "Order 7", "x", "Name: Rui, 40"]
    names = ["a", "b", "base", "b", "a", "base"]
    lengths = [3, 12, 7, 10, 5, 9]
    sequences = wait([engine.submit(engine.prompt_ids(p), n, SamplingParams(max_new_tokens=m))[0] for p, n, m in zip(prompts, names, lengths)])
    alone_models = {name: load_run(run).model for name, run in runs.items()} | {"base": fresh_base()}
    alone = [generate(alone_models[n], tiny_tokenizer(), [p], max_new_tokens=m)[0] for p, n, m in zip(prompts, names, lengths)]
    assert [s.text.strip() for s in sequences] == alone
    assert all(s.finish_reason in ("stop", "length") and len(s.tokens) <= m for s, m in zip(sequences, lengths))
    steps = engine.metrics.registry.get_sample_value("tunelab_batch_size_count")
    rows = engine.metrics.registry.get_sample_value("tunelab_batch_size_sum")
    assert rows / steps > 2 and steps < sum(lengths) / 2  # they really shared decoding steps


def test_a_seeded_sampled_request_gives_the_same_tokens_alone_and_in_a_batch(engine):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    prompt = engine.prompt_ids("Name: Ana")
    (alone,) = wait(engine.submit(prompt, "a", params))
    crowd = [engine.submit(engine.prompt_ids(p), "b", SamplingParams(max_new_tokens=12, temperature=1.0)) for p in ("Hi", "Order 7")]
    (amid,) = wait(engine.submit(prompt, "a", params))
    wait([s for group in crowd for s in group])
    assert amid.tokens == alone.tokens
    other_seed = wait(engine.submit(prompt, "a", SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=8)))[0]
    assert other_seed.tokens != alone.tokens


def test_a_cancelled_sequence_leaves_and_the_others_go_on(engine):
    long = engine.submit(engine.prompt_ids("Name: Ana"), "a", SamplingParams(max_new_tokens=200))
    other = engine.submit(engine.prompt_ids("Hi"), "b", SamplingParams(max_new_tokens=6))
    engine.cancel(long)
    wait(long + other)
    assert long[0].finish_reason == "cancelled" and len(long[0].tokens) < 200
    assert other[0].finish_reason in ("stop", "length")


def test_an_adapter_unloaded_mid_request_finishes_that_request_then_its_weights_go(runs, engine):
    prompt = engine.prompt_ids("Order 7")
    (expected,) = wait(engine.submit(prompt, "a", SamplingParams(max_new_tokens=12)))
    (running,) = engine.submit(prompt, "a", SamplingParams(max_new_tokens=12))
    engine.unload_adapter("a")
    with pytest.raises(UnknownModel, match="`a` does not exist"):
        engine.submit(prompt, "a", SamplingParams(max_new_tokens=2))
    wait([running])
    assert running.tokens == expected.tokens
    wait(engine.submit(prompt, "b", SamplingParams(max_new_tokens=2)))  # a step after the last row using it
    with engine.model_lock:  # that step has ended
        assert all(0 not in m.updates for m in engine.model.modules() if isinstance(m, MultiLoraLinear))


def test_a_full_queue_refuses_more(runs):
    model, adapters = served(runs)
    engine = Engine(model, tiny_tokenizer(), adapters, "base", max_queue=2)  # not started: nothing leaves the queue
    engine.submit([1, 2], "a", SamplingParams(max_new_tokens=2), n=2)
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit([1, 2], "b", SamplingParams(max_new_tokens=2))


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(engine, monkeypatch):
    prompt = engine.prompt_ids("Order 7")

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(engine.model, "forward", broken)
    failed = wait(engine.submit(prompt, "a", SamplingParams(max_new_tokens=4), n=2))
    assert [s.finish_reason for s in failed] == ["error", "error"] and "out of memory, say" in failed[0].error
    monkeypatch.undo()
    (served,) = wait(engine.submit(prompt, "a", SamplingParams(max_new_tokens=4)))
    assert served.finish_reason in ("stop", "length") and served.tokens
