"""The CLI's contract: one line per problem, exit 2 for an invalid manifest."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kubeforge.cli import main
from kubeforge.workdir import StageRecord, Workdir

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_validate_accepts_the_quickstart() -> None:
    result = CliRunner().invoke(main, ["validate", str(EXAMPLES / "quickstart.yaml")])
    assert result.exit_code == 0, result.output
    assert "valid ModelPipeline 'quickstart' (stages: data, pretrain, finetune, evaluate, quantize, promote)" in result.output


def test_validate_prints_one_line_per_problem_and_exits_2(tmp_path: Path) -> None:
    doc = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    doc["spec"]["pretrain"]["train"]["lr"] = -0.1
    doc["spec"]["pretrain"]["train"]["batch_sise"] = 4
    path = write(tmp_path, doc)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert sorted(lines) == sorted(
        [
            f"error: {path}: spec.pretrain.train.lr: must be > 0 (got -0.1)",
            f"error: {path}: spec.pretrain.train.batch_sise: unknown field (did you mean 'batch_size'?)",
        ]
    )


def test_run_rejects_an_invalid_manifest_before_doing_anything(tmp_path: Path) -> None:
    doc = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    doc["spec"]["pretrain"]["train"]["max_steps"] = 0
    path = write(tmp_path, doc)
    workdir = tmp_path / "work"
    result = CliRunner().invoke(main, ["run", str(path), "--workdir", str(workdir), "--no-metrics"])
    assert result.exit_code == 2
    assert "spec.pretrain.train.max_steps: must be > 0 (got 0)" in result.output
    assert not workdir.exists()


def test_missing_manifest_file_is_named(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert f"{tmp_path / 'nope.yaml'}: cannot read manifest" in result.output


def test_status_lists_runs_with_stage_states_and_mlflow_ids(tmp_path: Path) -> None:
    workdir = Workdir(tmp_path)
    record = workdir.new_run("quickstart", "examples/quickstart.yaml", "sqlite:///db")
    record.state = "succeeded"
    record.stages = [
        StageRecord(name="data", key="aaaa", state="skipped", mlflow_run_id="run-data"),
        StageRecord(name="pretrain", key="bbbb", state="succeeded", mlflow_run_id="run-pretrain"),
    ]
    workdir.save_run(record)
    result = CliRunner().invoke(main, ["status", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"quickstart run {record.run_id}  succeeded" in result.output
    assert "run-data" in result.output and "run-pretrain" in result.output
    result = CliRunner().invoke(main, ["status", "--workdir", str(tmp_path), "-o", "json"])
    assert '"mlflow_run_id": "run-pretrain"' in result.output


def test_status_of_an_empty_workdir(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["status", "--workdir", str(tmp_path)])
    assert result.exit_code == 0
    assert "no runs" in result.output


def test_num_cpus_with_a_cluster_address_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["run", str(EXAMPLES / "quickstart.yaml"), "--workdir", str(tmp_path), "--no-metrics",
         "--num-cpus", "2", "--ray-address", "127.0.0.1:6379"],
    )
    assert result.exit_code == 1
    assert "--num-cpus sizes a local Ray runtime, but this run joins the cluster at 127.0.0.1:6379" in result.output
