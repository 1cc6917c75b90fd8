"""The federation's rounds: each selected client trains from the global model (an ordinary
`tunelab.train` run of `local_steps` steps on its own data), the server aggregates what they send,
writes the new global model as a run directory, and scores it on the task.

    OUTPUT/ federation.json            what this federation is (--resume refuses another)
            clients/client-K.jsonl     a split's client files
            rounds/round-R/client-K/   client K's run of round R (its weights removed once the
                                       round is aggregated, unless keep_round_weights)
            rounds/round-R/global.safetensors   fedavg: the global state after round R (the
                                       latest kept); flora: round R's stacked update (all kept:
                                       they are the global model)
            rounds/round-R/base-model/ flora: the base with rounds <= R folded in, which round
                                       R+1's clients train on (the latest kept)
            rounds/round-R/eval/       the global model's eval.json on the task
            rounds/round-R/round.json  the round's record; written last, it marks the round done
            global/                    the global model as a run directory (eval, export, serve)
            federated.jsonl  federated.png  report.json

Aggregators: `fedavg` (the weighted mean Σ p_k θ_k of every trained tensor, p_k = n_k / Σ n; on
LoRA this is FedIT), `fedprox` (the same, with each client's loss plus μ/2·‖θ − θ_global‖²:
train.proximal_mu), `flora` (LoRA: the update Σ p_k s_k B_k A_k exactly, by stacking; clients
start each round from a fresh LoRA on the base with every earlier round folded in).

Resume: a round with round.json is done; in an unfinished round, a client whose run finished is
reused, one with a checkpoint resumes from it, others start again. Every step is a function of the
config, so a resumed federation ends with the global weights of an uninterrupted one, bit for bit,
and so does every backend (the clients of a round are independent given its global model).
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from tunelab.compare.runner import check_backend, ray_session, run_jobs
from tunelab.config import changed_keys, dump_config, parse_config
from tunelab.console import console
from tunelab.errors import TunelabError
from tunelab.federated.aggregate import client_weights, concatenate, fedavg, flora_stack, fold, nbytes, stacked_rank
from tunelab.federated.config import Client, Federation, client_seed, selected_clients
from tunelab.files import exclusive_directory, read_safetensors, remove_leftovers, staged_write, write_json_atomic, write_text_atomic

STATE_FILE = "federation.json"
FORMAT = 1
ROUNDS_DIR = "rounds"
ROUND_FILE = "round.json"
GLOBAL_STATE = "global.safetensors"
BASE_MODEL_DIR = "base-model"
GLOBAL_DIR = "global"
RECORDS_FILE = "federated.jsonl"
PLOT_FILE = "federated.png"
REPORT_FILE = "report.json"
# What a client run keeps once its round is aggregated, unless keep_round_weights.
CLIENT_WEIGHTS = ("adapter", "model", "checkpoints")


def round_dir(fed: Federation, round_number: int) -> Path:
    return fed.output / ROUNDS_DIR / f"round-{round_number}"


def client_dir(fed: Federation, round_number: int, client: int) -> Path:
    return round_dir(fed, round_number) / f"client-{client}"


def client_config(fed: Federation, round_number: int, client: Client, init_weights: Path | None, base_model: Path | None = None) -> dict:
    """Client `client`'s run config in a round: the base on its data, `local_steps` steps, its own
    seed, starting from `init_weights` (the global state, fedavg) or on `base_model` (flora)."""
    raw = copy.deepcopy(fed.base)
    raw["data"]["train"] = str(client.file)
    raw["method"]["from_peft"] = None  # the federation's starting adapter is in the global state
    train = raw["train"]
    train.update(max_steps=fed.local_steps, epochs=None, seed=client_seed(fed.seed, client.seed, round_number), log_every=1)
    train["init_weights"] = str(init_weights) if init_weights is not None else None
    if fed.config.aggregator == "fedprox":
        train["proximal_mu"] = fed.config.mu
    if base_model is not None:
        raw["model"]["name"] = str(base_model)
    raw["output"] = str(client_dir(fed, round_number, client.index))
    return raw


def run_client(config: dict, threads: int | None = None) -> dict:
    """Train (or resume, or reuse) one client's run of a round; what the server needs of it."""
    from tunelab.plots import training_losses
    from tunelab.train import train
    from tunelab.train.checkpoint import newest_intact_checkpoint
    from tunelab.train.loop import config_changes

    if threads:
        torch.set_num_threads(threads)
    run_dir, run_config = Path(config["output"]), parse_config(config)
    saved = run_dir / "config.yaml"
    same = saved.is_file() and not config_changes(saved, run_config, frozenset({"output"}))
    if not (same and (run_dir / "report.json").is_file()):
        checkpoint = newest_intact_checkpoint(run_dir / "checkpoints") if same else None
        train(run_config, resume=checkpoint is not None, overwrite=checkpoint is None and run_dir.exists())
    report = json.loads((run_dir / "report.json").read_text())
    _, losses = training_losses(run_dir / "metrics.jsonl")
    return {
        "run_dir": str(run_dir),
        "loss": statistics.fmean(losses),
        "final_loss": report["final_train_loss"],
        "eval_loss": report.get("eval_loss"),
        "steps": report["steps"],
        "tokens": report["tokens"],
        "train_seconds": report["train_seconds"],
        "resumed_from_step": report.get("resumed_from_step"),
    }


