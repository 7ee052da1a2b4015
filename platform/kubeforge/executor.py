"""The local executor: runs a pipeline's stages in order on a Ray runtime.

Each stage's output is addressed by a hash of its manifest section and its inputs, so an
unchanged stage is skipped on a rerun, and an interrupted one resumes in the folder it left
behind (pretraining picks up its last checkpoint there). The same `run_stage` serves
`kubeforge run` and the Ray job entrypoints in jobs/.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubeforge import metrics, stages
from kubeforge.context import Registered, Reporter, StageContext, StageOutput, load_output, save_output
from kubeforge.errors import KubeForgeError, StageError
from kubeforge.logs import stage_log
from kubeforge.runtime import ensure_ray
from kubeforge.secrets import redact_url, scrub
from kubeforge.spec.pipeline import ModelPipeline
from kubeforge.stages.results import ModelResult, StageResult
from kubeforge.stages.tune import TuneResult
from kubeforge.tracking import TAG_PREFIX, code_version, end_stage_run, resolve_tracking_uri, start_stage_run
from kubeforge.workdir import RunRecord, StageRecord, Workdir, now

MLFLOW_RUN_FILE = ".mlflow_run_id"


@dataclass
class RunOptions:
    workdir: Workdir
    base_dir: Path
    """The manifest's directory, against which relative source paths resolve."""
    manifest: str = "-"
    tracking_uri: str | None = None
    ray_address: str | None = None
    num_cpus: int | None = None


@dataclass(frozen=True)
class PlannedStage:
    name: str
    key: str
    deps: tuple[str, ...] = field(default=())


