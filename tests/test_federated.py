"""`tunelab federate`: client splits, the aggregators' arithmetic on real client runs (FedAvg is the
weighted mean; FLoRA's global model is base + Σ p_k ΔW_k; FedIT's is not), identical clients,
exact resume, backends, train.init_weights / train.proximal_mu, and bad configs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY_MODEL, assert_clean_failure, invoke, tiny_run_config, tree_state, write_jsonl, write_yaml
from tunelab.errors import TunelabError
from tunelab.federated import federate, load_federation
from tunelab.federated.split import answer_text, dirichlet_split, iid_split, row_label, split_rows

ADAPTER = Path("adapter") / "adapter.safetensors"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model trains fastest on one thread (and the process pool's workers get one each)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def labelled_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        good = i % 3 != 0
        rows.append(
            {
                "messages": [{"role": "user", "content": f"item {i} was {'good' if good else 'bad'}"}, {"role": "assistant", "content": "yes" if good else "no"}],
                "label": "pos" if good else "neg",
            }
        )
    return rows


@pytest.fixture(scope="module")
def data(module_cache, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fed-data")
    files = {"train": write_jsonl(folder / "train.jsonl", labelled_rows(24))}
    for name, (n, offset) in {"a": (4, 0), "b": (8, 4), "c": (12, 12)}.items():  # clients of 4, 8 and 12 rows
        files[name] = write_jsonl(folder / f"{name}.jsonl", labelled_rows(n, offset))
    files["eval"] = write_jsonl(folder / "eval.jsonl", [{"text": f"{i} was {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"} for i in range(6)])
    return files


def fed_config(folder: Path, data: dict, base_train: dict | None = None, **keys) -> Path:
    """A federation YAML of the tiny model (LoRA r 4), 3 clients from files of 4, 8 and 12 rows."""
    base = tiny_run_config(folder / "unused", data["train"], train={"lr": 1e-2, **(base_train or {})})
    del base["output"], base["data"]["train"]
    config = {
        "base": base,
        "output": str(folder / "fed"),
        "clients": [str(data[name]) for name in "abc"],
        "rounds": 1,
        "local_steps": 2,
        "task": {"type": "classification", "data": str(data["eval"]), "prompt": "item {text}", "labels": {"pos": "yes", "neg": "no"}},
        "zero_shot": False,
        "keep_round_weights": True,
        **keys,
    }
    return write_yaml(folder / "fed.yaml", config)


def client_adapters(fed_dir: Path, round_number: int) -> list[dict[str, torch.Tensor]]:
    runs = sorted((fed_dir / "rounds" / f"round-{round_number}").glob("client-*"), key=lambda p: int(p.name.split("-")[1]))
    return [load_file(run / ADAPTER) for run in runs]


def round_record(fed_dir: Path, round_number: int) -> dict:
    return json.loads((fed_dir / "rounds" / f"round-{round_number}" / "round.json").read_text())


def assert_tensors_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def lora_deltas(adapter: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """layer -> s·B·A of a LoRA adapter's tensors, in float64."""
    return {
        name.removesuffix(".lora_A.weight"): scale * adapter[name.replace("lora_A", "lora_B")].double() @ a.double()
        for name, a in adapter.items()
        if name.endswith(".lora_A.weight")
    }


def merged_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from tunelab.runs import load_run

    loaded = load_run(run_dir)
    loaded.method.merge(loaded.model)
    return {name: t.detach().double() for name, t in loaded.model.state_dict().items()}


# ---- splits


def test_iid_split_gives_every_row_once_in_near_equal_seeded_parts():
    parts = iid_split(23, 4, seed=3)
    assert sorted(i for part in parts for i in part) == list(range(23))
    assert sorted(len(part) for part in parts) == [5, 6, 6, 6]
    assert parts == iid_split(23, 4, seed=3) and parts != iid_split(23, 4, seed=4)


def test_dirichlet_split_gives_every_row_once_seeded_and_skewed_by_alpha():
    labels = ["pos"] * 400 + ["neg"] * 400

    def majority_share(alpha: float) -> float:
        parts = dirichlet_split(labels, 4, alpha, seed=0)
        assert sorted(i for part in parts for i in part) == list(range(800))  # each row exactly once
        assert all(parts)
        return sum(max(Counter(labels[i] for i in part).values()) for part in parts) / 800

    assert dirichlet_split(labels, 4, 0.5, seed=0) == dirichlet_split(labels, 4, 0.5, seed=0) != dirichlet_split(labels, 4, 0.5, seed=1)
    assert majority_share(0.1) > 0.85  # each client nearly one label
    assert majority_share(1000.0) < 0.56  # nearly IID: half of each


