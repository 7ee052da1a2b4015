"""A `kubeforge run` killed mid-pretraining resumes from its last checkpoint when run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import TINY_PRETRAIN, small_manifest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_killed_run_skips_finished_data_and_resumes_pretraining(tmp_path: Path) -> None:
    pretrain = {**TINY_PRETRAIN, "train": {**TINY_PRETRAIN["train"], "max_steps": 40}, "checkpoint": {"every_steps": 5}}
    manifest = tmp_path / "pipeline.yaml"
    manifest.write_text(yaml.safe_dump(small_manifest("killed", pretrain=pretrain)))
    workdir = tmp_path / "work"
    command = [str(Path(sys.executable).with_name("kubeforge")), "run", str(manifest), "--workdir", str(workdir),
               "--num-cpus", "2", "--no-metrics"]
    stages = workdir / "pipelines" / "killed" / "stages"

    # Its own process group, so the kill takes the local Ray runtime it started down with it,
    # as a node failure or an OOM-killed pod would.
    first = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    try:
        while not list(stages.glob("pretrain-*.partial/ray/**/checkpoint_*")):
            assert first.poll() is None, f"run ended before its first checkpoint: {first.stderr.read()[-3000:]}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no pretraining checkpoint within 10 minutes"
            time.sleep(0.5)
        time.sleep(1)  # let the checkpoint finish being written, as it would be in a real crash window
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()

    (killed,) = [json.loads(p.read_text()) for p in (workdir / "pipelines" / "killed" / "runs").glob("*.json")]
    assert killed["state"] == "running"  # it never got to record an end: status shows it as interrupted
    assert runs(command[0], workdir)[0]["state"] == "interrupted"

    second = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    (pretrain_dir,) = [p for p in stages.glob("pretrain-*") if not p.name.endswith(".partial")]
    result = json.loads((pretrain_dir / "result.json").read_text())
    assert result["resumed_from_step"] > 0
    assert result["final_step"] == 40
    latest = runs(command[0], workdir)[-1]
    assert [(s["name"], s["state"]) for s in latest["stages"]] == [("data", "skipped"), ("pretrain", "succeeded")]
    assert latest["stages"][1]["mlflow_run_id"] == killed["stages"][1]["mlflow_run_id"], "the MLflow run is resumed"


def runs(kubeforge: str, workdir: Path) -> list[dict]:
    """`kubeforge status -o json`: the recorded runs, oldest first."""
    status = subprocess.run([kubeforge, "status", "--workdir", str(workdir), "-o", "json"], capture_output=True, text=True)
    return json.loads(status.stdout)