def spec_hash(pipeline: ModelPipeline) -> str:
    blob = json.dumps(pipeline.spec.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def plan(pipeline: ModelPipeline, base_dir: Path) -> list[PlannedStage]:
    """Stages in execution order with their cache keys."""

    def source_fingerprint(stage: stages.Stage[Any, Any], section: Any) -> Any:
        return stages.load(stage.cache_extra)(section, base_dir) if stage.cache_extra else None

    keys = pipeline.stage_keys(source_fingerprint)
    return [PlannedStage(name, key, pipeline.stage_deps(name)) for name, key in keys.items()]


def finished_output(pipeline: ModelPipeline, stage: PlannedStage, workdir: Workdir) -> StageOutput[Any] | None:
    return load_output(workdir, pipeline.metadata.name, stages.get(stage.name), stage.key)


def run_pipeline(pipeline: ModelPipeline, options: RunOptions, reporter: Reporter) -> RunRecord:
    """Run every stage the manifest asks for; returns the run's record (also saved in the workdir)."""
    workdir = options.workdir
    tracking_uri = resolve_tracking_uri(options.tracking_uri, workdir)
    planned = plan(pipeline, options.base_dir)
    record = workdir.new_run(pipeline.metadata.name, options.manifest, tracking_uri)
    record.stages = [StageRecord(name=s.name, key=s.key) for s in planned]
    workdir.save_run(record)
    name = pipeline.metadata.name
    for stage in planned:
        metrics.STAGE_STATE.labels(name, stage.name).state("pending")
    try:
        outputs: dict[str, StageOutput[Any]] = {}
        for stage in planned:
            stage_record = record.stage(stage.name)
            done = finished_output(pipeline, stage, workdir)
            if done is not None:
                outputs[stage.name] = done
                stage_record.state = "skipped"
                stage_record.mlflow_run_id = done.mlflow_run_id
                metrics.STAGE_STATE.labels(name, stage.name).state("skipped")
                reporter.log(f"stage {stage.name}: unchanged since a finished run, reusing {done.directory}")
                workdir.save_run(record)
                continue
            ensure_ray(options.ray_address, options.num_cpus)
            outputs[stage.name] = execute_stage(
                pipeline, stage, {d: outputs[d] for d in stage.deps}, options, tracking_uri, reporter, record
            )
        record.state = "succeeded"
    except KeyboardInterrupt:
        record.state = "interrupted"
        raise
    except BaseException:
        record.state = "failed"
        raise
    finally:
        record.finished = now()
        workdir.save_run(record)
    return record


def run_stage(pipeline: ModelPipeline, stage_name: str, options: RunOptions, reporter: Reporter) -> StageOutput:
    """Run one stage whose upstream stages have already finished (the Ray job entrypoints use this)."""
    planned = {s.name: s for s in plan(pipeline, options.base_dir)}
    if stage_name not in planned:
        raise KubeForgeError(f"the manifest has no '{stage_name}' stage (it has: {', '.join(planned)})")
    stage = planned[stage_name]
    inputs = {}
    for dep in stage.deps:
        found = finished_output(pipeline, planned[dep], options.workdir)
        if found is None:
            raise KubeForgeError(
                f"stage {stage_name} needs the '{dep}' stage of this manifest to have finished in "
                f"{options.workdir.root}; run it first"
            )
        inputs[dep] = found
    done = finished_output(pipeline, stage, options.workdir)
    if done is not None:
        return done
    tracking_uri = resolve_tracking_uri(options.tracking_uri, options.workdir)
    record = options.workdir.new_run(pipeline.metadata.name, options.manifest, tracking_uri)
    record.stages = [StageRecord(name=stage.name, key=stage.key)]
    ensure_ray(options.ray_address, options.num_cpus)
    try:
        output = execute_stage(pipeline, stage, inputs, options, tracking_uri, reporter, record)
        record.state = "succeeded"
        return output
    except BaseException:
        record.state = "failed"
        raise
    finally:
        record.finished = now()
        options.workdir.save_run(record)


def stage_section(pipeline: ModelPipeline, stage: str, inputs: dict[str, StageOutput[Any]], reporter: Reporter) -> Any:
    """The stage's manifest section, with the tune stage's best configuration applied when it asks for it."""
    from kubeforge.spec.tune import apply_overrides

    section = pipeline.section(stage)
    source = getattr(section, "hyperparameters_from", None)
    if source is None:
        return section
    found = inputs[source].result
    if not isinstance(found, TuneResult):
        raise StageError(stage, f"hyperparameters_from: the {source} stage's result holds no best configuration")
    reporter.log(f"stage {stage}: using the tune stage's best configuration {found.best_config}")
    return apply_overrides(section, found.best_config)


def _register_model(
    pipeline: ModelPipeline,
    stage: stages.Stage[Any, Any],
    result: StageResult,
    run_id: str,
    run_tags: dict[str, str],
    inputs: dict[str, StageOutput[Any]],
    tracking_uri: str,
) -> Registered | None:
    """Every model a pipeline produces becomes a version of its registered model, before the stage
    counts as finished: a stage interrupted here reruns and registers (once) on resume."""
    from mlflow.exceptions import MlflowException

    from kubeforge.registry.lineage import register_stage_model

    if stage.model_role is None or not isinstance(result, ModelResult):
        return None
    try:
        return register_stage_model(tracking_uri, pipeline.metadata.name, stage, result, run_id, run_tags, inputs)
    except MlflowException as exc:
        raise StageError(
            stage.name,
            f"could not register the model in MLflow ({redact_url(tracking_uri)}): {scrub(exc.message, tracking_uri)}",
            resumable=True,
        ) from exc


def execute_stage(
    pipeline: ModelPipeline,
    stage: PlannedStage,
    inputs: dict[str, StageOutput[Any]],
    options: RunOptions,
    tracking_uri: str,
    reporter: Reporter,
    record: RunRecord,
) -> StageOutput[Any]:
    workdir = options.workdir
    name = pipeline.metadata.name
    stage_record = record.stage(stage.name)
    out_dir = workdir.begin_stage(name, stage.name, stage.key)
    resume_file = out_dir / MLFLOW_RUN_FILE
    resume_run_id = resume_file.read_text().strip() if resume_file.is_file() else None
    if resume_run_id:
        reporter.log(f"stage {stage.name}: resuming an interrupted run in {out_dir}")

    metadata = pipeline.metadata
    tags = {
        **({f"{TAG_PREFIX}namespace": metadata.namespace} if metadata.namespace else {}),
        **{f"{TAG_PREFIX}label.{k}": v for k, v in metadata.labels.items()},
        **{f"{TAG_PREFIX}annotation.{k}": v for k, v in metadata.annotations.items()},
        f"{TAG_PREFIX}pipeline": name,
        f"{TAG_PREFIX}stage": stage.name,
        f"{TAG_PREFIX}stage_key": stage.key,
        f"{TAG_PREFIX}spec_hash": spec_hash(pipeline),
        f"{TAG_PREFIX}run": record.run_id,
        f"{TAG_PREFIX}code_version": code_version(),
        **{f"{TAG_PREFIX}upstream.{dep}": out.mlflow_run_id for dep, out in inputs.items() if out.mlflow_run_id},
        **{
            f"{TAG_PREFIX}dataset_hash": out.result.dataset_hash
            for out in inputs.values()
            if hasattr(out.result, "dataset_hash")
        },
    }
    tracker = start_stage_run(tracking_uri, workdir, name, stage.name, tags, resume_run_id)
    resume_file.write_text(tracker.run_id)

    stage_record.state = "running"
    stage_record.started = now()
    stage_record.mlflow_run_id = tracker.run_id
    workdir.save_run(record)
    metrics.STAGE_STATE.labels(name, stage.name).state("running")

    definition = stages.get(stage.name)
    context = StageContext(
        pipeline=pipeline,
        stage=stage.name,
        out_dir=out_dir,
        base_dir=options.base_dir,
        tracker=tracker,
        reporter=reporter,
        inputs=inputs,
    )
    started = time.monotonic()
    try:
        with stage_log(out_dir, stage.name, tracker):
            result = definition.load_run()(stage_section(pipeline, stage.name, inputs, reporter), context)
    except BaseException as exc:
        stage_record.state = "failed"
        stage_record.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        metrics.STAGE_STATE.labels(name, stage.name).state("failed")
        interrupted = isinstance(exc, KeyboardInterrupt)
        end_stage_run(tracker, "KILLED" if interrupted else "FAILED")
        if isinstance(exc, KubeForgeError) and not getattr(exc, "resumable", False):
            # The input was at fault: nothing of this attempt is worth resuming from.
            workdir.discard_stage(name, stage.name, stage.key)
        raise
    finally:
        duration = time.monotonic() - started
        metrics.STAGE_DURATION.labels(name, stage.name).set(duration)
        stage_record.finished = now()
        workdir.save_run(record)

    if not isinstance(result, definition.result_type):
        raise StageError(stage.name, f"returned {type(result).__name__}, expected {definition.result_type.__name__}")
    registered = _register_model(pipeline, definition, result, tracker.run_id, tags, inputs, tracking_uri)
    if registered is not None:
        reporter.log(f"stage {stage.name}: registered as model '{registered.model}' version {registered.version}")
    meta = {
        "stage": stage.name,
        "key": stage.key,
        "mlflow_run_id": tracker.run_id,
        "finished": now(),
        "duration_seconds": round(duration, 3),
    }
    output = save_output(workdir, name, stage.name, stage.key, result, registered, meta)
    dataset_hash = getattr(result, "dataset_hash", None)
    if dataset_hash is not None:
        tracker.set_tags({f"{TAG_PREFIX}dataset_hash": dataset_hash})
    tracker.log_metrics({"stage_duration_seconds": duration})
    end_stage_run(tracker, "FINISHED")
    stage_record.state = "succeeded"
    workdir.save_run(record)
    metrics.STAGE_STATE.labels(name, stage.name).state("succeeded")
    reporter.log(f"stage {stage.name}: done in {duration:.1f}s -> {output.directory}")
    return output
