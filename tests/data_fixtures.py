"""Helpers for the data-stage tests: a recording reporter and a StageContext on a throwaway MLflow store."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubeforge.context import StageContext
from kubeforge.spec.pipeline import ModelPipeline, pipeline_model
from kubeforge.stages.data import DataResult
from kubeforge.tracking import Tracker, start_stage_run
from kubeforge.workdir import Workdir


@dataclass
class _Bar:
    description: str
    total: float | None
    completed: float = 0.0

    def update(self, completed: float, total: float | None = None, description: str | None = None) -> None:
        self.completed = completed
        if total is not None:
            self.total = total
        if description is not None:
            self.description = description


@dataclass
class RecordingReporter:
    """Keeps every progress bar and log line so tests can look at what a stage reported."""

    bars: list[_Bar] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[_Bar]:
        bar = _Bar(description, total)
        self.bars.append(bar)
        yield bar

    def log(self, message: str) -> None:
        self.lines.append(message)


def pipeline_with(data: dict[str, Any], name: str = "datatest") -> ModelPipeline:
    return pipeline_model().model_validate(
        {"apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelPipeline", "metadata": {"name": name}, "spec": {"data": data}}
    )


def data_context(tmp: Path, pipeline: ModelPipeline, out_name: str = "data.partial") -> tuple[StageContext, Tracker]:
    """A context whose tracker logs to a SQLite MLflow store inside `tmp`."""
    workdir = Workdir(tmp / "work")
    tracker = start_stage_run(
        f"sqlite:///{tmp / 'mlflow.db'}", workdir, pipeline.metadata.name, "data", tags={}, resume_run_id=None
    )
    ctx = StageContext(
        pipeline=pipeline, stage="data", out_dir=tmp / out_name, base_dir=tmp, tracker=tracker,
        reporter=RecordingReporter(),
    )
    return ctx, tracker


def data_result(**fields: Any) -> DataResult:
    """A data stage's result for tests that build a stage folder by hand: `fields` over empty defaults."""
    defaults: dict[str, Any] = {
        "tokenizer_dir": "tokenizer", "shards": {"train": [], "validation": [], "test": []}, "seq_len": 8,
        "vocab_size": 16, "special_tokens": {}, "num_sequences": {}, "num_tokens": {}, "num_documents": {},
        "dataset_hash": "0" * 16, "documents": "documents.parquet", "removed_duplicates": "removed_duplicates.jsonl",
        "card": "card.md", "funnel": [],
    }
    return DataResult(**{**defaults, **fields})
