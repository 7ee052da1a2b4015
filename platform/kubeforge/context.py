"""What a stage function receives: `run(spec_section, context) -> result`, and how results are kept.

Stage code is free of Kubernetes and of the executor: the same function runs under
`kubeforge run`, under `ray job submit` (jobs/) and inside a RayJob pod. A stage reads its upstream
stages' outputs through the context, typed by their registry entries (`ctx.require(DATA, ...)`),
never by name and string key.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from kubeforge import stages
from kubeforge.errors import KubeForgeError, StageError
from kubeforge.spec.pipeline import ModelPipeline
from kubeforge.stages.results import ModelResult, StageResult
from kubeforge.tracking import Tracker
from kubeforge.workdir import RESULT_FILE, Workdir

REGISTERED_KEY = "registered"
META_KEY = "_kubeforge"

R = TypeVar("R", bound=StageResult)


@dataclass(frozen=True)
class Registered:
    """The MLflow model version a stage's model became."""

    model: str
    version: str
    source: str


@dataclass(frozen=True)
class StageOutput(Generic[R]):
    """A finished upstream stage: its folder, its typed result and where its model was registered."""

    name: str
    key: str
    directory: Path
    result: R
    mlflow_run_id: str | None
    registered: Registered | None = None


def save_output(
    workdir: Workdir, pipeline: str, stage: str, key: str, result: StageResult, registered: Registered | None,
    meta: dict[str, Any],
) -> StageOutput[StageResult]:
    """Finish a stage: its result.json (the result's fields, the registered version, the executor's
    record) written into its folder, which then becomes visible under its key."""
    document = {**result.to_json(), REGISTERED_KEY: None if registered is None else vars(registered), META_KEY: meta}
    directory = workdir.finish_stage(pipeline, stage, key, document)
    return StageOutput(stage, key, directory, result, meta.get("mlflow_run_id"), registered)


def load_output(workdir: Workdir, pipeline: str, stage: stages.Stage[Any, Any], key: str) -> StageOutput[Any] | None:
    """The output of a finished stage with this key, or None when it has not finished."""
    document = workdir.finished_result(pipeline, stage.name, key)
    if document is None:
        return None
    directory = workdir.stage_dir(pipeline, stage.name, key)
    try:
        result = stage.result_type.from_json(document)
    except (TypeError, ValueError) as exc:
        raise KubeForgeError(
            f"{directory / RESULT_FILE}: not a result of this KubeForge's {stage.name} stage ({exc}); delete "
            f"{directory} to run the stage again"
        ) from None
    registered = document.get(REGISTERED_KEY)
    return StageOutput(
        name=stage.name,
        key=key,
        directory=directory,
        result=result,
        mlflow_run_id=(document.get(META_KEY) or {}).get("mlflow_run_id"),
        registered=Registered(**registered) if registered else None,
    )


class ProgressTask(Protocol):
    def update(self, completed: float, total: float | None = None, description: str | None = None) -> None: ...


class Reporter(Protocol):
    """Progress bars for people; Prometheus gauges are set directly from kubeforge.metrics."""

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[ProgressTask]: ...

    def log(self, message: str) -> None: ...


T = TypeVar("T", bound=StageResult)


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
    inputs: dict[str, StageOutput[Any]] = field(default_factory=dict)

    @property
    def pipeline_name(self) -> str:
        return self.pipeline.metadata.name

    def input(self, stage: stages.Stage[Any, T]) -> StageOutput[T] | None:
        """The output of upstream stage `stage`, when this pipeline has it."""
        return self.inputs.get(stage.name)

    def require(self, stage: stages.Stage[Any, T], why: str) -> StageOutput[T]:
        """The output of upstream stage `stage`; a StageError saying `why` it is needed when there is none."""
        found = self.inputs.get(stage.name)
        if found is None:
            raise StageError(self.stage, why)
        return found

    def latest_model(self) -> StageOutput[ModelResult] | None:
        """The last upstream stage (in pipeline order) that produced a model: the pipeline's model so far."""
        for stage in reversed(stages.model_stages()):
            found = self.inputs.get(stage.name)
            if found is not None:
                return found
        return None
