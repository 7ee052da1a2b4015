"""The comparison of the scored models: a table (CSV and Markdown) and one bar chart per metric group."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubeforge.stages.evaluate import EVALUATE, HARNESS_PREFIX

METRICS = tuple(EVALUATE.metric_names())
"""Table columns, in order; a model without a number for one (not applicable) leaves it blank. The
lm-evaluation-harness metrics of a run (`harness_<task>_<metric>`) follow them (`metric_columns`)."""
MODELS = ("candidate", "base", "champion")
REFERENCES = ("base", "champion")
"""Models the others are compared with: `<metric>_vs_<reference>` is the row's value minus theirs."""
LOWER_IS_BETTER = frozenset(m.name for m in EVALUATE.metrics if m.lower_is_better)
# Metrics on one scale share a chart; BLEU (0-100) and perplexity (unbounded) get their own.
PLOT_GROUPS: dict[str, tuple[str, ...]] = {
    "perplexity": ("perplexity",),
    "bleu": ("bleu",),
    "generation": ("exact_match", "rouge_l", "parse_rate", "doctest_pass_rate"),
}

Scores = Mapping[str, Mapping[str, float | None]]


def metric_columns(scores: Scores) -> tuple[str, ...]:
    """The fixed metrics, then the harness metrics any scored model has, sorted."""
    harness = sorted({m for values in scores.values() for m in values if m.startswith(HARNESS_PREFIX)})
    return (*METRICS, *harness)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def comparison_rows(scores: Scores) -> list[dict[str, Any]]:
    """One row per scored model (in MODELS order): its metrics and its deltas to base and champion."""
    rows: list[dict[str, Any]] = []
    metrics = metric_columns(scores)
    for model in (m for m in MODELS if m in scores):
        row: dict[str, Any] = {"model": model}
        for metric in metrics:
            row[metric] = _number(scores[model].get(metric))
        for reference in REFERENCES:
            for metric in metrics:
                delta = None
                if reference in scores and reference != model:
                    mine, theirs = row[metric], _number(scores[reference].get(metric))
                    if mine is not None and theirs is not None:
                        delta = mine - theirs
                row[f"{metric}_vs_{reference}"] = delta
        rows.append(row)
    return rows


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """The table's columns: model, the metrics, then only the delta columns that have a number."""
    keys = {k for row in rows for k in row}
    deltas_of = {f"{k}_vs_{r}" for k in keys for r in REFERENCES}
    harness = sorted(k for k in keys if k.startswith(HARNESS_PREFIX) and k not in deltas_of)
    metrics = (*METRICS, *harness)
    deltas = [
        f"{metric}_vs_{reference}"
        for reference in REFERENCES
        for metric in metrics
        if any(row.get(f"{metric}_vs_{reference}") is not None for row in rows)
    ]
    return ["model", *metrics, *deltas]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_table(rows: list[dict[str, Any]], csv_path: Path, md_path: Path) -> None:
    header = columns(rows)
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            writer.writerow([_cell(row.get(name)) for name in header])
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if name == "model" else "---:" for name in header) + "|",
    ]
    lines += ["| " + " | ".join(_cell(row.get(name)) for name in header) + " |" for row in rows]
    notes = (
        "\nBlank: not applicable to this model or task. `_vs_<model>`: this row minus that model's value "
        "(lower perplexity is better, higher is better for the rest). BLEU is on sacrebleu's 0-100 scale.\n"
    )
    md_path.write_text("\n".join(lines) + "\n" + notes)


def write_plots(scores: Scores, out_dir: Path) -> list[Path]:
    """A grouped bar chart per metric group that any model has a number for; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    models = [m for m in MODELS if m in scores]
    written: list[Path] = []
    groups = {**PLOT_GROUPS, "harness": metric_columns(scores)[len(METRICS):]}
    for group, metrics in groups.items():
        present = [m for m in metrics if any(_number(scores[model].get(m)) is not None for model in models)]
        if not present:
            continue
        fig, axis = plt.subplots(figsize=(max(4.0, 2.2 * len(present) + 1.5), 3.8))
        width = 0.8 / len(models)
        for offset, model in enumerate(models):
            values = [_number(scores[model].get(m)) for m in present]
            positions = [i + (offset - (len(models) - 1) / 2) * width for i in range(len(present))]
            bars = axis.bar(positions, [v if v is not None else 0.0 for v in values], width, label=model)
            for bar, value in zip(bars, values, strict=True):
                label = "n/a" if value is None else f"{value:.3g}"
                axis.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                              va="bottom", fontsize=8)
        axis.set_xticks(range(len(present)), [m + (" (lower is better)" if m in LOWER_IS_BETTER else "")
                                              for m in present])
        axis.set_title(f"evaluation: {group}")
        axis.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{group}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
