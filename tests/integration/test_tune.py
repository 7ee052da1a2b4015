"""The tune stage on local Ray: ASHA stops trials early, every trial is a nested MLflow run, the study
is persisted, a search killed mid-trial resumes without repeating finished trials, and a search whose
every trial fails says why.

Trials search over a tiny Llama (hidden 64, 2 layers) on the shared `tiny_lm` fixture's data.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from kubeforge.context import StageContext
from kubeforge.errors import StageError
from kubeforge.spec.load import parse_manifest
from kubeforge.tracking import Tracker
from kubeforge.tune import checkpoints
from tests.helpers import stop_process_group, wait_for
from tests.stage_fixtures import TinyLM

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# The section each trial starts from; the data fixture's sequences are 128 tokens long.
TRIAL_PRETRAIN: dict[str, Any] = {
    "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "max_position_embeddings": 256},
    "train": {"max_steps": 16, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2},
    "eval": {"every_steps": 4, "max_batches": 2},
    "resources": {"workers": 2},
}
LR_SPACE = {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 3e-2}}


def _manifest(tiny_lm: TinyLM, tune: dict[str, Any], pretrain: dict[str, Any] | None = None) -> dict[str, Any]:
    manifest = tiny_lm.pipeline.model_dump(mode="json", exclude_none=True)
    manifest["spec"]["pretrain"] = pretrain or TRIAL_PRETRAIN
    manifest["spec"]["tune"] = tune
    return manifest


def _context(tiny_lm: TinyLM, tune: dict[str, Any], name: str, **pretrain: Any) -> StageContext:
    ctx = tiny_lm.context("tune", tune, name)
    return dataclasses.replace(ctx, pipeline=parse_manifest(_manifest(tiny_lm, tune, {**TRIAL_PRETRAIN, **pretrain})))


def _child_runs(tiny_lm: TinyLM, parent: str) -> list[Any]:
    client = MlflowClient(tiny_lm.tracking_uri)
    experiment = client.get_run(parent).info.experiment_id
    return client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")


def _rows(out_dir: Path) -> list[dict[str, str]]:
    with (out_dir / "trials.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_asha_stops_trials_early_and_every_trial_is_a_nested_run(tiny_lm: TinyLM) -> None:
    import optuna

    from kubeforge.metrics import REGISTRY
    from kubeforge.spec.tune import Dimension
    from kubeforge.tune import search
    from kubeforge.tune.stage import run

    section = {
        "target": "pretrain",
        "search_space": {**LR_SPACE, "train.warmup_steps": {"type": "int", "low": 0, "high": 4}},
        "num_samples": 6, "max_concurrent": 2, "max_steps": 16, "seed": 3,
        "asha": {"grace_period": 4, "reduction_factor": 2},
    }
    ctx = _context(tiny_lm, section, "tune-asha")
    result = run(ctx.pipeline.spec.tune, ctx)  # type: ignore[arg-type]
    json.dumps(result.to_json())  # the executor stores it as JSON

    assert result.num_trials == 6 and result.failed_trials == 0
    assert result.early_stopped_trials >= 1, result
    assert result.completed_trials >= 1
    assert result.completed_trials + result.early_stopped_trials == 6
    rows = _rows(ctx.out_dir)
    assert {r["state"] for r in rows} == {"completed", "early_stopped"}
    assert all(int(r["last_step"]) < 16 for r in rows if r["state"] == "early_stopped")
    assert result.total_trial_steps == sum(int(r["last_step"]) for r in rows) < 6 * 16

    # The best configuration: exactly the searched paths, inside the space, and the best full-length trial.
    best = result.best_config
    assert set(best) == {"train.lr", "train.warmup_steps"}
    for path, value in best.items():
        assert search.in_space(Dimension.model_validate(section["search_space"][path]), value), (path, value)
    completed = [r for r in rows if r["state"] == "completed"]
    assert result.best_metrics["val_loss"] == min(float(r["val_loss"]) for r in completed)
    assert result.best_trial in {r["trial_id"] for r in completed}

    # One nested MLflow run per trial; ASHA's stops are KILLED and tagged, the others FINISHED.
    children = _child_runs(tiny_lm, ctx.tracker.run_id)
    assert len(children) == 6
    by_trial = {run.data.tags["kubeforge.trial_id"]: run for run in children}
    assert set(by_trial) == {r["trial_id"] for r in rows}
    client = MlflowClient(tiny_lm.tracking_uri)
    for row in rows:
        child = by_trial[row["trial_id"]]
        assert child.info.run_name == f"trial-{row['trial_id']}"
        early = row["state"] == "early_stopped"
        assert child.info.status == ("KILLED" if early else "FINISHED")
        assert child.data.tags["kubeforge.early_stopped"] == str(early).lower()
        assert float(child.data.params["train.lr"]) == pytest.approx(float(row["train.lr"]))
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")]
        assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == int(row["last_step"])
    stage_metrics = client.get_run(ctx.tracker.run_id).data.metrics
    assert stage_metrics["trials_early_stopped"] == result.early_stopped_trials
    assert stage_metrics["total_trial_steps"] == result.total_trial_steps

    # The study persisted in the journal: ASHA's stops are pruned trials there.
    journal = ctx.out_dir / "optuna.journal"
    assert result.study_storage == str(journal.resolve())
    study = optuna.load_study(study_name="tinylm-tune", storage=search.make_storage(None, ctx.out_dir.resolve()))
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.PRUNED) == result.early_stopped_trials
    assert states.count(optuna.trial.TrialState.COMPLETE) == result.completed_trials

    assert "plots/optimization_history.png" in result.plots
    for plot in result.plots:
        assert (ctx.out_dir / plot).stat().st_size > 1000
    assert REGISTRY.get_sample_value(
        "kubeforge_tune_trials", {"pipeline": "tinylm", "state": "early_stopped"}
    ) == result.early_stopped_trials
    assert REGISTRY.get_sample_value(
        "kubeforge_tune_best_metric", {"pipeline": "tinylm", "metric": "val_loss"}
    ) == pytest.approx(result.best_metrics["val_loss"])


CHILD = """
import json, sys
from pathlib import Path
import ray
from kubeforge.context import StageContext, StageOutput
from kubeforge.progress import LineReporter
from kubeforge.spec.load import parse_manifest
from kubeforge.stages.data import DataResult
from kubeforge.tracking import Tracker
from kubeforge.tune.stage import run

