"""Benchmark charts (PNG): SLO attainment against request rate (the DistServe picture), and TTFT and TPOT
CDFs, each comparing several runs or servers on one chart."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt

from splitserve.bench import metrics
from splitserve.bench.client import Record


def attainment_vs_rate(results: list[dict], path: Path, target: float | None = 0.9) -> Path:
    """One line per result (a server or mode), SLO attainment at each rate of its sweep."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for result in results:
        points = sorted((run["rate"], run["summary"].get("slo_attainment")) for run in result["runs"])
        ax.plot([p[0] for p in points], [100 * (p[1] or 0) for p in points], marker="o", label=result["label"])
    if target:
        ax.axhline(100 * target, color="grey", linestyle=":", linewidth=1, label=f"{100 * target:.0f}% target")
    ax.set_xlabel("request rate (requests/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"SLO attainment ({results[0].get('slo_text', '')})")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def latency_cdfs(results: list[dict], path: Path) -> Path:
    """TTFT and TPOT CDFs, a line per (result, rate)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for result in results:
        for run in result["runs"]:
            records = [Record(**r) for r in run["records"] if r["error"] is None]
            series = {"TTFT": [metrics.ttft(r) for r in records],
                      "TPOT": [x for x in map(metrics.tpot, records) if x is not None]}  # fmt: skip
            label = f"{result['label']} @ {run['rate']:g}/s"
            for ax, values in zip(axes, series.values(), strict=True):
                values = sorted(values)
                if values:
                    ys = [(i + 1) / len(values) for i in range(len(values))]
                    ax.step([1000 * v for v in values], ys, where="post", label=label)
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
