"""What a stage function receives: `run(spec_section, context) -> result`.

Stage code is free of Kubernetes and of the executor: the same function runs under
`kubeforge run`, under `ray job submit` (jobs/) and inside a RayJob pod.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kubeforge.spec import ModelPipeline
from kubeforge.tracking import Tracker


@dataclass(frozen=True)
class StageOutput:
    """A finished upstream stage: its folder and the JSON result it returned."""

    name: str
    key: str
    directory: Path
    result: dict[str, Any]
    mlflow_run_id: str | None


class ProgressTask(Protocol):
    def update(self, completed: float, total: float | None = None, description: str | None = None) -> None: ...


class Reporter(Protocol):
    """Progress bars for people; Prometheus gauges are set directly from kubeforge.metrics."""

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[ProgressTask]: ...

    def log(self, message: str) -> None: ...


@dataclass
class StageContext:
    pipeline: ModelPipeline
    stage: str
    out_dir: Path
    """Where the stage writes. A `.partial` folder that becomes the stage's folder on success; after an
    interruption the next run gets the same folder back, so a stage can resume from what it left there."""
    base_dir: Path
    """The manifest's directory: relative source paths are resolved against it."""
    tracker: Tracker
    reporter: Reporter
    inputs: dict[str, StageOutput] = field(default_factory=dict)

    @property
    def pipeline_name(self) -> str:
        return self.pipeline.metadata.name