args = json.loads(Path(sys.argv[1]).read_text())
# The hold reaches the trials through the job's runtime environment (they run in this job's workers).
ray.init(address=args["address"], logging_level="WARNING", runtime_env={"env_vars": args["env"]})
pipeline = parse_manifest(args["manifest"])
data = StageOutput("data", "fixture", Path(args["data_dir"]), DataResult.from_json(args["data_result"]), None)
ctx = StageContext(pipeline=pipeline, stage="tune", out_dir=Path(args["out_dir"]), base_dir=Path(args["out_dir"]),
                   tracker=Tracker(args["uri"], args["run_id"]), reporter=LineReporter(), inputs={"data": data})
run(pipeline.spec.tune, ctx)
"""


def _history(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / "history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _trial_dir(out_dir: Path, trial_id: str) -> Path:
    (found,) = (out_dir / "ray" / "tune").glob(f"run_trial_{trial_id}_*")
    return found


def test_a_killed_search_resumes_without_repeating_finished_trials(
    tiny_lm: TinyLM, ray_local: Any, tmp_path: Path
) -> None:
    """The driver is SIGKILLed while the second of two trials runs; the rerun keeps the first trial and
    continues the second from its last checkpoint.

    Every trial holds after its checkpoint of step 8 (`kubeforge.faults`) until the test releases
    it: the test lets the first trial go on, and kills the search while the second is held once Tune's
    saved state holds that checkpoint, so no machine is too fast or too slow for the moment to come."""
    from kubeforge.faults import HOLD_ENV
    from kubeforge.tune.stage import run

    steps, hold = 16, 8  # evaluations (and checkpoints) every 4 steps: the checkpoint of step 8 is the second
    section = {
        "target": "pretrain", "search_space": LR_SPACE, "num_samples": 2, "max_concurrent": 1, "max_steps": steps,
        "scheduler": "none", "seed": 5,
    }
    ctx = _context(tiny_lm, section, "tune-killed")
    out_dir = ctx.out_dir
    experiment = out_dir / "ray" / "tune"
    holds = tmp_path / "holds"
    holds.mkdir()
    args = {
        "address": ray_local.get_runtime_context().gcs_address, "manifest": _manifest(tiny_lm, section),
        "data_dir": str(tiny_lm.data.directory), "data_result": tiny_lm.data.result.to_json(), "out_dir": str(out_dir),
        "uri": tiny_lm.tracking_uri, "run_id": ctx.tracker.run_id, "env": {HOLD_ENV: f"{hold}:{holds}"},
    }
    args_file = tmp_path / "tune-killed-args.json"
    args_file.write_text(json.dumps(args))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(args_file)], cwd=REPO, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )

    def running(what: str) -> None:
        assert child.poll() is None, f"the search ended before {what}: {child.stderr.read()[-3000:]}"  # type: ignore[union-attr]

    def held(n: int) -> bool:
        running(f"a trial held at step {hold}")
        return (holds / f"held-{n}").exists()

    def second_checkpoint_saved() -> bool:
        running("Tune saved the held trial's checkpoint")
        points = checkpoints.restore_points(experiment) or {}
        second = next(t for t in dict.fromkeys(h["trial_id"] for h in _history(out_dir)) if t != first)
        return points.get(_trial_dir(out_dir, second).name, "") >= "checkpoint_000001"

    try:
        wait_for(lambda: held(0), "the first trial's hold")
        (first,) = dict.fromkeys(h["trial_id"] for h in _history(out_dir))
        (holds / "release-0").touch()
        wait_for(lambda: held(1), "the second trial's hold")
        wait_for(second_checkpoint_saved, "Tune's saved state holding the second trial's checkpoint of step 8")
    finally:
        stop_process_group(child)
    trials = list(dict.fromkeys(h["trial_id"] for h in _history(out_dir)))
    assert trials[0] == first and len(trials) == 2
    second = trials[1]
    before = json.loads((out_dir / "trials.json").read_text())
    assert before[first]["state"] == "completed" and before[second]["state"] == "running"
    assert max(h["step"] for h in _history(out_dir) if h["trial_id"] == second) == hold
    first_results = (_trial_dir(out_dir, first) / "result.json").read_text()
    # The checkpoint the saved state resumes the second trial from is still there after the kill.
    points = checkpoints.restore_points(experiment) or {}
    second_dir = _trial_dir(out_dir, second)
    assert (second_dir / points[second_dir.name]).is_dir()

    # The executor's rerun: the same folder and the same MLflow run (and no hold: this job has no such setting).
    resumed = dataclasses.replace(ctx, tracker=Tracker(tiny_lm.tracking_uri, ctx.tracker.run_id))
    result = run(resumed.pipeline.spec.tune, resumed)  # type: ignore[arg-type]
    assert "tune: resuming the search: 1 finished trials kept" in resumed.reporter.lines  # type: ignore[attr-defined]

    assert result.num_trials == 2 and result.completed_trials == 2
    assert (_trial_dir(out_dir, first) / "result.json").read_text() == first_results, "the finished trial ran again"
    last = json.loads((_trial_dir(out_dir, second) / "result.json").read_text().splitlines()[-1])
    assert last["step"] == steps
    assert last["resumed_from_step"] == hold, "the interrupted trial did not continue from its checkpoint"
    # Still one nested run per trial, both finished; the interrupted trial's run was continued.
    children = _child_runs(tiny_lm, ctx.tracker.run_id)
    assert sorted(run.data.tags["kubeforge.trial_id"] for run in children) == sorted([first, second])
    assert {run.info.status for run in children} == {"FINISHED"}
    second_run = next(run for run in children if run.data.tags["kubeforge.trial_id"] == second)
    assert second_run.info.run_id == before[second]["run_id"]
    assert result.total_trial_steps == 2 * steps
    # Old checkpoints are gone once the search has ended: each trial keeps the one it ended on.
    points = checkpoints.restore_points(experiment) or {}
    for trial_id in (first, second):
        trial_dir = _trial_dir(out_dir, trial_id)
        assert [p.name for p in trial_dir.glob("checkpoint_*")] == [points[trial_dir.name]]


def test_every_trial_failing_is_a_stage_error_with_the_first_trials_error(tiny_lm: TinyLM) -> None:
    from kubeforge.tune.stage import run

    # Valid as a section, but shorter than the data stage's 128-token sequences: each trial's loop config fails.
    section = {
        "target": "pretrain", "num_samples": 2, "max_concurrent": 2, "max_steps": 8, "scheduler": "none",
        "search_space": {"model.max_position_embeddings": {"type": "choice", "values": [64, 96]}},
    }
    ctx = _context(tiny_lm, section, "tune-failing")
    with pytest.raises(StageError, match=r"stage tune: every trial failed; trial \w+: .*max_position_embeddings"):
        run(ctx.pipeline.spec.tune, ctx)  # type: ignore[arg-type]
    children = _child_runs(tiny_lm, ctx.tracker.run_id)
    assert len(children) == 2 and {run.info.status for run in children} == {"FAILED"}
    assert all("max_position_embeddings" in run.data.tags["kubeforge.error"] for run in children)


def test_a_search_space_value_the_target_rejects_fails_before_any_trial(tiny_lm: TinyLM) -> None:
    from kubeforge.tune.stage import run

    section = {
        "target": "pretrain", "num_samples": 2, "max_steps": 8, "scheduler": "none",
        "search_space": {"model.num_heads": {"type": "choice", "values": [2, 3]}},
    }
    ctx = _context(tiny_lm, section, "tune-rejected")
    with pytest.raises(StageError, match=r"spec\.tune\.search_space\.model\.num_heads: the value 3 makes spec\.pretrain "
                                         r"invalid: .*hidden_size must be divisible by num_heads"):
        run(ctx.pipeline.spec.tune, ctx)  # type: ignore[arg-type]
    assert not (ctx.out_dir / "ray").exists()


def test_a_search_over_lora_fine_tuning(tiny_lm: TinyLM) -> None:
    """Target finetune: each trial runs the fine-tuning loop (LoRA on the fixture's pretrained model)."""
    from kubeforge.tune.stage import run

    finetune = {
        "task": {"builtin": "python-docstrings", "max_examples": 120},
        "max_length": 128, "method": "lora", "replay_fraction": 0,
        "train": {"max_steps": 8, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2},
        "eval": {"every_steps": 4, "max_batches": 2},
        "resources": {"workers": 2},
    }
    section = {
        "target": "finetune", "num_samples": 2, "max_concurrent": 2, "scheduler": "none",
        "search_space": {**LR_SPACE, "lora.rank": {"type": "choice", "values": [4, 8]}},
    }
    manifest = tiny_lm.pipeline.model_dump(mode="json", exclude_none=True)
    manifest["spec"] |= {"finetune": finetune, "tune": section}
    ctx = dataclasses.replace(tiny_lm.context("tune", None, "tune-finetune"), pipeline=parse_manifest(manifest))
    result = run(ctx.pipeline.spec.tune, ctx)  # type: ignore[arg-type]

    assert result.completed_trials == 2 and result.failed_trials == 0
    assert result.total_trial_steps == 2 * 8
    assert set(result.best_config) == {"train.lr", "lora.rank"}
    assert result.best_config["lora.rank"] in (4, 8)
    assert (ctx.out_dir / "task" / "task.json").is_file()  # written once by the driver, read by the trials
    assert len(_child_runs(tiny_lm, ctx.tracker.run_id)) == 2


def test_pruning_keeps_the_checkpoint_a_restore_resumes_from_and_everything_newer(
    tmp_path: Path, ray_local: Any
) -> None:
    """The saved state lags the trial; checkpoints written after it (here 5 and 6) must survive."""
    import tempfile

    from ray import tune

    def _five_checkpoints(config: dict[str, Any]) -> None:  # nested: Ray pickles it by value
        for step in range(5):
            with tempfile.TemporaryDirectory() as folder:
                (Path(folder) / "step").write_text(str(step))
                tune.report({"step": step}, checkpoint=tune.Checkpoint.from_directory(folder))

    tuner = tune.Tuner(
        _five_checkpoints,
        run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path), verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=None)),
    )
    tuner.fit()
    experiment = tmp_path / "exp"
    (trial_dir,) = [p for p in experiment.iterdir() if p.is_dir() and p.name.startswith("_five_checkpoints")]
    assert checkpoints.restore_points(experiment) == {trial_dir.name: "checkpoint_000004"}
    for later in ("checkpoint_000005", "checkpoint_000006"):
        (trial_dir / later).mkdir()

    deleted = checkpoints.prune(experiment)

    assert sorted(p.name for p in deleted) == [f"checkpoint_00000{i}" for i in range(4)]
    assert sorted(p.name for p in trial_dir.glob("checkpoint_*")) == [f"checkpoint_00000{i}" for i in (4, 5, 6)]
    assert (trial_dir / "checkpoint_000004" / "step").read_text() == "4"


def test_pruning_deletes_nothing_while_the_saved_state_cannot_be_read(tmp_path: Path) -> None:
    trial_dir = tmp_path / "trial_1"
    (trial_dir / "checkpoint_000000").mkdir(parents=True)
    (tmp_path / "experiment_state-2026-11-22_10-00-00.json").write_text('{"trial_data": [["{}", "{\\"chec')

    assert checkpoints.restore_points(tmp_path) is None
    assert checkpoints.prune(tmp_path) == []
    assert (trial_dir / "checkpoint_000000").is_dir()
