"""The tune stage's driver-side view of its trials: a Tune callback that keeps, for every trial, one
nested MLflow run, its record in `trials.json`, its evaluations in `history.jsonl`, the Prometheus
gauges and the progress bar. Only the driver writes to MLflow; trial processes never do.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from kubeforge import metrics as prom
from kubeforge.context import ProgressTask, Reporter
from kubeforge.stages.tune import TUNE
from kubeforge.tracking import TAG_PREFIX, Tracker
from kubeforge.tune import checkpoints, search

STAGE = TUNE.name
TRIALS_FILE = "trials.json"
HISTORY_FILE = "history.jsonl"
# Metrics the loops report that are worth a place in each trial's MLflow run.
LOGGED_METRICS = ("val_loss", "val_perplexity", "reward_accuracy", "reward_margin", "train_loss")
TRIAL_STATES = ("running", "completed", "early_stopped", "failed")


@dataclass
class Live:
    """What the callback needs of the running stage and cannot carry through a pickle."""

    tracker: Tracker
    reporter: Reporter
    task: ProgressTask | None
    pipeline: str


# Tune pickles its callbacks into the experiment folder and `Tuner.restore` brings back those copies,
# not the objects of the new attempt; the callback therefore looks its live handles up here by folder.
LIVE: dict[str, Live] = {}


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)  # never a half-written file, whenever the process dies


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class TrialRecorder(tune.Callback):
    """Follows every trial on the driver: one nested MLflow run each, gauges, the progress bar."""

    def __init__(self, out_dir: str, metrics: list[str], modes: list[str], paths: list[str], max_step: int) -> None:
        self.out_dir = out_dir
        self.metrics = metrics
        self.modes = modes
        self.paths = paths
        self.max_step = max_step
        self._trials: dict[str, dict[str, Any]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_trials": None}  # reloaded from trials.json, the file is the record

    # Bookkeeping ------------------------------------------------------------------------------------

    @property
    def live(self) -> Live:
        return LIVE[self.out_dir]

    @property
    def trials(self) -> dict[str, dict[str, Any]]:
        if self._trials is None:
            path = Path(self.out_dir) / TRIALS_FILE
            self._trials = json.loads(path.read_text()) if path.is_file() else {}
        return self._trials

    def _save(self) -> None:
        write_json(Path(self.out_dir) / TRIALS_FILE, self.trials)
        counts = {state: 0 for state in TRIAL_STATES}
        for record in self.trials.values():
            counts[record["state"]] += 1
        for state, count in counts.items():
            prom.TUNE_TRIALS.labels(self.live.pipeline, state).set(count)
        values = [
            r["metrics"].get(self.metrics[0], math.nan) for r in self.trials.values() if r["state"] == "completed"
        ]
        best = search.best_index(values, self.modes[0])
        if best is not None:
            prom.TUNE_BEST_METRIC.labels(self.live.pipeline, self.metrics[0]).set(values[best])
        if self.live.task is not None:
            done = sum(counts[s] for s in ("completed", "early_stopped", "failed"))
            self.live.task.update(done)

    def _record(self, trial: Any) -> dict[str, Any] | None:
        """The trial's record, creating its MLflow run on first sight; None once the trial has ended.

        A trial that ended in an earlier attempt and that Tune starts again (it finished in the moments
        before a kill, after Tune last saved its state) is not logged twice.
        """
        record = self.trials.get(trial.trial_id)
        if record is not None:
            if record["state"] in ("completed", "early_stopped"):
                return None
            if record["state"] == "failed":  # an errored trial that the restore resumes
                record["state"] = "running"
                self.live.tracker.client.update_run(record["run_id"], status="RUNNING")
                self._save()
            return record
        client = self.live.tracker.client
        parent = self.live.tracker.run_id
        experiment_id = client.get_run(parent).info.experiment_id
        params = {path: trial.config.get(path) for path in self.paths}
        run = client.create_run(
            experiment_id,
            run_name=f"trial-{trial.trial_id}",
            tags={
                "mlflow.parentRunId": parent,
                f"{TAG_PREFIX}pipeline": self.live.pipeline,
                f"{TAG_PREFIX}stage": STAGE,
                f"{TAG_PREFIX}trial_id": trial.trial_id,
            },
        )
        from mlflow.entities import Param

        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        record = {
            "run_id": run.info.run_id, "state": "running", "params": params, "last_step": -1, "metrics": {},
            "ended_at": None, "error": None,
        }
        self.trials[trial.trial_id] = record
        self._save()
        return record

    # Tune's hooks -------------------------------------------------------------------------------------

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if trial.trial_id in self.trials and self.trials[trial.trial_id]["state"] in ("completed", "early_stopped"):
            self.live.reporter.log(
                f"tune: trial {trial.trial_id} finished just before the interruption; Tune reopens it from its "
                "final checkpoint (no steps are repeated)"
            )
        self._record(trial)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
        record = self._record(trial)
        step = result.get(search.TIME_ATTR)
        if record is None or not isinstance(step, int) or step <= record["last_step"]:
            return  # a checkpoint report repeats its evaluation's step: log each evaluation once
        values = {k: float(result[k]) for k in LOGGED_METRICS if finite(result.get(k))}
        if self.metrics[0] not in values:
            return
        record["last_step"] = step
        record["metrics"] = values
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.live.tracker.client.log_batch(
            record["run_id"], metrics=[Metric(k, v, stamp, step) for k, v in values.items()]
        )
        with (Path(self.out_dir) / HISTORY_FILE).open("a") as history:
            history.write(json.dumps({"trial_id": trial.trial_id, "step": step, "time": time.time(), **values}) + "\n")
        self._save()

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        record = self._record(trial)
        if record is None:
            return
        # ASHA's stop and a loop that reached its last step both end here; the step tells them apart.
        early = record["last_step"] < self.max_step
        record["state"] = "early_stopped" if early else "completed"
        record["ended_at"] = time.time()
        client = self.live.tracker.client
        client.set_tag(record["run_id"], f"{TAG_PREFIX}early_stopped", str(early).lower())
        client.set_terminated(record["run_id"], status="KILLED" if early else "FINISHED")
        self._save()

    def on_checkpoint(self, iteration: int, trials: list[Any], trial: Any, checkpoint: Any, **info: Any) -> None:
        checkpoints.prune(Path(checkpoint.path).parent.parent)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        record = self._record(trial)
        if record is None:
            return
        record["state"] = "failed"
        record["ended_at"] = time.time()
        record["error"] = error_line(trial.get_error())
        client = self.live.tracker.client
        if record["error"]:
            client.set_tag(record["run_id"], f"{TAG_PREFIX}error", record["error"][:5000])
        client.set_terminated(record["run_id"], status="FAILED")
        self._save()


def error_line(error: Any) -> str | None:
    """The line of a trial's traceback that says what went wrong (its last non-empty line)."""
    if error is None:
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
