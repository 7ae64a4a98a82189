"""Shared parts of the caption-mixing sweeps (`clip sweep`, `demo --sweep`): child commands, metric
tables with confidence intervals, and the metric-against-p figure.

A sweep's numbers come from the reports its child commands write (`eval retrieval`, `eval run`),
read as files: the sweep never imports the evaluation package, it runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from t2i_recap.io import atomic_path
from t2i_recap.logging_utils import get_logger

log = get_logger(__name__)


def run_command(argv: list[str], threads: int | None = None) -> None:
    """`python -m t2i_recap ARGV...` in a child process with `threads` torch threads (unless
    OMP_NUM_THREADS is set already); a non-zero exit stops the sweep, naming the command."""
    env = dict(os.environ)
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    log.info("$ t2i-recap %s", " ".join(argv))
    code = subprocess.call([sys.executable, "-m", "t2i_recap", *argv], env=env)
    if code:
        raise SystemExit(f"sweep: `t2i-recap {' '.join(argv)}` failed with exit code {code}")


def p_name(p: float) -> str:
    """A folder name for a p value: 0.2 -> p0_20."""
    return f"p{p:.2f}".replace(".", "_")


def fmt_ci(entry: dict | None) -> str:
    """`mean [low, high]`, or `-` without a value."""
    if not entry or entry.get("mean") is None:
        return "-"
    if not entry.get("ci"):
        return f"{entry['mean']:.3f}"
    low, high = entry["ci"]
    return f"{entry['mean']:.3f} [{low:.3f}, {high:.3f}]"


def best_p(points: list[tuple[float, dict]]) -> float | None:
    """The p with the highest mean (the lowest p among ties), or None without values."""
    scored = [(e["mean"], -p, p) for p, e in points if e and e.get("mean") is not None]
    return max(scored)[2] if scored else None


def plot_against_p(panels: list[tuple[str, dict[str, list[tuple[float, dict]]]]], path: Path,
                   title: str, ylabel: str = "score") -> Path:
    """One PNG, a panel per (title, {series: [(p, {mean, ci})]}): each series' mean against p with
    its 95% interval as error bars. Written atomically."""
    from t2i_recap.extras import require

    matplotlib = require("matplotlib", "caption", "the sweep's figure")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (panel_title, series) in zip(axes[0], panels):
        width = 0.012 * (len(series) - 1)  # series side by side at each p, so their bars do not overlap
        for i, (name, points) in enumerate(series.items()):
            pts = sorted(((p, e) for p, e in points if e and e.get("mean") is not None), key=lambda t: t[0])
            if not pts:
                continue
            shift = (i / max(1, len(series) - 1) - 0.5) * width
            xs = [p + shift for p, _ in pts]
            ys = [e["mean"] for _, e in pts]
            lo = [e["mean"] - e["ci"][0] if e.get("ci") else 0.0 for _, e in pts]
            hi = [e["ci"][1] - e["mean"] if e.get("ci") else 0.0 for _, e in pts]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name)
        ax.set_title(panel_title)
        ax.set_xlabel("p (share of original captions)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
