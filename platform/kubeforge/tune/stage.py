"""`run(spec, ctx)`: hyper-parameter search over the pretraining or fine-tuning loop with Ray Tune.

Each trial runs the target stage's own training recipe (its registry entry's `Training`) on a
`TuneSession`, as a single-process Tune function trainable on the target's manifest section with the
trial's values applied. The loop reports every evaluation, which is what ASHA decides
on, and checkpoints at every evaluation.

Persistence and resuming. The Optuna study lives in `spec.storage` or in `optuna.journal` in the stage
folder; Tune's own experiment state lives in `ray/tune` there. After an interruption the executor hands
the same folder back, and `Tuner.restore` continues the search: finished trials are kept (not rerun),
unfinished ones resume from their last checkpoint, and the restored searcher still holds the study.

MLflow. The driver (never a trial process) logs each trial as a nested run of the stage's run, from a
Tune callback. `trials.json` in the stage folder maps trial ids to their MLflow runs, so a resumed
search continues the runs of interrupted trials and never logs a finished trial twice. `history.jsonl`
records every evaluation in the order the driver received it (the benchmark reads it).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ray import tune

from kubeforge import metrics as prom
from kubeforge import stages
from kubeforge.context import StageContext
from kubeforge.engine.session import TuneSession
from kubeforge.errors import KubeForgeError, StageError
from kubeforge.progress import QuietReporter
from kubeforge.secrets import redact_url
from kubeforge.spec.tune import TuneSpec, apply_overrides
from kubeforge.stages.tune import TUNE, TuneResult
from kubeforge.tracking import TAG_PREFIX
from kubeforge.tune import checkpoints, search
from kubeforge.tune.plots import HistoryPoint, optimization_history, param_importances
from kubeforge.tune.recorder import LIVE, TRIALS_FILE, Live, TrialRecorder, error_line, finite

STAGE = TUNE.name
RUN_NAME = "tune"
CSV_FILE = "trials.csv"
PLOTS_DIR = "plots"
# Tune saves its experiment state at most this often (10 s by default); a trial that finished in the
# window before a kill would be started again (from its final checkpoint) after a restore.
EXPERIMENT_STATE_PERIOD_S = "2"


# --- the trial: runs in its own Ray actor ------------------------------------------------------------


def _training(target: str) -> stages.Training:
    training = stages.get(target).training
    if training is None:  # the manifest's validation refuses such a target
        raise StageError(STAGE, f"spec.tune.target: the {target} stage does not train")
    return training


def run_trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """One trial: the target's training loop on its section with this trial's values applied.

    `config` holds the sampled values by dotted path; `base` (shared by every trial, passed with
    `tune.with_parameters`) holds the target, its section with the search-wide settings and a context
    without MLflow or progress handles. The loop config is built here, from the trial's own spec,
    because the target's may depend on searched settings (fine-tuning encodes its examples with
    `max_length` and splits them by `train.batch_size`).
    """
    target = base["target"]
    try:
        section = stages.get(target).spec_type.model_validate(base["section"])
        trial_spec = apply_overrides(section, {path: config[path] for path in base["paths"]})
        loop_config = _loop_config(target, trial_spec, base["context"])
        recipe = stages.load(_training(target).recipe)
        recipe(loop_config, TuneSession(trial_spec.resources.use_gpu)).run()  # type: ignore[attr-defined]
    except ValidationError as exc:
        raise TrialError(f"spec.{target} with this trial's values: {_validation_message(exc)}") from None
    except KubeForgeError as exc:
        raise TrialError(str(exc)) from None


class TrialError(Exception):
    """What went wrong in a trial, as a plain exception: Ray copies a trial's error with `copy.copy`, which
    neither pydantic's ValidationError nor StageError (keyword-only arguments) survives."""


def _loop_config(target: str, section: BaseModel, ctx: StageContext) -> Any:
    """The target's loop configuration for `section`; progress goes through Tune, not a Ray Train hub."""
    return stages.load(_training(target).loop_config)(section, ctx)


def _trial_context(ctx: StageContext) -> StageContext:
    """`ctx` as trials get it: picklable, with no MLflow run (the driver logs for the trials)."""
    return dataclasses.replace(ctx, tracker=None, reporter=QuietReporter())  # type: ignore[arg-type]


# --- the stage -----------------------------------------------------------------------------------


