"""Content-addressed stage folders and run records."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kubeforge.workdir import StageRecord, Workdir, stage_key

pytestmark = pytest.mark.unit


def test_stage_key_changes_with_spec_inputs_and_extra_only() -> None:
    base = stage_key("pretrain", {"lr": 0.1}, {"data": "abc"}, None)
    assert base == stage_key("pretrain", {"lr": 0.1}, {"data": "abc"}, None)
    assert base != stage_key("pretrain", {"lr": 0.2}, {"data": "abc"}, None)
    assert base != stage_key("pretrain", {"lr": 0.1}, {"data": "abd"}, None)
    assert base != stage_key("pretrain", {"lr": 0.1}, {"data": "abc"}, "files-changed")
    assert base != stage_key("data", {"lr": 0.1}, {"data": "abc"}, None)


def test_stage_becomes_visible_only_when_finished(tmp_path: Path) -> None:
    workdir = Workdir(tmp_path)
    partial = workdir.begin_stage("p", "data", "k1")
    (partial / "shard.npy").write_text("x")
    assert workdir.finished_result("p", "data", "k1") is None
    final = workdir.finish_stage("p", "data", "k1", {"rows": 3})
    assert not partial.exists()
    assert (final / "shard.npy").read_text() == "x"
    assert workdir.finished_result("p", "data", "k1") == {"rows": 3}


def test_interrupted_stage_keeps_its_partial_folder_for_resume(tmp_path: Path) -> None:
    workdir = Workdir(tmp_path)
    partial = workdir.begin_stage("p", "pretrain", "k")
    (partial / "checkpoint").mkdir()
    assert workdir.begin_stage("p", "pretrain", "k") == partial
    assert (partial / "checkpoint").is_dir()
    workdir.discard_stage("p", "pretrain", "k")
    assert not partial.exists()


def test_run_records_round_trip_and_detect_a_dead_process(tmp_path: Path) -> None:
    workdir = Workdir(tmp_path)
    record = workdir.new_run("p", "m.yaml", "sqlite:///x")
    record.stages = [StageRecord(name="data", key="k", state="succeeded", mlflow_run_id="r1")]
    workdir.save_run(record)
    (loaded,) = workdir.runs("p")
    assert loaded.stages[0].mlflow_run_id == "r1"
    assert loaded.effective_state() == "running"  # this very process wrote it and is alive

    # A pid that cannot exist: the run was killed without recording an end.
    loaded.pid = 2**22 + 12345
    assert loaded.effective_state() == "interrupted"
    assert os.getpid() != loaded.pid
