"""The data card: what each step did to the corpus, as JSON, Markdown and a funnel plot."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubeforge.data.tasks import NodeWork


@dataclass
class StepCounts:
    step: str
    enabled: bool
    documents_in: int
    documents_out: int
    characters_in: int
    characters_out: int
    changed: int = 0
    """Documents whose text the step rewrote (normalisation, redaction)."""
    details: dict[str, Any] = field(default_factory=dict)
    """Step-specific numbers: removals per quality rule, replacements per redaction kind, LSH bands."""

    @property
    def removed(self) -> int:
        return self.documents_in - self.documents_out

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "removed": self.removed}


def write_funnel_plot(funnel: Sequence[StepCounts], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row.step for row in funnel]
    fig, (docs_axis, chars_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, values, label in (
        (docs_axis, [row.documents_out for row in funnel], "documents out"),
        (chars_axis, [row.characters_out / 1e6 for row in funnel], "characters out (millions)"),
    ):
        colors = ["tab:blue" if row.enabled else "lightgray" for row in funnel]
        bars = axis.bar(names, values, color=colors)
        axis.bar_label(bars, labels=[f"{v:,.0f}" if v >= 10 else f"{v:.2f}" for v in values], fontsize=7)
        axis.set_title(label)
        axis.tick_params(axis="x", rotation=45)
    fig.suptitle("Data funnel (gray: step disabled)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_card(
    pipeline: str, funnel: Sequence[StepCounts], duplicates_sample: Sequence[Mapping[str, Any]],
    outputs: Mapping[str, Any], work_per_node: Mapping[str, NodeWork],
) -> dict[str, Any]:
    return {
        "pipeline": pipeline,
        "funnel": [row.as_dict() for row in funnel],
        "near_duplicate_sample": list(duplicates_sample),
        "outputs": dict(outputs),
        "work_per_node": {node: asdict(work) for node, work in sorted(work_per_node.items())},
    }


def render_markdown(card: Mapping[str, Any]) -> str:
    lines = [
        f"# Data card: {card['pipeline']}",
        "",
        "## Funnel",
        "",
        "| step | enabled | documents in | documents out | removed | changed | characters in | characters out |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in card["funnel"]:
        lines.append(
            f"| {row['step']} | {'yes' if row['enabled'] else 'no'} "
            f"| {row['documents_in']:,} | {row['documents_out']:,} "
            f"| {row['removed']:,} | {row['changed']:,} | {row['characters_in']:,} | {row['characters_out']:,} |"
        )
    lines += ["", "![funnel](funnel.png)", "", "## Step details", ""]
    for row in card["funnel"]:
        if row["details"]:
            lines.append(f"* **{row['step']}**: `{json.dumps(row['details'], sort_keys=True)}`")
    lines += ["", "## Removed near-duplicates (sample)", ""]
    sample = card["near_duplicate_sample"]
    if sample:
        lines += ["| removed | duplicate of | Jaccard |", "|---|---|---:|"]
        lines += [f"| {d['id']} | {d['duplicate_of']} | {d['similarity']:.2f} |" for d in sample]
    else:
        lines.append("None.")
    outputs = card["outputs"]
    lines += ["", "## Outputs", ""]
    lines += [f"* {key}: `{json.dumps(value, sort_keys=True)}`" for key, value in outputs.items()]
    lines += ["", "## Work per node (this attempt's; steps an earlier attempt finished are not counted)", ""]
    lines += ["| node | work items | busy seconds |", "|---|---:|---:|"]
    lines += [f"| {node} | {w['items']:,} | {w['seconds']:.1f} |" for node, w in card["work_per_node"].items()]
    return "\n".join(lines) + "\n"


def write_card(card: Mapping[str, Any], funnel: Sequence[StepCounts], out_dir: Path) -> list[Path]:
    """card.json, card.md and funnel.png in `out_dir`."""
    json_path = out_dir / "card.json"
    json_path.write_text(json.dumps(card, indent=2, sort_keys=True))
    md_path = out_dir / "card.md"
    md_path.write_text(render_markdown(card))
    plot_path = out_dir / "funnel.png"
    write_funnel_plot(funnel, plot_path)
    return [json_path, md_path, plot_path]