def test_split_rows_reads_labels_from_a_field_or_the_answer(tmp_path, data):
    parts = split_rows(data["train"], 3, "dirichlet", 0.5, "label", seed=0)
    assert sum(len(p.rows) for p in parts) == 24
    assert sum(sum(p.labels.values()) for p in parts) == 24
    by_answer = split_rows(data["train"], 3, "dirichlet", 0.5, "answer", seed=0)
    assert [sorted(p.labels) for p in by_answer] == [sorted({"pos": "yes", "neg": "no"}[k] for k in p.labels) for p in parts]
    assert answer_text({"instruction": "x", "output": " yes "}, "f:1") == "yes"
    assert answer_text({"prompt": "x", "completion": "no"}, "f:1") == "no"
    with pytest.raises(TunelabError, match=r"f:3: no field 'topic' to split the clients by \(clients.by"):
        row_label({"messages": []}, "topic", "f:3")


# ---- aggregators


@pytest.fixture(scope="module")
def fedavg_run(data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fedavg")
    federate(fed_config(folder, data))
    return folder / "fed"


def test_fedavg_is_the_weighted_mean_of_the_clients(fedavg_run):
    record = round_record(fedavg_run, 1)
    assert [c["examples"] for c in record["clients"]] == [4, 8, 12]
    weights = [c["weight"] for c in record["clients"]]
    assert weights == [4 / 24, 8 / 24, 12 / 24]
    clients = client_adapters(fedavg_run, 1)
    global_adapter = load_file(fedavg_run / "global" / ADAPTER)
    for name, tensor in global_adapter.items():
        expected = sum(w * c[name].double() for w, c in zip(weights, clients))
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-7)
    assert not torch.equal(clients[0][next(iter(clients[0]))], clients[2][next(iter(clients[2]))])  # the clients did differ
    sent = sum(t.numel() * 4 for t in clients[0].values())
    assert [c["bytes_sent"] for c in record["clients"]] == [sent] * 3 == [c["bytes_received"] for c in record["clients"]]


def test_fedit_differs_from_the_exact_weighted_update(fedavg_run):
    """FedAvg on LoRA (FedIT) averages A and B apart: s·(Σ p B)(Σ p A) is not Σ p s B A."""
    weights = [c["weight"] for c in round_record(fedavg_run, 1)["clients"]]
    scale = 8.0 / 4  # alpha / r
    exact = {}
    for w, adapter in zip(weights, client_adapters(fedavg_run, 1)):
        for layer, delta in lora_deltas(adapter, scale).items():
            exact[layer] = exact.get(layer, 0) + w * delta
    fedit = lora_deltas(load_file(fedavg_run / "global" / ADAPTER), scale)
    gap = sum((fedit[k] - exact[k]).norm() ** 2 for k in exact).sqrt() / sum(d.norm() ** 2 for d in exact.values()).sqrt()
    assert 1e-4 < gap < 1  # well above float noise (1e-7), yet the same update in the main


def test_flora_global_model_is_base_plus_the_weighted_client_updates(data, tmp_path):
    from tunelab.config.schema import ModelConfig
    from tunelab.models.loader import load_model

    fed_dir = tmp_path / "fed"
    federate(fed_config(tmp_path, data, aggregator="flora", rounds=2))
    base = {name: t.double() for name, t in load_model(ModelConfig(name=TINY_MODEL, dtype="float32", device="cpu"))[0].state_dict().items()}
    expected = dict(base)
    for round_number in (1, 2):
        weights = [c["weight"] for c in round_record(fed_dir, round_number)["clients"]]
        for w, adapter in zip(weights, client_adapters(fed_dir, round_number)):
            for layer, delta in lora_deltas(adapter, 8.0 / 4).items():
                expected[f"{layer}.weight"] = expected[f"{layer}.weight"] + w * delta
    merged = merged_weights(fed_dir / "global")
    updated = [name for name in base if not torch.equal(expected[name], base[name])]
    assert len(updated) == 14  # every linear layer of the 2 decoder layers
    for name in base:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=1e-5)
    assert round_record(fed_dir, 2)["global_rank"] == 2 * 3 * 4  # the rank grows by concatenation
    assert yaml_method(fed_dir / "global")["r"] == 24
    # Round 2's clients downloaded round 1's stacked update: 24 x (in + out) per layer... of rank 12.
    record = round_record(fed_dir, 2)
    assert record["clients"][0]["bytes_received"] == sum(t.numel() * 4 for t in load_file(fed_dir / "rounds" / "round-1" / "global.safetensors").values())
    assert round_record(fed_dir, 1)["clients"][0]["bytes_received"] == 0


