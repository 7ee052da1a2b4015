"""The stage registry: every stage of a pipeline declared once, in `kubeforge.stages.builtin`.

Everything that lists stages reads this module: the manifest's sections and its validation
(`kubeforge.spec.pipeline`), a pipeline's stage order and inputs, the executor's dispatch and the Ray
job entrypoint (`jobs/stage.py`), the operator's pod sizes and images, the role a stage's model plays
in the MLflow registry, the metrics promotion gates and the tune stage may name, and the stages the
tune stage can search over. docs/adding-a-stage.md walks through adding one.

This package is light (no torch, Ray or MLflow at import): `kubeforge validate` and the operator
import it. What a stage runs is named as `module:attribute` text and imported only when used.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from kubeforge.stages.results import StageResult

if TYPE_CHECKING:
    from kubeforge.spec.pipeline import PipelineSpec
    from kubeforge.spec.pretrain import Resources

SpecT = TypeVar("SpecT", bound=BaseModel)
ResultT = TypeVar("ResultT", bound=StageResult)


@dataclass(frozen=True)
class PodSize:
    """The Ray worker pods a stage needs on a cluster (the head pod runs its driver only)."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: int

    @classmethod
    def of(cls, workers: int = 1, cpus_per_worker: float = 1.0, use_gpu: bool = False) -> PodSize:
        """`workers` pods of `cpus_per_worker` CPUs, each with a whole GPU when `use_gpu`."""
        return cls(workers, cpus_per_worker, 1 if use_gpu else 0)

    @classmethod
    def of_workers(cls, resources: Resources) -> PodSize:
        """A pod per Ray Train worker of a training section's `resources`."""
        return cls.of(resources.workers, resources.cpus_per_worker, resources.use_gpu)


ONE_CPU_POD = PodSize(1, 1.0, 0)


@dataclass(frozen=True)
class Metric:
    """A metric a stage's result carries, which promotion gates may name as `<stage>.<metric>`."""

    name: str
    lower_is_better: bool = False


@dataclass(frozen=True)
class Training:
    """What the tune stage needs to run a training stage's loop as one trial."""

    loop_config: str
    """`module:function(section, context)` returning the loop's typed configuration."""
    recipe: str
    """`module:Class`: the `kubeforge.engine.recipe.Recipe` that runs the loop."""
    eval_metrics: Callable[[Any], tuple[str, ...]]
    """What every evaluation of the loop reports, given the section: the metrics a search may optimise."""
    eval_metrics_vary_with: str | None = None
    """The section's field that decides them, if any (named in the tune stage's error messages)."""


@dataclass(frozen=True, eq=False)
class Stage(Generic[SpecT, ResultT]):
    """One stage of a pipeline."""

    name: str
    """The stage's name: its folder, its MLflow run, its RayJob, its progress and metric label."""
    section: str
    """Its section of the manifest's `spec`; the stage is part of a pipeline when the section is set."""
    spec_type: type[SpecT]
    """The section's pydantic model."""
    result_type: type[ResultT]
    """The frozen dataclass `run` returns; stored in the stage folder's result.json."""
    run: str
    """`module:function` with `run(section, context) -> result`."""
    reads: tuple[str, ...] | Callable[[], tuple[str, ...]] = ()
    """The stages whose outputs it reads, when the manifest has them (or a function of the registry that
    names them). A section with `hyperparameters_from` also reads the stage it names."""
    reads_like: Callable[[PipelineSpec], str] | None = None
    """Reads what another stage reads instead (the tune stage reads what its target reads)."""
    pod_size: Callable[[SpecT], PodSize] = field(default=lambda section: ONE_CPU_POD)
    """Its worker pods on a cluster, from its section."""
    image: Literal["stage", "quantize"] = "stage"
    """The container image its RayJob runs (quantize needs llm-compressor's environment)."""
    gpu_runs_in: Literal["workers", "driver"] = "workers"
    """Where its GPU code runs when its section asks for GPUs: in the Ray workers it starts (Ray Train
    workers, Tune trials), or in the stage function itself, the job's driver. On a cluster a driver runs on
    the head pod, which has no GPU, unless its RayJob reserves the GPU for it (`rayjob.stage_rayjob`)."""
    required: bool = False
    """Every manifest has this section."""
    model_role: str | None = None
    """The role of the model it produces in the registered model's lineage (None: it produces none)."""
    candidate: bool = True
    """Its model becomes the pipeline's model so far: what `StageContext.latest_model` returns and the
    quantize and promote stages take. False for a model made beside that one (the reward model), which is
    registered with its role but never quantized, scored or promoted."""
    needs_model: str | None = None
    """What it does to an earlier stage's model ("score", "quantize"), when it needs one to run."""
    metrics: tuple[Metric, ...] = ()
    """What its result carries for promotion gates."""
    metric_pattern: str | None = None
    """Further metric names it may report, as a regular expression, when its section decides them at run
    time (evaluate's lm-evaluation-harness tasks); it checks gates on them itself when it runs."""
    scores_champion: bool = False
    """It scores the current champion too, so gates on its metrics may compare against the champion."""
    training: Training | None = None
    """Set for stages that train: the tune stage may search over them."""
    local_paths: Callable[[SpecT], Iterable[tuple[str, str]]] = field(default=lambda section: ())
    """The local files and folders its section names, as (field within the section, path): relative ones
    resolve against the manifest's folder (on a cluster: the work volume)."""
    cache_extra: str | None = None
    """`module:function(section, base_dir) -> str` mixed into the stage's cache key (the data stage's
    fingerprint of its source files)."""

    def section_of(self, spec: PipelineSpec) -> SpecT | None:
        section = getattr(spec, self.section, None)
        return section if isinstance(section, self.spec_type) else None

    def load_run(self) -> Callable[[SpecT, Any], ResultT]:
        return load(self.run)

    def metric_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.metrics)

    def produces(self, metric: str) -> bool:
        """Whether a gate may name `metric` of this stage."""
        return metric in self.metric_names() or (
            self.metric_pattern is not None and re.fullmatch(self.metric_pattern, metric) is not None)


