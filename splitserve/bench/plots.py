"""Benchmark charts (PNG): SLO attainment against request rate (the DistServe picture), and TTFT and TPOT
CDFs, each comparing several runs or servers on one chart."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt

from splitserve.bench import metrics
from splitserve.bench.client import Record


def attainment_vs_rate(results: list[dict], path: Path, target: float | None = 0.9) -> Path:
    """One line per result (a server or mode): its SLO attainment at each rate of its sweep."""
    series = {
        r["label"]: [(run["rate"], run["summary"].get("slo_attainment") or 0.0) for run in r["runs"]] for r in results
    }
    return attainment_chart(series, path, f"SLO attainment ({results[0].get('slo_text', '')})", target)


def attainment_chart(series: dict[str, list[tuple[float, float]]], path: Path, title: str,
                     target: float | None = 0.9, at_rate: float | None = None) -> Path:  # fmt: skip
    """SLO attainment (0..1) against request rate, a line per series; rates that are not finite are left out."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in series.items():
        points = sorted(p for p in points if math.isfinite(p[0]))
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", markersize=4, label=label)
    if target:
        ax.axhline(100 * target, color="grey", linestyle=":", linewidth=1, label=f"{100 * target:.0f}% target")
    if at_rate is not None:
        ax.axvline(at_rate, color="black", linestyle="--", linewidth=1, label=f"{at_rate:g} req/s")
    ax.set_xlabel("request rate (requests/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def latency_cdfs(results: list[dict], path: Path) -> Path:
    """TTFT and TPOT CDFs, a line per (result, rate): a color per result, a line style per rate."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", "-.", ":"]
    for i, result in enumerate(results):
        for j, run in enumerate(result["runs"]):
            records = [Record(**r) for r in run["records"] if r["error"] is None]
            series = {"TTFT": [metrics.ttft(r) for r in records],
                      "TPOT": [x for x in map(metrics.tpot, records) if x is not None]}  # fmt: skip
            label = f"{result['label']} @ {run['rate']:g}/s"
            for ax, values in zip(axes, series.values(), strict=True):
                values = sorted(values)
                if values:
                    ys = [(i + 1) / len(values) for i in range(len(values))]
                    ax.step([1000 * v for v in values], ys, where="post", label=label,
                            color=colors[i % len(colors)], linestyle=styles[j % len(styles)])  # fmt: skip
    for ax, name in zip(axes, ("TTFT", "TPOT"), strict=True):
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def attainment_over_time(series: dict[str, list[tuple[float, float]]], path: Path, title: str,
                         phases: list[tuple[float, str]], switches: dict[str, list[tuple[float, str]]],
                         target: float | None = 0.9) -> Path:  # fmt: skip
    """SLO attainment (0..1) of the requests sent in each time bin, a line per series; `phases`: (start, name)
    shaded alternately; `switches`: per series, (time, what) marked with a vertical line in its colour."""
    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    bounds = [start for start, _ in phases]
    for i, (start, name) in enumerate(phases):
        end = bounds[i + 1] if i + 1 < len(bounds) else max((p[0] for s in series.values() for p in s), default=start)
        if i % 2:
            ax.axvspan(start, end, color="0.93", zorder=0)
        ax.text((start + end) / 2, 101, name.replace(" -> ", "\n-> "), fontsize=7, va="bottom", ha="center")
    for label, points in series.items():
        (line,) = ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", markersize=3, label=label)
        for t, what in switches.get(label, []):
            ax.axvline(t, color=line.get_color(), linestyle="--", linewidth=1)
            ax.text(t, 3, what, rotation=90, fontsize=7, color=line.get_color(), va="bottom", ha="right")
    if target:
        ax.axhline(100 * target, color="grey", linestyle=":", linewidth=1, label=f"{100 * target:.0f}% target")
    ax.set_xlabel("time the requests were sent (s from the start)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 118)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
