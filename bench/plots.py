"""PNG plots of results: TTFT CDFs per policy, SLO attainment against rate scale, worker utilisation over time."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")            # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bench.metrics import RequestRecord, ttft  # noqa: E402

#: what users would pick instead: drawn as dashed reference lines in every plot
REFERENCES = ("round_robin/fcfs", "llmd/fcfs")


def _style(policy: str) -> dict:
    return {"linestyle": "--", "linewidth": 1.6} if policy in REFERENCES else {"linewidth": 1.4}


def ttft_cdf(runs: Mapping[str, Sequence[RequestRecord]], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for policy, records in runs.items():
        values = np.sort([t * 1000 for r in records if r.ok and (t := ttft(r)) is not None])
        if len(values):
            ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=policy, **_style(policy))
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms, log scale)")
    ax.set_ylabel("share of requests")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def attainment_vs_rate(points: Mapping[str, Sequence[tuple[float, float]]], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for policy, pts in points.items():
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, [y * 100 for y in ys], marker="o", label=policy, **_style(policy))
    ax.axhline(90, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("arrival rate scale (x trace rate)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def utilization(series: Mapping[str, Sequence[float]], bin_s: float, path: Path, title: str) -> Path:
    names = list(series)
    grid = np.array([list(series[n]) for n in names]) * 100
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.5))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100, interpolation="nearest",
                      extent=(0, grid.shape[1] * bin_s, len(names) - 0.5, -0.5))
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("time (s)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="busy (%)")
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
