"""A sweep's leaderboard: per cell, the score over seeds (mean ± std), trainable parameters and %,
peak memory, training tokens/s and seconds; written as leaderboard.csv/.json/.md with
pareto.png (score vs trainable parameters) and loss_curves.png."""

from __future__ import annotations

import csv
import io
import statistics

from tunelab.compare.sweep import Sweep, lower_is_better
from tunelab.errors import TunelabError
from tunelab.files import write_json_atomic, write_text_atomic
from tunelab.plots import plot_loss_curves, plot_pareto

COLUMNS = [
    "rank",
    "cell",
    "method",
    "score_mean",
    "score_std",
    "seeds",
    "trainable_params",
    "trainable_percent",
    "peak_memory_mb",
    "tokens_per_s",
    "train_seconds",
    "wall_seconds",
]


def base_parameter_count(sweep: Sweep) -> int:
    from tunelab.models.loader import load_model_skeleton

    return sum(p.numel() for p in load_model_skeleton(sweep.base.model).parameters())


def leaderboard_rows(sweep: Sweep, records: list[dict], base_params: int) -> list[dict]:
    """One row per cell (seeds aggregated), the zero-shot row first, then best score first."""
    metric, rows = sweep.metric, []
    by_cell: dict[str, list[dict]] = {}
    for record in records:
        by_cell.setdefault(record["cell"], []).append(record)
    for cell, group in by_cell.items():
        if metric not in group[0]["metrics"]:
            raise TunelabError(f"{sweep.source}: `metric`: the task reports no '{metric}' (it has {sorted(group[0]['metrics'])})")
        scores = [r["metrics"][metric] for r in group]
        rows.append(
            {
                "cell": cell,
                "method": group[0]["method"],
                "score_mean": statistics.fmean(scores),
                "score_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "seeds": len(group),
                "scores": scores,
                "trainable_params": group[0]["trainable_params"],
                "trainable_percent": 100 * group[0]["trainable_params"] / base_params,
                "peak_memory_mb": _mean_of(group, "peak_memory_mb", max),
                "tokens_per_s": _mean_of(group, "tokens_per_s"),
                "train_seconds": _mean_of(group, "train_seconds"),
                "wall_seconds": _mean_of(group, "wall_seconds"),
                "metrics": {key: statistics.fmean(r["metrics"][key] for r in group) for key, value in group[0]["metrics"].items() if isinstance(value, (int, float))},
            }
        )
    zero_shot = [r for r in rows if r["method"] == "none"]
    trained = [r for r in rows if r["method"] != "none"]
    trained.sort(key=lambda r: r["score_mean"], reverse=not lower_is_better(metric))
    for rank, row in enumerate(trained, 1):
        row["rank"] = rank
    for row in zero_shot:
        row["rank"] = None
    return zero_shot + trained


def _mean_of(group: list[dict], key: str, combine=statistics.fmean):
    values = [r[key] for r in group if r.get(key) is not None]
    return combine(values) if values else None


def write_leaderboard(sweep: Sweep, records: list[dict]) -> list[dict]:
    """Write every leaderboard file into the sweep's output folder; the rows."""
    rows = leaderboard_rows(sweep, records, base_parameter_count(sweep))
    out = sweep.output
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "sweep": sweep.source,
        "task": sweep.task.name,
        "task_type": sweep.task.type,
        "metric": sweep.metric,
        "model": sweep.base.model.name,
        "max_steps": sweep.base.train.max_steps,
        "batch_size": sweep.base.train.batch_size,
        "seeds": sweep.config.seeds,
        "rows": rows,
    }
    write_json_atomic(out / "leaderboard.json", summary)
    write_text_atomic(out / "leaderboard.csv", _csv(rows))
    write_text_atomic(out / "leaderboard.md", _markdown(summary))
    trained = [r for r in rows if r["method"] != "none"]
    baseline = next((r["score_mean"] for r in rows if r["method"] == "none"), None)
    plot_pareto(trained, sweep.metric, out / "pareto.png", not lower_is_better(sweep.metric), baseline)
    curves = {r["cell"]: r["train_losses"] for r in records if r["method"] != "none" and r["seed"] == sweep.config.seeds[0]}
    plot_loss_curves(curves, out / "loss_curves.png")
    return rows


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})
    return buffer.getvalue()


def _markdown(summary: dict) -> str:
    metric = summary["metric"]
    lines = [
        f"Task `{summary['task']}` ({summary['task_type']}), score: {metric}"
        f"{' (lower is better)' if lower_is_better(metric) else ''}; model `{summary['model']}`; "
        f"{summary['max_steps']} steps × batch {summary['batch_size']} per cell; seeds {summary['seeds']}.",
        "",
        f"| rank | cell | {metric} (mean ± std) | trainable params | % | peak MiB | train tokens/s | train s | wall s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        cells = [
            "" if r["rank"] is None else str(r["rank"]),
            r["cell"],
            f"{r['score_mean']:.4f} ± {r['score_std']:.4f}",
            f"{r['trainable_params']:,}",
            f"{r['trainable_percent']:.3f}",
            _number(r["peak_memory_mb"], "{:.0f}"),
            _number(r["tokens_per_s"], "{:.0f}"),
            _number(r["train_seconds"], "{:.0f}"),
            _number(r["wall_seconds"], "{:.0f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value, spec: str) -> str:
    return "–" if value is None else spec.format(value)