def load(reference: str) -> Any:
    """The object a `module:attribute` reference names (imported now)."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


_REGISTRY: dict[str, Stage[Any, Any]] = {}


def register(stage: Stage[Any, Any]) -> None:
    if stage.name in _REGISTRY:
        raise ValueError(f"a stage named {stage.name!r} is already registered")
    if any(s.section == stage.section for s in _REGISTRY.values()):
        raise ValueError(f"another stage already reads spec.{stage.section}")
    _REGISTRY[stage.name] = stage


@contextmanager
def registered(stage: Stage[Any, Any]) -> Iterator[Stage[Any, Any]]:
    """`stage` registered while the block runs (tests register throwaway stages this way)."""
    register(stage)
    try:
        yield stage
    finally:
        del _REGISTRY[stage.name]


def all_stages() -> list[Stage[Any, Any]]:
    """Every registered stage, in registration order (which breaks ties in a pipeline's order)."""
    return list(_REGISTRY.values())


def get(name: str) -> Stage[Any, Any]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no stage named {name!r} (stages: {', '.join(_REGISTRY)})") from None


def present(spec: PipelineSpec) -> list[Stage[Any, Any]]:
    """The stages whose sections this manifest sets, in registration order."""
    return [s for s in _REGISTRY.values() if getattr(spec, s.section, None) is not None]


def inputs(spec: PipelineSpec, name: str) -> tuple[str, ...]:
    """The stages `name` reads in this manifest; all of them run before it."""
    stage = get(name)
    wanted = list(_declared_reads(spec, stage))
    section = stage.section_of(spec)
    source = getattr(section, "hyperparameters_from", None)
    if source is not None and source not in wanted:
        wanted.append(source)
    here = {s.name for s in present(spec)}
    return tuple(d for d in wanted if d in here and d != name)


def _declared_reads(spec: PipelineSpec, stage: Stage[Any, Any]) -> tuple[str, ...]:
    if stage.reads_like is not None:
        return _declared_reads(spec, get(stage.reads_like(spec)))
    return stage.reads() if callable(stage.reads) else stage.reads


def order(spec: PipelineSpec) -> list[str]:
    """The stages of this manifest in execution order: each after the stages it reads, ties broken by
    registration order (so the tune stage runs before the stage it searches for whenever it can)."""
    pending = [s.name for s in present(spec)]
    deps = {name: set(inputs(spec, name)) for name in pending}
    done: list[str] = []
    while pending:
        ready = next((n for n in pending if deps[n] <= set(done)), None)
        if ready is None:
            raise ValueError(f"the stages {', '.join(pending)} read each other's outputs in a cycle")
        done.append(ready)
        pending.remove(ready)
    return done


def model_stages() -> list[Stage[Any, Any]]:
    """Stages that produce the pipeline's model (a `candidate`), in registration order."""
    return [s for s in _REGISTRY.values() if s.model_role is not None and s.candidate]


def training_stages() -> list[Stage[Any, Any]]:
    """Stages the tune stage can search over."""
    return [s for s in _REGISTRY.values() if s.training is not None]


def scored_stages() -> list[Stage[Any, Any]]:
    """Stages that produce a model or metrics a promotion gate may name."""
    return [s for s in _REGISTRY.values() if s.model_role is not None or s.metrics]


def lower_is_better() -> frozenset[str]:
    return frozenset(m.name for s in _REGISTRY.values() for m in s.metrics if m.lower_is_better)


from kubeforge.stages import builtin  # noqa: E402  (the built-in stages register themselves)

__all__ = [
    "ONE_CPU_POD",
    "Metric",
    "PodSize",
    "Stage",
    "StageResult",
    "Training",
    "all_stages",
    "builtin",
    "get",
    "inputs",
    "load",
    "lower_is_better",
    "model_stages",
    "order",
    "present",
    "register",
    "registered",
    "scored_stages",
    "training_stages",
]