@dataclass
class Backend:
    name: str = "sequential"
    workers: int = 2
    ray_address: str | None = None
    ray_cpus: float = 1
    ray_gpus: float = 0


class Server:
    """The global model between rounds: a base model with the method attached (the workspace that
    reads and writes method states), the aggregation, and the files of each round."""

    def __init__(self, fed: Federation, backend: Backend):
        from tunelab.methods import build_method
        from tunelab.methods.peft_io import read_peft_adapter
        from tunelab.models.loader import load_model
        from tunelab.objectives.registry import build_objective

        self.fed, self.backend = fed, backend
        self.flora = fed.config.aggregator == "flora"
        self.run_config = parse_config(self.global_config(fed.base["method"]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(fed.seed)  # the global model's initialization: the same on every resume
            self.model, self.tokenizer = load_model(self.run_config.model)
            self.method = build_method(self.run_config.method)
            self.method.attach(self.model)
            objective = build_objective(self.run_config.objective)
            objective.attach(self.model)
        if objective.trainable_parameters():
            raise TunelabError(f"{fed.source}: base.objective '{objective.name}' trains tensors of its own (a head), which federate does not aggregate; use another objective")
        if fed.base["method"].get("from_peft"):  # the federation starts from a peft adapter
            self.method.peft_import(self.model, *read_peft_adapter(fed.base["method"]["from_peft"]))
        self.trained = list(self.method.trainable_parameters(self.model))
        self.initial = {name: t.detach().clone() for name, t in self.method.state_dict(self.model).items()}

    # ---- configs and states

    def global_config(self, method: dict) -> dict:
        """The global model's run config: the base's, with `method` (flora: a LoRA of the stacked rank)."""
        raw = copy.deepcopy(self.fed.base)
        raw["method"] = {**method, "from_peft": None}  # its weights are the global model's, in its own folder
        raw["data"]["train"] = str(self.fed.clients[0].file)
        raw["train"].update(max_steps=self.fed.local_steps, epochs=None, seed=self.fed.seed)
        raw["output"] = str(self.fed.output / GLOBAL_DIR)
        return raw

    def global_state(self, round_number: int) -> Path:
        """fedavg: the file holding the global state after `round_number` (round 0: the start)."""
        path = round_dir(self.fed, round_number) / GLOBAL_STATE
        if round_number == 0 and not path.is_file():
            _save_tensors(path, self.initial)
        return path

    def base_model(self, round_number: int) -> Path | None:
        """flora: the base with rounds 1..round_number folded in, written if missing (None: the base itself)."""
        if round_number == 0:
            return None
        from tunelab.models.loader import load_model

        target = round_dir(self.fed, round_number) / BASE_MODEL_DIR
        if (target / "config.json").is_file():
            return target
        model, tokenizer = load_model(self.run_config.model)
        for earlier in range(1, round_number + 1):  # in round order, as every resume does it again
            fold(model, read_safetensors(round_dir(self.fed, earlier) / GLOBAL_STATE))
        with staged_write(target) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        return target

    def client_state(self, run_dir: Path) -> dict[str, torch.Tensor]:
        """The tensors a client sends: its method's trained state."""
        from tunelab.runs import ADAPTER_FILE, load_run

        if self.method.artifact == "adapter":
            return read_safetensors(run_dir / "adapter" / ADAPTER_FILE)
        loaded = load_run(run_dir)
        return {name: t.detach().clone() for name, t in loaded.method.state_dict(loaded.model).items()}

    def client_factors(self, state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """flora: a client's layer -> (A_k, B_k, s_k), read through the method."""
        self.method.load_state_dict(self.model, state, source="a client's LoRA")
        return {layer: (a.detach().clone(), b.detach().clone(), scale) for layer, (a, b, scale) in self.method.lora_factors(self.model).items()}

    # ---- rounds

    def run(self, rounds: int) -> list[dict]:
        """Every round's record (round 0 first, when zero_shot); federated.jsonl and the plot are
        written again after each."""
        records = [self.round_zero()] if self.fed.config.zero_shot else []
        for round_number in range(1, rounds + 1):
            records.append(self.round(round_number))
            write_records(self.fed, records)
        return records

    def round_zero(self) -> dict:
        """The starting global model's score (round 0: no client trained yet)."""
        done = round_dir(self.fed, 0) / ROUND_FILE
        if done.is_file():
            return json.loads(done.read_text())
        console.rule("round 0: the starting global model")
        started = time.perf_counter()
        self.method.load_state_dict(self.model, self.initial, source="the starting global model")
        self.write_global(self.model, self.method, self.fed.base["method"])
        evaluation = self.evaluate(0)
        record = {**self._score(evaluation), "round": 0, "aggregator": self.fed.config.aggregator, "clients": [], "bytes_sent": 0, "bytes_received": 0}
        record.update(global_rank=0 if self.flora else None, eval_seconds=evaluation["seconds"], wall_seconds=time.perf_counter() - started)
        write_json_atomic(done, record)
        return record

    def round(self, round_number: int) -> dict:
        fed = self.fed
        done = round_dir(fed, round_number) / ROUND_FILE
        if done.is_file():
            return json.loads(done.read_text())
        started = time.perf_counter()
        chosen = selected_clients(fed, round_number)
        console.rule(f"round {round_number}/{fed.config.rounds}: clients {', '.join(map(str, chosen))} ({fed.config.aggregator})")
        init = None if self.flora else self.global_state(round_number - 1)
        base = self.base_model(round_number - 1) if self.flora else None
        jobs = [(client_config(fed, round_number, fed.clients[k], init, base),) for k in chosen]
        results = run_jobs(
            run_client,
            jobs,
            self.backend.name,
            self.backend.workers,
            self.backend.ray_address,
            self.backend.ray_cpus,
            self.backend.ray_gpus,
            starting=lambda number, job: console.print(f"client {chosen[number - 1]} ({number}/{len(chosen)} of round {round_number})"),
        )
        weights = client_weights([fed.clients[k].examples for k in chosen])
        states = [self.client_state(Path(result["run_dir"])) for result in results]
        sent = [nbytes(state[name] for name in self.trained) for state in states]
        if self.flora:
            update = flora_stack([self.client_factors(state) for state in states], weights)
            _save_tensors(round_dir(fed, round_number) / GLOBAL_STATE, update)
            updates = [read_safetensors(round_dir(fed, r) / GLOBAL_STATE) for r in range(1, round_number + 1)]
            total = concatenate(updates)
            received = [self._stacked_bytes_since(k, round_number, updates) for k in chosen]
            self.write_flora_global(total)
        else:
            start = read_safetensors(init)
            state = fedavg(states, weights, self.trained, start)
            _save_tensors(round_dir(fed, round_number) / GLOBAL_STATE, state)
            received = [nbytes(start[name] for name in self.trained)] * len(chosen)
            self.method.load_state_dict(self.model, state, source=f"round {round_number}'s global state")
            self.write_global(self.model, self.method, fed.base["method"])
        evaluation = self.evaluate(round_number)
        clients = [
            {
                "client": k,
                "examples": fed.clients[k].examples,
                "weight": p,
                "seed": client_seed(fed.seed, fed.clients[k].seed, round_number),
                **result,
                "bytes_sent": s,
                "bytes_received": r,
            }
            for k, p, result, s, r in zip(chosen, weights, results, sent, received)
        ]
        record = {
            **self._score(evaluation),
            "round": round_number,
            "aggregator": fed.config.aggregator,
            "clients": clients,
            "bytes_sent": sum(sent),
            "bytes_received": sum(received),
            "global_rank": stacked_rank(total) if self.flora else None,
            "train_seconds": sum(c["train_seconds"] for c in clients),
            "eval_seconds": evaluation["seconds"],
            "wall_seconds": time.perf_counter() - started,
        }
        write_json_atomic(done, record)
        self.clean_up(round_number)
        console.print(f"round {round_number}: {fed.metric} {record['score']:.4f}, sent {record['bytes_sent'] / 2**20:.1f} MiB, received {record['bytes_received'] / 2**20:.1f} MiB")
        return record

    def _stacked_bytes_since(self, client: int, round_number: int, updates: list[dict[str, torch.Tensor]]) -> int:
        """flora: what a client downloads before a round: the stacked updates (`updates`: rounds
        1, 2, ...) of the rounds from the last one it trained in (its own update is not the
        round's) on; it keeps its base with the earlier ones folded in."""
        last = max((r for r in range(1, round_number) if client in selected_clients(self.fed, r)), default=1)
        return sum(nbytes(updates[r - 1].values()) for r in range(last, round_number))

    def write_flora_global(self, total: dict[str, torch.Tensor]) -> None:
        """The global model base + Σ B_r A_r as one LoRA of the stacked rank (scale 1)."""
        from tunelab.methods import build_method
        from tunelab.models.loader import load_model

        rank = stacked_rank(total)
        options = {**self.fed.base["method"], "r": rank, "alpha": float(rank), "rslora": False, "lora_plus_ratio": None}
        config = parse_config(self.global_config(options))
        model, _ = load_model(config.model)
        method = build_method(config.method)
        method.attach(model)
        method.load_state_dict(model, total, source="the stacked global update")
        self.write_global(model, method, options)

    def write_global(self, model, method, options: dict) -> None:
        """OUTPUT/global: a run directory of the global model (config.yaml, run.json, its weights)."""
        from tunelab.runs import save_artifacts, write_run_file

        config = parse_config(self.global_config(options))
        with staged_write(self.fed.output / GLOBAL_DIR) as staging:
            write_run_file(staging)
            dump_config(config, staging / "config.yaml")
            save_artifacts(method, model, self.tokenizer, config, staging)

    def evaluate(self, round_number: int) -> dict:
        from tunelab.eval.harness import evaluate_task

        return evaluate_task(self.fed.output / GLOBAL_DIR, self.fed.task, out=round_dir(self.fed, round_number) / "eval")

    def _score(self, evaluation: dict) -> dict:
        metrics = evaluation["metrics"]
        if self.fed.metric not in metrics:
            raise TunelabError(f"{self.fed.source}: `metric`: the task reports no '{self.fed.metric}' (it has {sorted(metrics)})")
        return {"metric": self.fed.metric, "score": metrics[self.fed.metric], "metrics": metrics}

    def clean_up(self, finished: int) -> None:
        """After round `finished` is recorded, unless keep_round_weights: the clients' weights,
        fedavg's earlier global states and flora's earlier folded bases (what resuming needs stays:
        the latest global state, every stacked update; a folded base is rebuilt from those)."""
        if self.fed.config.keep_round_weights:
            return
        for number in range(0, finished + 1):
            folder = round_dir(self.fed, number)
            if number < finished and self.flora:
                shutil.rmtree(folder / BASE_MODEL_DIR, ignore_errors=True)
            elif number < finished:
                (folder / GLOBAL_STATE).unlink(missing_ok=True)
            for run in folder.glob("client-*"):
                for name in CLIENT_WEIGHTS:
                    shutil.rmtree(run / name, ignore_errors=True)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with staged_write(path, directory=False) as staging:
        save_file({name: t.contiguous() for name, t in tensors.items()}, staging)


def write_records(fed: Federation, records: list[dict]) -> None:
    write_text_atomic(fed.output / RECORDS_FILE, "".join(json.dumps(r) + "\n" for r in records))
    from tunelab.federated.report import plot_rounds

    with staged_write(fed.output / PLOT_FILE, directory=False) as staging:
        plot_rounds({fed.config.aggregator: records}, fed.metric, staging)


def check_output(fed: Federation, resume: bool) -> None:
    """Refuse to mix federations in one directory; on --resume, refuse a changed config."""
    state = fed.output / STATE_FILE
    if state.is_file():
        if not resume:
            raise TunelabError(f"output {fed.output} already holds a federation; pass --resume to continue it, or give another output")
        try:
            saved = json.loads(state.read_text())
            identity, written = saved["identity"], saved["format"]
        except (OSError, ValueError, KeyError, TypeError):
            raise TunelabError(f"{state}: unreadable; remove {fed.output} to start the federation again") from None
        if written != FORMAT:
            raise TunelabError(f"{state}: federation format {written}; this tunelab reads format {FORMAT}")
        changed = changed_keys(identity, json.loads(json.dumps(fed.identity())))
        if changed:
            raise TunelabError(f"--resume: {fed.source} differs from the federation in {fed.output} at {', '.join(changed[:8])}")
    elif fed.output.is_dir() and any(fed.output.iterdir()):
        raise TunelabError(f"output {fed.output} holds files but no federation ({STATE_FILE}); give an empty or new directory")
    elif fed.output.exists() and not fed.output.is_dir():
        raise TunelabError(f"output {fed.output} is a file; the output is a directory")


def run_federation(fed: Federation, resume: bool = False, backend: Backend | None = None) -> dict:
    """Run (or finish) the federation; its report (also written as report.json)."""
    from tunelab.federated.report import federation_report

    backend = backend or Backend()
    check_backend(backend.name, backend.workers)
    check_output(fed, resume)
    started = time.perf_counter()
    # Ray started once for all rounds (--backend ray), unless this process already holds a connection.
    ray = ray_session(backend.ray_address) if backend.name == "ray" else nullcontext()
    with exclusive_directory(fed.output, "tunelab federate"), ray:
        server = Server(fed, backend)  # loads the model: a bad method or objective fails before any write
        remove_leftovers(fed.output)
        if not (fed.output / STATE_FILE).is_file():
            write_json_atomic(fed.output / STATE_FILE, {"format": FORMAT, "identity": fed.identity()})
        for path, text in fed.client_files.items():
            if not path.is_file() or path.read_text() != text:
                write_text_atomic(path, text)
        records = server.run(fed.config.rounds)
        report = federation_report(fed, records, time.perf_counter() - started)
        write_json_atomic(fed.output / REPORT_FILE, report)
    return report
