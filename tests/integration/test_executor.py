"""The local executor: cached stages are skipped, failed stages resume, bad input leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kubeforge.errors import StageError
from kubeforge.executor import RunOptions, run_pipeline
from kubeforge.progress import LineReporter
from kubeforge.spec.load import parse_manifest
from kubeforge.workdir import Workdir
from tests.helpers import small_manifest

pytestmark = pytest.mark.integration


def options(tmp_path: Path) -> RunOptions:
    return RunOptions(workdir=Workdir(tmp_path / "work"), base_dir=tmp_path, manifest="test.yaml")


def stage_dirs(tmp_path: Path, pipeline: str) -> list[str]:
    root = tmp_path / "work" / "pipelines" / pipeline / "stages"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_rerun_skips_the_finished_stage_and_a_change_reruns_it(ray_local, tmp_path: Path) -> None:
    doc = small_manifest("cache")
    doc["metadata"].update(namespace="ml", labels={"team": "nlp"}, annotations={"owner": "alice@example.com"})
    pipeline = parse_manifest(doc)
    first = run_pipeline(pipeline, options(tmp_path), LineReporter())
    data = first.stage("data")
    assert (first.state, data.state) == ("succeeded", "succeeded")

    client = MlflowClient(first.tracking_uri)
    run = client.get_run(data.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["kubeforge.stage"] == "data"
    assert run.data.tags["kubeforge.stage_key"] == data.key
    assert len(run.data.tags["kubeforge.dataset_hash"]) >= 16
    assert run.data.tags["kubeforge.code_version"].startswith("0.1.0")
    assert run.inputs.dataset_inputs, "the corpus is logged as an MLflow dataset"
    assert run.data.tags["kubeforge.namespace"] == "ml"
    assert run.data.tags["kubeforge.label.team"] == "nlp"
    assert run.data.tags["kubeforge.annotation.owner"] == "alice@example.com"
    assert client.get_experiment(run.info.experiment_id).name == "cache"

    second = run_pipeline(pipeline, options(tmp_path), LineReporter())
    assert second.stage("data").state == "skipped"
    assert second.stage("data").mlflow_run_id == data.mlflow_run_id
    assert stage_dirs(tmp_path, "cache") == [f"data-{data.key}"]

    changed = parse_manifest(small_manifest("cache", tokenizer={"vocab_size": 600}))
    third = run_pipeline(changed, options(tmp_path), LineReporter())
    assert third.stage("data").state == "succeeded"
    assert third.stage("data").key != data.key
    assert len(stage_dirs(tmp_path, "cache")) == 2


def test_an_emptying_filter_fails_cleanly(ray_local, tmp_path: Path) -> None:
    pipeline = parse_manifest(small_manifest("empty", quality={"min_chars": 10_000_000, "max_chars": None}))
    with pytest.raises(StageError, match="quality"):
        run_pipeline(pipeline, options(tmp_path), LineReporter())
    assert stage_dirs(tmp_path, "empty") == []  # no finished and no .partial folder
    (record,) = Workdir(tmp_path / "work").runs("empty")
    assert record.state == "failed"
    assert record.stage("data").state == "failed"
    assert "quality" in (record.stage("data").error or "")
    assert MlflowClient(record.tracking_uri).get_run(record.stage("data").mlflow_run_id).info.status == "FAILED"


@pytest.mark.parametrize(
    "failure",
    [RuntimeError("worker node lost"), StageError("data", "worker node lost", resumable=True)],
    ids=["crash", "resumable-stage-error"],
)
def test_a_failed_stage_resumes_in_its_folder_and_mlflow_run(
    ray_local, tmp_path: Path, monkeypatch, failure: Exception
) -> None:
    import kubeforge.data.stage as data_stage

    real_run = data_stage.run
    seen: list[bool] = []

    def crash_once(spec, ctx):
        marker = ctx.out_dir / "left-by-first-attempt"
        seen.append(marker.exists())
        if not marker.exists():
            marker.write_text("x")
            raise failure
        return real_run(spec, ctx)

    monkeypatch.setattr(data_stage, "run", crash_once)
    pipeline = parse_manifest(small_manifest("resume"))
    with pytest.raises(type(failure), match="worker node lost"):
        run_pipeline(pipeline, options(tmp_path), LineReporter())
    (partial,) = stage_dirs(tmp_path, "resume")
    assert partial.endswith(".partial")
    crashed = Workdir(tmp_path / "work").runs("resume")[0]

    resumed = run_pipeline(pipeline, options(tmp_path), LineReporter())
    assert seen == [False, True]
    assert resumed.stage("data").state == "succeeded"
    assert resumed.stage("data").mlflow_run_id == crashed.stage("data").mlflow_run_id
    assert not any(name.endswith(".partial") for name in stage_dirs(tmp_path, "resume"))