@dataclass
class TrialOutcome:
    trial_id: str
    params: dict[str, Any]
    state: str
    """completed (ran its full length), early_stopped (by ASHA) or failed."""
    last_step: int
    metrics: dict[str, float]
    """The searched metrics at the trial's last evaluation."""
    ended_at: float
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _trial_section(spec: TuneSpec, target: BaseModel, max_step: int) -> BaseModel:
    """The target section as every trial starts from it (one process, the search's step budget)."""
    settings = search.trial_settings(
        spec, list(type(target).model_fields), max_step, target.eval.every_steps  # type: ignore[attr-defined]
    )
    try:
        section = apply_overrides(target, settings)
    except ValidationError as exc:
        raise StageError(
            STAGE,
            f"spec.{spec.target} cannot run as a single-process trial with tune.gpus_per_trial="
            f"{spec.gpus_per_trial:g}: {_validation_message(exc)}",
        ) from None
    # Each end of every range, and each choice, must make a valid section; a bad one would otherwise only
    # show up as a failed trial, possibly after others have spent their budget.
    for path, dim in spec.search_space.items():
        for value in search.boundary_values(dim):
            try:
                apply_overrides(section, {path: value})
            except ValidationError as exc:
                raise StageError(
                    STAGE,
                    f"spec.tune.search_space.{path}: the value {value!r} makes spec.{spec.target} invalid: "
                    f"{_validation_message(exc)}",
                ) from None
    return section


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])


def _check_resources(spec: TuneSpec, cluster: Mapping[str, float]) -> None:
    """A trial that no node can hold would wait for resources forever: say so at once."""
    cpus = cluster.get("CPU", 0.0)
    if spec.cpus_per_trial > cpus:
        raise StageError(
            STAGE, f"spec.tune.cpus_per_trial: {spec.cpus_per_trial:g} CPUs per trial but the Ray cluster has {cpus:g}"
        )
    gpus = cluster.get("GPU", 0.0)
    if spec.gpus_per_trial > gpus:
        raise StageError(
            STAGE, f"spec.tune.gpus_per_trial: {spec.gpus_per_trial:g} GPUs per trial but the Ray cluster has {gpus:g}"
        )


def _finished_trials(experiment_dir: Path) -> int:
    analysis = tune.ExperimentAnalysis(str(experiment_dir))
    return sum(1 for trial in analysis.trials if trial.status == "TERMINATED")


def _outcomes(grid: Any, spec: TuneSpec, max_step: int, records: Mapping[str, Mapping[str, Any]]) -> list[TrialOutcome]:
    outcomes = []
    for result in grid:
        metrics = dict(result.metrics or {})
        trial_id = str(metrics["trial_id"])
        record = records.get(trial_id, {})
        config = result.config or {}
        params = {
            path: search.typed_value(dim, config[path]) for path, dim in spec.search_space.items() if path in config
        }
        step = metrics.get(search.TIME_ATTR)
        last_step = int(step) if isinstance(step, int | float) else -1
        if result.error is not None:
            state = "failed"
        elif last_step >= max_step:
            state = "completed"
        else:
            state = "early_stopped"
        ended = record.get("ended_at") or metrics.get("timestamp") or time.time()
        outcomes.append(TrialOutcome(
            trial_id=trial_id,
            params=params,
            state=state,
            last_step=max(last_step, 0),
            metrics={m: float(metrics[m]) if finite(metrics.get(m)) else math.nan for m in spec.metrics},
            ended_at=float(ended),
            error=error_line(result.error) if result.error is not None else None,
            extra={"mlflow_run_id": record.get("run_id")},
        ))
    return sorted(outcomes, key=lambda o: (o.ended_at, o.trial_id))


def _write_csv(path: Path, outcomes: list[TrialOutcome], spec: TuneSpec) -> None:
    paths = list(spec.search_space)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial_id", "state", "last_step", *paths, *spec.metrics, "mlflow_run_id", "error"])
        for o in outcomes:
            writer.writerow([
                o.trial_id, o.state, o.last_step, *(o.params.get(p) for p in paths),
                *(o.metrics[m] for m in spec.metrics), o.extra.get("mlflow_run_id") or "", o.error or "",
            ])


def _storage_url(spec: TuneSpec) -> str | None:
    """The study's storage URL: `storage`, or the variable `storage_env` names (from a Secret on a cluster)."""
    if spec.storage_env is None:
        return spec.storage
    url = os.environ.get(spec.storage_env)
    if not url:
        raise StageError(STAGE, f"spec.tune.storage_env: the environment variable {spec.storage_env} is not set "
                                "(on Kubernetes: a key of a Secret named in spec.cluster.env_secrets)")
    return url