def yaml_method(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["method"]


def test_identical_clients_leave_the_model_of_one_clients_training(data, tmp_path):
    same = {"file": str(data["c"]), "seed": 7}
    fed_dir = tmp_path / "fed"
    federate(fed_config(tmp_path, data, clients=[same, same], rounds=2))
    first, second = client_adapters(fed_dir, 2)
    assert_tensors_equal(second, first)
    assert_tensors_equal(load_file(fed_dir / "global" / ADAPTER), first)


# ---- resume and backends


@pytest.mark.parametrize("aggregator", ["fedprox", "flora"])
def test_resume_after_a_failed_round_is_exact(aggregator, data, tmp_path, monkeypatch):
    from tunelab.train import loop

    keys = {"aggregator": aggregator, "rounds": 2, "clients": [str(data["a"]), str(data["c"])], "keep_round_weights": False}
    keys |= {"mu": 1.0} if aggregator == "fedprox" else {}
    every_step = {"save_every": 1}  # a checkpoint after each step: the failed client resumes from one
    clean = fed_config(tmp_path / "clean", data, every_step, **keys)
    federate(clean)
    expected = load_file(tmp_path / "clean" / "fed" / "global" / ADAPTER)

    broken = fed_config(tmp_path / "broken", data, every_step, **keys)
    real_step, calls = loop.train_step, []

    def failing_step(run, step):
        calls.append(step)
        if len(calls) == 8:  # round 2, client 1's second step (2 clients of 2 steps a round)
            raise RuntimeError("node lost")
        return real_step(run, step)

    monkeypatch.setattr(loop, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="node lost"):
        federate(broken)
    monkeypatch.setattr(loop, "train_step", real_step)
    fed_dir = tmp_path / "broken" / "fed"
    assert (fed_dir / "rounds" / "round-1" / "round.json").is_file() and not (fed_dir / "rounds" / "round-2" / "round.json").exists()
    with pytest.raises(TunelabError, match="already holds a federation; pass --resume"):
        federate(broken)
    if aggregator == "flora":  # a folded base lost since: rebuilt from the stacked updates, bit for bit
        import shutil

        shutil.rmtree(fed_dir / "rounds" / "round-1" / "base-model")
    report = federate(broken, resume=True)
    assert_tensors_equal(load_file(fed_dir / "global" / ADAPTER), expected)
    assert report["scores"] == json.loads((tmp_path / "clean" / "fed" / "report.json").read_text())["scores"]
    assert not (fed_dir / "rounds" / "round-2" / "client-0" / "adapter").exists()  # weights cleaned once aggregated


def test_process_backend_gives_the_sequential_model(fedavg_run, data, tmp_path):
    federate(fed_config(tmp_path, data), backend="process", workers=1)  # one worker: one process start
    assert_tensors_equal(load_file(tmp_path / "fed" / "global" / ADAPTER), load_file(fedavg_run / "global" / ADAPTER))
    assert [c["loss"] for c in round_record(tmp_path / "fed", 1)["clients"]] == [c["loss"] for c in round_record(fedavg_run, 1)["clients"]]


# ---- the training loop's part: starting weights, the proximal term


def test_init_weights_and_proximal_term(data, tmp_path):
    import tunelab

    start = tunelab.train(tiny_run_config(tmp_path / "start", data["c"], train={"max_steps": 2, "lr": 1e-2})).output_dir / ADAPTER
    runs = {}
    for mu in (0.0, 50.0):
        config = tiny_run_config(tmp_path / f"mu-{mu}", data["c"], train={"max_steps": 3, "lr": 1e-2, "init_weights": str(start), "proximal_mu": mu, "save_every": 1})
        tunelab.train(config)
        runs[mu] = load_file(tmp_path / f"mu-{mu}" / ADAPTER)
    initial = load_file(start)

    def moved(state):
        return sum((state[k] - initial[k]).norm() ** 2 for k in initial).sqrt()

    assert moved(runs[50.0]) < moved(runs[0.0])  # the proximal term holds the weights near the start
    records = [json.loads(line) for line in (tmp_path / "mu-50.0" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["proximal"] == 0.0 < records[1]["proximal"]
    checkpoint = load_file(tmp_path / "mu-50.0" / "checkpoints" / "step-2" / "trainable.safetensors")
    assert_tensors_equal({k.removeprefix("proximal_anchor."): t for k, t in checkpoint.items() if k.startswith("proximal_anchor.")}, initial)


def test_init_weights_errors_name_the_key(data, tmp_path):
    import tunelab

    config = tiny_run_config(tmp_path / "run", data["c"], train={"init_weights": str(tmp_path / "missing.safetensors")})
    with pytest.raises(TunelabError, match="train.init_weights: .*missing.safetensors: file not found"):
        tunelab.train(config)
    assert not (tmp_path / "run").exists()


# ---- the command and bad configs


def test_cli_runs_resumes_and_refuses_a_changed_federation(data, tmp_path):
    path = fed_config(tmp_path, data, zero_shot=True)
    result = invoke("federate", path)
    assert result.exit_code == 0, result.output
    assert "round   1  accuracy" in result.output and "done" in result.output
    fed_dir = tmp_path / "fed"
    for name in ("federated.jsonl", "federated.png", "report.json", "global/config.yaml", "global/run.json", "federation.json"):
        assert (fed_dir / name).is_file(), name
    assert [json.loads(line)["round"] for line in (fed_dir / "federated.jsonl").read_text().splitlines()] == [0, 1]
    before = tree_state(fed_dir)
    assert_clean_failure(invoke("federate", path, "local_steps=3", "--resume"), "--resume", "local_steps")
    assert_clean_failure(invoke("federate", path), "already holds a federation")
    assert tree_state(fed_dir) == before
    # More rounds continue a finished federation.
    assert invoke("federate", path, "rounds=2", "--resume").exit_code == 0
    assert [json.loads(line)["round"] for line in (fed_dir / "federated.jsonl").read_text().splitlines()] == [0, 1, 2]
    # The global model is a run directory the other commands take.
    assert invoke("export", fed_dir / "global", "--format", "peft", "--out", tmp_path / "peft").exit_code == 0


BAD = {
    "unknown key": ({"roundz": 3}, "`roundz`: unknown key"),
    "unknown aggregator": ({"aggregator": "fedsgd"}, "`aggregator`"),
    "flora on ia3": ({"aggregator": "flora", "base": {"model": {"name": TINY_MODEL}, "method": {"name": "ia3"}}}, "flora stacks LoRA factors"),
    "flora with dora": ({"aggregator": "flora", "base": {"model": {"name": TINY_MODEL}, "method": {"name": "lora", "dora": True}}}, "plain LoRA"),
    "too many per round": ({"clients_per_round": 4}, "`clients_per_round`: more than the 3 clients"),
    "fedprox without mu": ({"aggregator": "fedprox"}, "`aggregator`: fedprox needs `mu`"),
    "mu without fedprox": ({"mu": 0.1}, "`mu` is fedprox's option"),
    "missing client file": ({"clients": ["nowhere.jsonl"]}, "clients[0].file"),
    "missing file to split": ({"clients": {"file": "nowhere.jsonl", "count": 2}}, "clients.file"),
    "missing task data": ({"task": "sst2", "task_data": "nowhere.tsv"}, "task_data"),
    "dirichlet without by": ({"clients": {"file": "TRAIN", "count": 2, "split": "dirichlet", "alpha": 0.5}}, "`clients.split`: dirichlet needs `by`"),
    "unknown split key": ({"clients": {"file": "TRAIN", "count": 2, "cout": 2}}, "`clients.cout`: unknown key"),
    "dirichlet by a missing field": ({"clients": {"file": "TRAIN", "count": 2, "split": "dirichlet", "alpha": 0.5, "by": "topic"}}, "no field 'topic'"),
    "count above the rows": ({"clients": {"file": "TRAIN", "count": 99}}, "clients.count 99"),
    "no steps": ({"base": {"model": {"name": TINY_MODEL}}}, "`local_steps`"),
    "bad base key": ({"base": {"model": {"name": TINY_MODEL}, "train": {"lr": -1}}}, "train.lr"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_configs_name_the_key(case, data, tmp_path):
    keys, expected = BAD[case]
    keys = json.loads(json.dumps(keys).replace('"TRAIN"', json.dumps(str(data["train"]))))
    if case == "no steps":
        keys["local_steps"] = None
    path = fed_config(tmp_path, data, **keys)
    with pytest.raises(TunelabError, match=None) as caught:
        load_federation(path)
    assert expected in str(caught.value), str(caught.value)
    assert_clean_failure(invoke("federate", path), expected.split("`")[1] if "`" in expected else expected)
    assert not (tmp_path / "fed").exists()
