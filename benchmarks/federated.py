"""The measured federated fine-tuning of docs/federated.md: SmolLM2-135M-Instruct on SST-2, the
training rows split among 4 clients by Dirichlet(0.5) over the label, LoRA; FedAvg (FedIT), FLoRA
and FedProx against centralized training on all the rows for the same total steps (every client's
steps summed), each scored on a fixed subset of SST-2's dev split after every round.

    python benchmarks/federated.py --shared ../shared            # ~30-40 min on 2 CPU cores
    python benchmarks/federated.py --shared ../shared --rounds 2 --local-steps 2 --eval-samples 50   # a smoke run

Writes runs/federated-sst2/ (one federation directory per aggregator, the centralized run,
results.json, score_by_round.png) and prints the figures side by side. Rerunning skips what is done
(federations resume, the centralized run is reused).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from sst2_leaderboard import write_training_rows  # noqa: E402

from tunelab.federated.report import plot_rounds  # noqa: E402

AGGREGATORS = ("fedavg", "flora", "fedprox")


def base_config(args) -> dict:
    """The run every client (and the centralized baseline) trains: LoRA r 8 on all linear layers,
    batch 8, a constant learning rate (a schedule would restart in every client's round)."""
    return {
        "model": "smollm2-135m-instruct",
        "data": {"max_length": 128},
        "method": {"name": "lora", "r": args.rank, "alpha": 2.0 * args.rank},
        "train": {"batch_size": 8, "lr": args.lr, "scheduler": "constant", "warmup": 0, "save_every": 0, "eval_every": 0},
    }


def federation(args, aggregator: str, train_file: Path, out: Path, zero_shot: bool) -> dict:
    config = {
        "base": base_config(args),
        "output": str(out / aggregator),
        "clients": {"file": str(train_file), "count": args.clients, "split": "dirichlet", "alpha": args.alpha, "by": "answer", "seed": args.seed},
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "aggregator": aggregator,
        "seed": args.seed,
        "task": "sst2",
        "task_data": str(Path(args.shared) / "data" / "sst2" / "dev.tsv"),
        "task_options": {"max_samples": args.eval_samples},
        "zero_shot": zero_shot,
        # fedavg's client adapters and global states stay, for FedIT's gap to the exact update.
        "keep_round_weights": aggregator == "fedavg",
    }
    if aggregator == "fedprox":
        config["mu"] = args.mu
    return config


def run_federation(config: dict, folder: Path) -> tuple[dict, list[dict]]:
    import yaml

    from tunelab.federated import federate

    path = folder / f"{config['aggregator']}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    report = federate(path, resume=True)
    records = [json.loads(line) for line in (Path(config["output"]) / "federated.jsonl").read_text().splitlines()]
    return report, records


def centralized(args, train_file: Path, out: Path) -> dict:
    """All the rows in one run of rounds × clients × local_steps steps (the federation's client
    steps summed), scored where a round's worth of steps ends (its checkpoints) and at the end."""
    import tunelab
    from tunelab.eval.harness import run_task
    from tunelab.eval.tasks import load_task
    from tunelab.files import read_safetensors
    from tunelab.runs import load_run

    per_round = args.clients * args.local_steps
    steps = args.rounds * per_round
    run_dir = out / "centralized"
    done = run_dir / "centralized.json"
    if done.is_file():
        return json.loads(done.read_text())
    config = base_config(args)
    config["data"]["train"] = str(train_file)
    config["train"].update(max_steps=steps, seed=args.seed, save_every=per_round, keep_checkpoints=args.rounds)
    config["output"] = str(run_dir)
    started = time.perf_counter()
    result = tunelab.train(config, overwrite=run_dir.exists())
    task = load_task("sst2", Path(args.shared) / "data" / "sst2" / "dev.tsv", [f"max_samples={args.eval_samples}"])
    loaded = load_run(run_dir)
    curve = []
    for round_number in range(1, args.rounds):
        weights = read_safetensors(run_dir / "checkpoints" / f"step-{round_number * per_round}" / "trainable.safetensors")
        loaded.method.load_state_dict(loaded.model, weights, source=f"step {round_number * per_round}")
        curve.append({"round": round_number, "steps": round_number * per_round, "score": run_task(loaded.model, loaded.tokenizer, task, loaded)[0]["accuracy"]})
    loaded = load_run(run_dir)
    curve.append({"round": args.rounds, "steps": steps, "score": run_task(loaded.model, loaded.tokenizer, task, loaded)[0]["accuracy"]})
    record = {"steps": steps, "score": curve[-1]["score"], "curve": curve, "train_seconds": result.report["train_seconds"], "wall_seconds": time.perf_counter() - started}
    done.write_text(json.dumps(record, indent=2))
    return record


def fedit_gaps(fed_dir: Path, rounds: int, scale: float) -> list[float]:
    """Per round: ‖FedIT's update − the exact Σ p_k ΔW_k‖ / ‖the exact update‖, from the kept client
    adapters and global states (ΔW = s·B·A of every layer; updates relative to the round's start)."""
    from safetensors.torch import load_file

    def products(state):
        return {k: scale * state[k.replace("lora_A", "lora_B")].double() @ a.double() for k, a in state.items() if k.endswith("lora_A.weight")}

    gaps = []
    for round_number in range(1, rounds + 1):
        folder = fed_dir / "rounds" / f"round-{round_number}"
        record = json.loads((folder / "round.json").read_text())
        start = products(load_file(fed_dir / "rounds" / f"round-{round_number - 1}" / "global.safetensors"))
        fedit = products(load_file(folder / "global.safetensors"))
        exact = {k: 0 for k in start}
        for client in record["clients"]:
            for k, product in products(load_file(folder / f"client-{client['client']}" / "adapter" / "adapter.safetensors")).items():
                exact[k] = exact[k] + client["weight"] * product
        gap = sum((fedit[k] - exact[k]).norm() ** 2 for k in start) ** 0.5
        moved = sum((exact[k] - start[k]).norm() ** 2 for k in start) ** 0.5
        gaps.append(float(gap / moved))
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=str(REPO.parent / "shared"), help="the folder holding data/sst2/")
    parser.add_argument("--out", default=str(REPO / "runs" / "federated-sst2"))
    parser.add_argument("--n-train", type=int, default=2000, help="training rows (half per label), split among the clients")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration over the label")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mu", type=float, default=0.1, help="FedProx's proximal weight")
    parser.add_argument("--eval-samples", type=int, default=200, help="the first N rows of dev.tsv score every round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=",".join(AGGREGATORS), help="aggregators to run (comma-separated)")
    parser.add_argument("--docs", default=None, help="also copy the plot into this folder")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a machine whose cores other jobs share)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.shared = str(Path(args.shared).resolve())

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_training_rows(Path(args.shared) / "data" / "sst2" / "train.tsv", out / "data", args.n_train, 0, args.seed)
    train_file = out / "data" / "train.jsonl"

    results, curves = {}, {}
    for number, aggregator in enumerate(a for a in AGGREGATORS if a in args.only.split(",")):
        # Round 0 (LoRA's B = 0: the base model) is the same for every aggregator: scored once.
        report, records = run_federation(federation(args, aggregator, train_file, out, zero_shot=number == 0), out)
        if number > 0 and curves:
            records = [next(iter(curves.values()))[0], *records]
        results[aggregator], curves[aggregator] = report, records
    reference = centralized(args, train_file, out)
    gaps = fedit_gaps(out / "fedavg", args.rounds, 2.0) if "fedavg" in results else []
    zero = next(iter(curves.values()))[0] if curves else {"round": 0, "score": None}
    central_curve = [{"round": 0, "score": zero["score"]}, *reference["curve"]]
    plot_rounds({**curves, f"centralized ({args.clients * args.local_steps} steps a round)": central_curve}, "accuracy", out / "score_by_round.png")
    summary = {"args": vars(args), "federations": results, "curves": curves, "centralized": reference, "fedit_gap_per_round": gaps}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    if args.docs:
        Path(args.docs).mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "score_by_round.png", Path(args.docs) / "score_by_round.png")

    first = next(iter(results.values()))
    print(f"\nclients: {first['client_examples']} rows, labels {first['client_labels']}")
    header = ["", *(f"r{r}" for r in range(args.rounds + 1)), "final", "MB sent", "MB recv", "rank", "train s", "wall s"]
    print(" | ".join(f"{h:>8}" for h in header))
    for aggregator, records in curves.items():
        report = results[aggregator]
        scores = [f"{r['score']:.4f}" for r in records]
        row = [aggregator, *scores, f"{report['final_score']:.4f}", f"{report['bytes_sent'] / 1e6:.1f}", f"{report['bytes_received'] / 1e6:.1f}"]
        row += [str(report["global_rank"] or args.rank), f"{report['train_seconds']:.0f}", f"{report['wall_seconds']:.0f}"]
        print(" | ".join(f"{c:>8}" for c in row))
    row = ["central", f"{zero['score']:.4f}", *(f"{p['score']:.4f}" for p in reference["curve"]), f"{reference['score']:.4f}", "0.0", "0.0", str(args.rank)]
    print(" | ".join(f"{c:>8}" for c in row + [f"{reference['train_seconds']:.0f}", f"{reference['wall_seconds']:.0f}"]))
    if gaps:
        print("FedIT vs the exact weighted update (fedavg's clients), relative gap by round: " + ", ".join(f"{g:.2e}" for g in gaps))


if __name__ == "__main__":
    main()
