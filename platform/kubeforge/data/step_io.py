"""What the data stage's document steps share: their input and output, and mapping a function over
the parts of the corpus in Ray workers with the counts added up."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubeforge.context import StageContext
from kubeforge.data import tasks
from kubeforge.data.card import StepCounts
from kubeforge.spec.data import DataSpec

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class StepInput:
    parts: list[Path]
    """The documents of the step before, as parts in corpus order (none for `read`)."""
    documents: int
    """How many documents they hold..."""
    characters: int
    """... and characters."""
    out: Path
    """Where the step writes the parts it keeps."""
    work: Path
    """The step's scratch folder."""


@dataclass
class StepOutput:
    counts: StepCounts
    removed: list[Path] = field(default_factory=list)
    """JSONL files that log the duplicates the step removed, each with the document it duplicates, in
    corpus order (one entry a line)."""


Step = Callable[[StepInput, DataSpec, StageContext], StepOutput]

Transform = Callable[..., "tuple[pd.DataFrame, dict[str, Any]]"]
"""A step's work on one part's documents: the documents it keeps, and counts to add up."""


def characters(frame: pd.DataFrame) -> int:
    return int(frame["text"].str.len().sum()) if len(frame) else 0


def transform_part(item: dict[str, Any], transform: Transform, options: dict[str, Any], out: str) -> dict[str, Any]:
    before = tasks.read_part(item["part"])
    after, counts = transform(before, **options)
    if len(after):
        tasks.write_part(after, Path(out) / Path(item["part"]).name)
    return {
        "documents_in": len(before), "documents_out": len(after),
        "characters_in": characters(before), "characters_out": characters(after), **counts,
    }


def add_up(results: list[dict[str, Any]], key: str) -> Any:
    """Sum of a count over items; counts that are dicts are summed key by key, lists concatenated."""
    values = [result[key] for result in results if key in result]
    if values and isinstance(values[0], dict):
        total: Counter[str] = Counter()
        for value in values:
            total.update(value)
        return dict(sorted(total.items()))
    if values and isinstance(values[0], list):
        return [entry for value in values for entry in value]
    return sum(values)


def map_parts(
    step_in: StepInput, transform: Transform, options: dict[str, Any], ctx: StageContext, label: str
) -> tuple[list[dict[str, Any]], StepCounts]:
    results = tasks.run(
        [{"part": str(p)} for p in step_in.parts], transform_part,
        {"transform": transform, "options": options, "out": str(step_in.out)}, ctx, label,
        total=step_in.documents, progress_key="documents_in",
    )
    counts = StepCounts(
        label, True, add_up(results, "documents_in"), add_up(results, "documents_out"),
        add_up(results, "characters_in"), add_up(results, "characters_out"), add_up(results, "changed"),
    )
    return results, counts


def passthrough(step: str, documents: int, characters: int, enabled: bool = False,
                details: dict[str, Any] | None = None) -> StepOutput:
    """The documents as they were: a disabled step, or one that makes something else of them."""
    return StepOutput(StepCounts(step, enabled, documents, documents, characters, characters, details=details or {}))


def unchanged(step: str, step_in: StepInput, details: dict[str, Any] | None = None) -> StepOutput:
    """The step left the documents as they were: disabled (without details), or found nothing to do."""
    return passthrough(step, step_in.documents, step_in.characters, enabled=details is not None, details=details)
