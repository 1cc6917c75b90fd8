"""A federation's totals (report.json) and its figure: the score by round, and the bytes sent."""

from __future__ import annotations

from pathlib import Path

from tunelab.compare.sweep import lower_is_better
from tunelab.federated.config import Federation
from tunelab.plots import plt


def federation_report(fed: Federation, records: list[dict], wall_seconds: float) -> dict:
    trained = [r for r in records if r["round"] > 0]
    zero = next((r for r in records if r["round"] == 0), None)
    pick = min if lower_is_better(fed.metric) else max
    best = pick(records, key=lambda r: r["score"]) if records else None
    final = records[-1] if records else None
    clients = [c for r in trained for c in r["clients"]]
    return {
        "aggregator": fed.config.aggregator,
        "mu": fed.config.mu,
        "rounds": fed.config.rounds,
        "clients": len(fed.clients),
        "clients_per_round": fed.clients_per_round,
        "local_steps": fed.local_steps,
        "client_examples": [c.examples for c in fed.clients],
        "client_labels": [c.labels for c in fed.clients] if any(c.labels for c in fed.clients) else None,
        "task": fed.task.name,
        "metric": fed.metric,
        "zero_shot_score": zero["score"] if zero else None,
        "final_score": final["score"] if final else None,
        "best_score": best["score"] if best else None,
        "best_round": best["round"] if best else None,
        "scores": [[r["round"], r["score"]] for r in records],
        "client_steps": sum(c["steps"] for c in clients),
        "bytes_sent": sum(r["bytes_sent"] for r in trained),
        "bytes_received": sum(r["bytes_received"] for r in trained),
        "global_rank": final.get("global_rank") if final else None,
        "train_seconds": sum(r["train_seconds"] for r in trained),
        "eval_seconds": sum(r["eval_seconds"] for r in records),
        "wall_seconds": sum(r["wall_seconds"] for r in records),  # the rounds', over every (resumed) run
        "run_seconds": wall_seconds,  # this invocation's
        "global_model": str(fed.output / "global"),
    }


def plot_rounds(curves: dict[str, list[dict]], metric: str, out_path: Path) -> Path:
    """Left: the score by round of each curve (label -> its round records; a baseline such as
    centralized training may be one, with records of `round` and `score` only). Right: the
    megabytes the clients sent (solid) and received (dashed), cumulated over rounds."""
    from matplotlib.ticker import MaxNLocator

    fig, (score_ax, bytes_ax) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    for number, (label, records) in enumerate(curves.items()):
        color = f"C{number}"
        score_ax.plot([r["round"] for r in records], [r["score"] for r in records], "o-", color=color, label=label, lw=1.3, ms=4)
        trained = [r for r in records if r["round"] > 0 and "bytes_received" in r]
        for key, style in (("bytes_sent", "o-"), ("bytes_received", "s--")):
            total, points = 0.0, []
            for record in trained:
                total += record[key] / 1e6
                points.append(total)
            if trained:
                bytes_ax.plot([r["round"] for r in trained], points, style, color=color, lw=1.3, ms=3, label=f"{label}: {key.removeprefix('bytes_')}")
    score_ax.set_ylabel(metric)
    score_ax.set_title(f"global model's {metric} by round")
    bytes_ax.set_ylabel("MB (cumulative, all clients)")
    bytes_ax.set_title("communication")
    for ax in (score_ax, bytes_ax):
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
