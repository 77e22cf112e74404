"""The latency picture of a bench run: one row per figure, on one log-scale millisecond axis.

Each row is a box plot drawn from the figure's latencies: the box spans p25..p75, the bar in it is
p50, the whiskers reach p1 and p99, a red diamond marks p99 and a grey cross the slowest call. The
text at the right repeats the figure's value, p50 and p99 as printed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class _Figure(Protocol):
    name: str
    value: float
    unit: str
    p50_ms: float
    p99_ms: float
    latencies: list[float]  # seconds


_FLOOR_MS = 1e-3  # a log axis cannot show zero


def _quantile(ordered: Sequence[float], q: float) -> float:
    """The same nearest-rank rule as the printed lines (``lat[int(len * q)]``)."""
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def write(figures: Sequence[_Figure], path: str | Path, title: str) -> Path | None:
    """Writes the PNG; returns its path, or None when no figure has latencies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter
    from matplotlib.transforms import blended_transform_factory

    rows = [f for f in figures if f.latencies]
    if not rows:
        return None
    stats, maxima = [], []
    for f in rows:
        ms = sorted(max(x * 1000, _FLOOR_MS) for x in f.latencies)
        stats.append(
            {
                "label": f.name,
                "med": max(f.p50_ms, _FLOOR_MS),
                "q1": _quantile(ms, 0.25),
                "q3": _quantile(ms, 0.75),
                "whislo": _quantile(ms, 0.01),
                "whishi": _quantile(ms, 0.99),
                "fliers": [],
            }
        )
        maxima.append(ms[-1])

    n = len(rows)
    fig, ax = plt.subplots(figsize=(13, 1.6 + 0.42 * n), layout="constrained")
    positions = list(range(n, 0, -1))  # the first figure on top
    ax.bxp(
        stats,
        positions=positions,
        orientation="horizontal",
        widths=0.55,
        patch_artist=True,
        boxprops={"facecolor": "#cfe0f3", "edgecolor": "#2b5d8a"},
        medianprops={"color": "#0b2f52", "linewidth": 2},
        whiskerprops={"color": "#2b5d8a"},
        capprops={"color": "#2b5d8a"},
    )
    ax.scatter([s["whishi"] for s in stats], positions, marker="D", s=22, color="#c0392b", zorder=3, label="p99")
    ax.scatter(maxima, positions, marker="x", s=18, color="#888888", zorder=3, label="slowest")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("latency (ms, log scale): box p25..p75, bar p50, whiskers p1..p99")
    ax.grid(axis="x", which="major", color="#dddddd")
    ax.grid(axis="x", which="minor", color="#f2f2f2")
    ax.set_axisbelow(True)
    ax.set_ylim(0.4, n + 0.6)
    ax.tick_params(axis="y", labelsize=9)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10, loc="left")
    right = blended_transform_factory(ax.transAxes, ax.transData)
    for f, y in zip(rows, positions, strict=True):
        ax.text(
            1.01,
            y,
            f"{f.value:,.0f} {f.unit}\np50 {f.p50_ms:.2f} ms  p99 {f.p99_ms:.2f} ms  n={len(f.latencies):,}",
            transform=right,
            va="center",
            fontsize=8,
            family="monospace",
        )
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
