"""Figures written next to a run's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


def metric_records(metrics_path: Path) -> list[dict]:
    """The records of a metrics.jsonl, in file order."""
    return [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: Path, out_path: Path, title: str = "training loss") -> Path:
    return plot_metric(metrics_path, out_path, "loss", "loss (nats / target token)", title)


def plot_metric(metrics_path: Path, out_path: Path, metric: str, ylabel: str, title: str) -> Path:
    """A logged metric by step, with its eval points (`eval_<metric>`) where there are any."""
    records = metric_records(metrics_path)
    trained = [r for r in records if metric in r]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot([r["step"] for r in trained], [r[metric] for r in trained], label=f"train {metric}", lw=1.2)
    evals = [r for r in records if f"eval_{metric}" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r[f"eval_{metric}"] for r in evals], "o-", label=f"eval {metric}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def training_losses(metrics_path: Path) -> tuple[list[int], list[float]]:
    steps = [r for r in metric_records(metrics_path) if "loss" in r]
    return [r["step"] for r in steps], [r["loss"] for r in steps]


def plot_loss_curves(curves: dict[str, list[tuple[int, float]]], out_path: Path, title: str = "training loss per cell") -> Path:
    """One training-loss line per named run (`curves`: label -> its (step, loss) points)."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, points in curves.items():
        ax.plot([step for step, _ in points], [loss for _, loss in points], label=label, lw=1.1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points (cost, score) no other point beats: at most the cost and a better score."""
    sign = 1 if higher_is_better else -1
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    front, best = [], None
    for i in order:
        if best is None or sign * points[i][1] > sign * best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(rows: list[dict], metric: str, out_path: Path, higher_is_better: bool = True, baseline: float | None = None) -> Path:
    """Score against trainable parameters (log scale), the Pareto front joined and marked; the
    untrained base model's score (`baseline`) as a dashed line."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    points = [(r["trainable_params"], r["score_mean"]) for r in rows]
    front = set(pareto_front(points, higher_is_better))
    for i, (row, (params, score)) in enumerate(zip(rows, points)):
        ax.errorbar(params, score, yerr=row.get("score_std") or 0, fmt="o", color="C3" if i in front else "C0", ms=6, capsize=3)
        ax.annotate(row["cell"], (params, score), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ordered = sorted(front, key=lambda i: points[i][0])
    ax.plot([points[i][0] for i in ordered], [points[i][1] for i in ordered], "-", color="C3", lw=1, label="Pareto front")
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="gray", lw=1, label="base model (zero-shot)")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
