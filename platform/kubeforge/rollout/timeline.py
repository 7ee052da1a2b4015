"""The rollout timeline: the candidate's weight over time, with every analysis marked by its verdict."""

from __future__ import annotations

from pathlib import Path

from kubeforge.rollout.controller import RolloutRecord

VERDICT_COLOURS = {"pass": "tab:green", "fail": "tab:red", "inconclusive": "tab:gray"}


def plot_timeline(record: RolloutRecord, path: Path, now: float | None = None) -> Path:
    """Write a PNG of the candidate's traffic share (a step line through the rollout's events, extended to
    `now` while it runs) and of each analysis (a dot at its time and weight, coloured by verdict)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: `kubeforge rollout status` runs in terminals and pods
    import matplotlib.pyplot as plt

    t0 = record.started
    times = [e.time - t0 for e in record.events]
    weights = [e.weight for e in record.events]
    end = (now if now is not None and not record.done else record.events[-1].time) - t0
    if times and end > times[-1]:
        times.append(end)
        weights.append(weights[-1])

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.step(times, weights, where="post", color="tab:blue", label="candidate weight")
    history = record.canary.history if record.canary is not None else ()
    for verdict, colour in VERDICT_COLOURS.items():
        points = [(a.time - t0, a.weight) for a in history if a.overall == verdict]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.scatter(xs, ys, color=colour, zorder=3, label=f"analysis: {verdict}")
    for event in record.events:
        if event.kind in ("promote", "rollback", "abort", "concluded"):
            ax.axvline(event.time - t0, color="black", linestyle=":", linewidth=1)
            ax.annotate(event.kind, (event.time - t0, 50), rotation=90, fontsize=8, ha="right")
    subject = record.subject
    ax.set_title(f"{subject.deployment}: {subject.model} v{subject.stable_version} -> "
                 f"{subject.candidate_model} v{subject.candidate_version} ({record.strategy}, {record.phase})",
                 fontsize=10)
    ax.set_xlabel("seconds since the rollout started")
    ax.set_ylabel("% of traffic to the candidate")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