def _importances(storage: Any, study_name: str) -> dict[str, float]:
    """Parameter importances from the persisted study; raises (with the reason) when there are too few trials."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        raise ValueError(f"{len(complete)} complete trial(s) in the study, at least 2 are needed")
    # No target: Optuna's default evaluator (PED-ANOVA) follows the study's directions itself, and with
    # several objectives it scores what puts a trial in the top (non-dominated) region.
    return dict(optuna.importance.get_param_importances(study))


def run(spec: TuneSpec, ctx: StageContext) -> TuneResult:
    import ray

    target = ctx.pipeline.section(spec.target)
    if target is None:
        raise StageError(STAGE, f"spec.tune.target: the manifest has no {spec.target} section to search over")
    max_step = search.trial_budget(spec, target.train.max_steps)
    grace = spec.asha_settings.grace_period
    if spec.scheduler == "asha" and max_step <= grace:
        raise StageError(
            STAGE,
            f"spec.tune.asha.grace_period: ({grace}) must be below the trials' {max_step} steps "
            f"(spec.{spec.target}.train.max_steps, or set tune.max_steps), or ASHA can never stop a trial",
        )
    section = _trial_section(spec, target, max_step)
    # Built once here, though every trial builds its own: input errors surface now rather than as failed
    # trials, and what the target writes once (a fine-tuning task's splits) exists before trials read it.
    _loop_config(spec.target, section, ctx)
    base = {
        "target": spec.target,
        "section": section.model_dump(mode="json"),
        "paths": list(spec.search_space),
        "context": _trial_context(ctx),
    }

    if not ray.is_initialized():
        ray.init()  # the executors start or join Ray; a direct call of the stage gets a local runtime
    _check_resources(spec, ray.cluster_resources())
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", EXPERIMENT_STATE_PERIOD_S)

    out_dir = ctx.out_dir.resolve()
    storage_dir = out_dir / "ray"
    experiment_dir = storage_dir / RUN_NAME
    study_name = f"{ctx.pipeline_name}-tune"
    storage_url = _storage_url(spec)
    study_storage = search.make_storage(storage_url, out_dir)
    storage_label = redact_url(storage_url) if storage_url else str(search.journal_path(out_dir))
    ctx.tracker.log_params({
        **spec.model_dump(mode="json", exclude={"storage"}), "study_storage": storage_label, "study_name": study_name,
    })

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base), {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial}
    )
    recorder = TrialRecorder(str(out_dir), spec.metrics, spec.modes, list(spec.search_space), max_step)
    if tune.Tuner.can_restore(str(experiment_dir)):
        kept = _finished_trials(experiment_dir)
        ctx.reporter.log(f"tune: resuming the search: {kept} finished trials kept")
        tuner = tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search.param_space(spec.search_space),
            tune_config=tune.TuneConfig(
                num_samples=spec.num_samples,
                search_alg=search.make_searcher(spec, study_storage, study_name, max_step),
                scheduler=search.make_scheduler(spec, max_step),
                # A fresh actor per trial would import torch and transformers again (seconds on a small
                # CPU); a finished trial's actor takes the next trial instead.
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=RUN_NAME,
                storage_path=str(storage_dir),
                callbacks=[recorder],
                # Tune keeps every checkpoint; the recorder deletes those a restore can no longer use
                # (kubeforge.tune.checkpoints says why Tune's own num_to_keep is not safe).
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                verbose=0,
            ),
        )

    try:
        with ctx.reporter.task(f"{STAGE}: trials", total=spec.num_samples) as task:
            LIVE[str(out_dir)] = Live(ctx.tracker, ctx.reporter, task, ctx.pipeline_name)
            grid = tuner.fit()
    finally:
        LIVE.pop(str(out_dir), None)
    checkpoints.prune(experiment_dir)  # the final state is saved: each trial keeps its last checkpoint
    records = json.loads((out_dir / TRIALS_FILE).read_text()) if (out_dir / TRIALS_FILE).is_file() else {}
    outcomes = _outcomes(grid, spec, max_step, records)
    return _summarise(spec, ctx, outcomes, study_storage, study_name, storage_label, max_step)


def _summarise(
    spec: TuneSpec,
    ctx: StageContext,
    outcomes: list[TrialOutcome],
    study_storage: Any,
    study_name: str,
    storage_label: str,
    max_step: int,
) -> TuneResult:
    metric, mode = spec.metrics[0], spec.modes[0]
    failed = [o for o in outcomes if o.state == "failed"]
    for o in failed:
        # Tune writes a trial's error file after the error callbacks ran; the results hold it for sure.
        if o.error and o.extra.get("mlflow_run_id"):
            ctx.tracker.client.set_tag(o.extra["mlflow_run_id"], f"{TAG_PREFIX}error", o.error[:5000])
    if outcomes and len(failed) == len(outcomes):
        first = min(failed, key=lambda o: o.ended_at)
        raise StageError(STAGE, f"every trial failed; trial {first.trial_id}: {first.error}")
    for o in failed:
        ctx.reporter.log(f"tune: trial {o.trial_id} failed: {o.error}")
    completed = [o for o in outcomes if o.state == "completed"]
    early = [o for o in outcomes if o.state == "early_stopped"]
    # The best is a trial that ran its full length; a value from an early stop is from fewer steps.
    pool = completed or early
    best_at = search.best_index([o.metrics[metric] for o in pool], mode)
    if best_at is None:
        raise StageError(STAGE, f"no trial reported a finite {metric}")
    best = pool[best_at]
    if not completed:
        ctx.reporter.log(f"tune: no trial ran its full {max_step} steps; the best is an early-stopped one")

    pareto_front = None
    if len(spec.metrics) > 1:
        front = search.pareto_front([[o.metrics[m] for m in spec.metrics] for o in completed], spec.modes)
        pareto_front = [
            {"trial": completed[i].trial_id, "config": completed[i].params, "metrics": completed[i].metrics}
            for i in front
        ]
    total_steps = sum(o.last_step for o in outcomes)

    out_dir = ctx.out_dir
    plots_dir = out_dir / PLOTS_DIR
    plots = []
    history = [
        HistoryPoint(o.trial_id, o.metrics[metric], o.state == "completed")
        for o in outcomes
        if o.state != "failed" and math.isfinite(o.metrics[metric])
    ]
    optimization_history(history, metric, mode, plots_dir / "optimization_history.png")
    plots.append(f"{PLOTS_DIR}/optimization_history.png")
    importances: dict[str, float] | None = None
    try:
        importances = _importances(study_storage, study_name)
    except Exception as exc:  # any reason (too few trials, a constant objective) only costs the plot
        ctx.reporter.log(f"tune: no parameter-importance plot: {exc}")
    else:
        objective = metric if len(spec.metrics) == 1 else f"the Pareto front of {', '.join(spec.metrics)}"
        param_importances(importances, objective, plots_dir / "param_importances.png")
        plots.append(f"{PLOTS_DIR}/param_importances.png")
    _write_csv(out_dir / CSV_FILE, outcomes, spec)
    result = TuneResult(
        best_config=dict(best.params),
        best_metrics=dict(best.metrics),
        best_trial=best.trial_id,
        metric=spec.metric,
        mode=spec.mode if isinstance(spec.mode, str) else [str(m) for m in spec.mode],
        num_trials=len(outcomes),
        completed_trials=len(completed),
        early_stopped_trials=len(early),
        failed_trials=len(failed),
        total_trial_steps=total_steps,
        study_storage=storage_label,
        plots=plots,
        pareto_front=pareto_front,
        param_importances=importances,
    )

    tracker = ctx.tracker
    tracker.log_metrics(
        {
            **{f"best_{m}": v for m, v in best.metrics.items()},
            "trials_completed": len(completed),
            "trials_early_stopped": len(early),
            "trials_failed": len(failed),
            "total_trial_steps": total_steps,
        },
        step=max_step,
    )
    tracker.set_tags({f"{TAG_PREFIX}best_trial": best.trial_id})
    tracker.log_dict(result.best_config, "best_config.json")
    tracker.log_artifact(plots_dir, PLOTS_DIR)
    tracker.log_artifact(out_dir / CSV_FILE)
    prom.TUNE_BEST_METRIC.labels(ctx.pipeline_name, metric).set(best.metrics[metric])
    for state, count in (("completed", len(completed)), ("early_stopped", len(early)), ("failed", len(failed)),
                         ("running", 0)):
        prom.TUNE_TRIALS.labels(ctx.pipeline_name, state).set(count)
    ctx.reporter.log(
        f"tune: best trial {best.trial_id} {metric}={best.metrics[metric]:.4g} with {result.best_config} "
        f"({len(completed)} completed, {len(early)} stopped early, {len(failed)} failed)"
    )
    return result
