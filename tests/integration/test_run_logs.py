"""`kubeforge run` without --verbose: the terminal shows our lines only, Ray's output goes to each stage's
log file (and its MLflow run), and a failed stage's error comes with the end of its log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from kubeforge import logs
from kubeforge.workdir import Workdir
from tests.helpers import TINY_PRETRAIN, small_manifest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

# `kubeforge run`, with a pretraining stage that trains for real (two Ray Train workers) and then fails,
# as a stage does when something breaks after its workers have had their say.
KUBEFORGE_RUN_FAILING_AFTER_PRETRAIN = """
import kubeforge.pretrain.stage as pretrain
from kubeforge.cli import main

real_run = pretrain.run


def run_then_fail(spec, ctx):
    real_run(spec, ctx)
    raise RuntimeError("the test broke the stage after it trained")


pretrain.run = run_then_fail
main()
"""
# What Ray and its workers print; none of it may reach the terminal.
RAY_MARKERS = ("pid=", "RayTrainWorker", "TrainController", "PlacementGroupCleaner", "core_worker",
               "streaming_executor", "Dataset", "INFO", "WARNING")


def test_run_keeps_ray_output_in_stage_logs_and_prints_a_failed_stages_tail(ray_local, tmp_path: Path) -> None:
    manifest = tmp_path / "pipeline.yaml"
    manifest.write_text(yaml.safe_dump(small_manifest("quiet", pretrain=TINY_PRETRAIN)))
    workdir = Workdir(tmp_path / "work")
    # Joining the session's Ray runtime saves starting one; the workers' output still comes to this driver.
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.run(
        [sys.executable, "-c", KUBEFORGE_RUN_FAILING_AFTER_PRETRAIN, "run", str(manifest), "--workdir",
         str(workdir.root), "--no-metrics", "--ray-address", address],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    print(proc.stderr)
    assert proc.returncode == 1

    ours, tail_header, tail = proc.stderr.partition("Ray's output of stage pretrain, last ")
    assert tail_header, "the failed stage's log tail is printed"
    terminal = proc.stdout + ours
    assert [marker for marker in RAY_MARKERS if marker in terminal] == []
    assert "stage data: done" in ours
    assert ours.rstrip().endswith("error: RuntimeError: the test broke the stage after it trained")
    (run_log,) = workdir.logs.glob("run-quiet-*.log")
    assert f"Ray's output: {run_log}" in ours

    stages = workdir.pipeline_dir("quiet") / "stages"
    assert len(list(stages.glob("data-*/logs/ray.log"))) == 1, "the data stage keeps its own Ray log"
    (pretrain_log,) = stages.glob("pretrain-*.partial/logs/ray.log")
    pretrain_lines = pretrain_log.read_text()
    assert "(RayTrainWorker pid=" in pretrain_lines and "(TrainController pid=" in pretrain_lines
    assert "\x1b[" not in pretrain_lines, "one plain copy of each line: Ray's own printer (colours) is off"

    # The tail: its header names the file, its lines are the file's last ones, then the hint to rerun.
    header, *rest = tail.splitlines()
    assert header.endswith(f"(all of it in {pretrain_log}):")
    shown = [line.strip() for line in rest if line.startswith("  ")]
    assert 20 <= len(shown) <= 40
    assert any("RayTrainWorker pid=" in line for line in shown)
    assert shown[-1] == logs.tail(pretrain_log, 1)[0].strip(), "the tail ends where the file does"
    assert rest[-1].startswith("rerun to resume")

    (record,) = workdir.runs("quiet")
    client = MlflowClient(record.tracking_uri)
    for stage in record.stages:
        artifacts = [a.path for a in client.list_artifacts(stage.mlflow_run_id, "logs")]
        assert artifacts == ["logs/ray.log"], stage.name
