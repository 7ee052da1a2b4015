"""The search's two plots: the optimisation history and the parameter importances (PNG, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kubeforge.tune.search import running_best


@dataclass(frozen=True)
class HistoryPoint:
    trial_id: str
    value: float
    full_length: bool
    """False for a trial ASHA stopped early: its value is from fewer steps than the others'."""


def optimization_history(points: Sequence[HistoryPoint], metric: str, mode: str, path: Path) -> Path:
    """The metric of each trial in completion order, and the best full-length value so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = list(range(1, len(points) + 1))
    full = [(x, p.value) for x, p in zip(xs, points, strict=True) if p.full_length]
    stopped = [(x, p.value) for x, p in zip(xs, points, strict=True) if not p.full_length]
    if full:
        ax.scatter(*zip(*full, strict=True), color="tab:blue", label="trial (full length)", zorder=3)
    if stopped:
        ax.scatter(*zip(*stopped, strict=True), facecolors="none", edgecolors="tab:gray",
                   label="trial (stopped early by ASHA)", zorder=3)
    # The running best counts full-length trials only: an early-stopped value is not comparable.
    best = running_best([p.value if p.full_length else float("nan") for p in points], mode)
    ax.step(xs, best, where="post", color="tab:red", label=f"best so far ({mode})")
    ax.set_xlabel("trial (completion order)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.set_title("Optimisation history")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def param_importances(importances: Mapping[str, float], metric: str, path: Path) -> Path:
    """Horizontal bars, most important parameter on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = sorted(importances.items(), key=lambda item: item[1])
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * len(ranked)))
    ax.barh([name for name, _ in ranked], [value for _, value in ranked], color="tab:blue")
    ax.set_xlabel(f"importance for {metric} (Optuna, PED-ANOVA)")
    ax.set_title("Hyper-parameter importances")
    ax.set_xlim(0, max(1.0, *(value for _, value in ranked)))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
