"""PNG plots of a benchmark report (matplotlib, optional: no plots without it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import common
from vllm_steer.lab.plotting import pyplot


def batch_series(model: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Median output tok/s against batch size: unsteered and steered (every request its own
    vector) from the batch factor, stock vLLM when measured."""
    series: dict[str, list[tuple[int, float]]] = {"unsteered": [], "steered (all distinct)": []}
    for result in scenarios_of(model, "batch"):
        batch = result["scenario"]["batch"]
        series["unsteered"].append((batch, result["median"][common.UNSTEERED]["output_tok_s"]))
        series["steered (all distinct)"].append((batch, result["median"][common.STEERED]["output_tok_s"]))
    stock = (model.get("stock") or {}).get("batches") or []
    if stock:
        series["stock vLLM"] = [(r["batch"], r["median"][common.UNSTEERED]["output_tok_s"]) for r in stock]
    return {name: sorted(points) for name, points in series.items() if points}


def ratio_series(model: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Steered/unsteered ratio against distinct configs in the batch: at the largest batch
    (configs factor), and with configs = batch size (batch factor)."""
    series: dict[str, list[tuple[int, float]]] = {}
    configs = scenarios_of(model, "configs")
    if configs:
        top = configs[0]["scenario"]["batch"]
        series[f"batch {top}"] = sorted((r["scenario"]["distinct"], r["ratio"]["output_tok_s"]) for r in configs)
    batches = scenarios_of(model, "batch")
    if batches:
        series["batch = configs"] = sorted((r["scenario"]["distinct"], r["ratio"]["output_tok_s"]) for r in batches)
    return series


def scenarios_of(model: dict[str, Any], factor: str) -> list[dict[str, Any]]:
    engine = model.get("engine") or {}
    labels = engine.get("factors", {}).get(factor, [])
    by_label = {r["scenario"]["label"]: r for r in engine.get("scenarios", [])}
    return [by_label[label] for label in labels if label in by_label]


def _integer_ticks(axis, values) -> None:
    from matplotlib.ticker import NullFormatter, NullLocator  # optional: matplotlib (the plots extra); see lab/plotting.py

    axis.set_xticks(sorted(set(values)))
    axis.set_xticklabels([str(v) for v in sorted(set(values))])
    axis.xaxis.set_minor_locator(NullLocator())
    axis.xaxis.set_minor_formatter(NullFormatter())


def _save_panels(plt, models: list[dict[str, Any]], draw, title: str, path: Path) -> Path:
    """One panel per model, drawn by ``draw(axis, model)``, saved as a PNG."""
    figure, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for axis, model in zip(axes[0], models):
        draw(axis, model)
        axis.set_title(model["label"], fontsize=10)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _throughput_panel(axis, model: dict[str, Any]) -> None:
    xs = []
    for name, points in batch_series(model).items():
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        xs += [p[0] for p in points]
    notebook = model.get("notebook") or {}
    if notebook:
        axis.axhline(notebook["one_at_a_time"]["output_tok_s"], color="grey", linestyle=":", label="notebook, one chat at a time")
        axis.plot([notebook["batched"]["batch"]], [notebook["batched"]["output_tok_s"]], marker="s",
                  color="black", linestyle="none", label="notebook, batched (padded)")
    axis.set_xscale("log", base=2)
    _integer_ticks(axis, xs)
    axis.set_xlabel("batch size (requests)")
    axis.set_yscale("log")
    axis.set_ylabel("output tokens/s (log)")


def _ratio_panel(axis, model: dict[str, Any]) -> None:
    xs = []
    for name, points in ratio_series(model).items():
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        xs += [p[0] for p in points]
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.axhline(0.95, color="red", linestyle="--", linewidth=0.8, label="0.95 target")
    axis.set_xscale("log", base=2)
    _integer_ticks(axis, xs or [1])
    axis.set_ylim(min(0.85, axis.get_ylim()[0]), max(1.05, axis.get_ylim()[1]))
    axis.set_xlabel("distinct steering configs in the batch")
    axis.set_ylabel("steered / unsteered output tok/s")


def plot_report(report: dict[str, Any], out_dir: Path, prefix: str = "bench_") -> list[Path]:
    models = [m for m in report["models"] if m.get("engine")]
    plt = pyplot(f"{prefix}*.png") if models else None
    if plt is None:
        return []
    return [
        _save_panels(plt, models, _throughput_panel, "vllm-steer engine throughput vs batch size",
                     out_dir / f"{prefix}throughput.png"),
        _save_panels(plt, models, _ratio_panel, "cost of steering vs distinct configs (every layer, add)",
                     out_dir / f"{prefix}ratio.png"),
    ]
