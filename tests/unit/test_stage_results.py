"""Typed stage results: what a stage returns is what the stages downstream read back from result.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubeforge.context import Registered, load_output, save_output
from kubeforge.errors import KubeForgeError
from kubeforge.stages.pretrain import PRETRAIN, PretrainResult
from kubeforge.workdir import RESULT_FILE, Workdir
from tests.unit.test_spec_promotion import evaluation

pytestmark = pytest.mark.unit

RESULT = PretrainResult(
    model_dir="model", objective="causal", final_step=30, initial_val_loss=8.3, initial_val_perplexity=4100.0,
    val_loss=4.9, val_perplexity=134.3, train_loss=5.0, tokens_per_second=1200.5, tokens_seen=30720,
    resumed_from_step=10, restored_from_steps=[10], num_parameters=467584, seq_len=128, workers=2,
)


def test_a_result_reads_back_as_it_was_written(tmp_path: Path) -> None:
    workdir = Workdir(tmp_path)
    workdir.begin_stage("demo", "pretrain", "k1")
    registered = Registered(model="demo", version="3", source="runs:/abc/model")
    saved = save_output(workdir, "demo", "pretrain", "k1", RESULT, registered, {"mlflow_run_id": "abc"})

    loaded = load_output(workdir, "demo", PRETRAIN, "k1")
    assert loaded is not None
    assert loaded.result == RESULT and type(loaded.result) is PretrainResult
    assert loaded.registered == registered and loaded.mlflow_run_id == "abc"
    assert loaded.directory == saved.directory == workdir.stage_dir("demo", "pretrain", "k1")
    # The file keeps the layout it always had: the result's fields at the top level.
    document = json.loads((saved.directory / RESULT_FILE).read_text())
    assert document["val_perplexity"] == 134.3 and document["registered"]["version"] == "3"
    assert load_output(workdir, "demo", PRETRAIN, "other-key") is None


def test_a_result_missing_a_field_names_it_and_the_folder(tmp_path: Path) -> None:
    workdir = Workdir(tmp_path)
    folder = workdir.stage_dir("demo", "pretrain", "k1")
    folder.mkdir(parents=True)
    document = {k: v for k, v in RESULT.to_json().items() if k != "val_loss"}
    (folder / RESULT_FILE).write_text(json.dumps(document))
    with pytest.raises(KubeForgeError, match=rf"{folder / RESULT_FILE}: .*\(no val_loss\); delete {folder}"):
        load_output(workdir, "demo", PRETRAIN, "k1")


def test_gates_read_a_metric_and_the_champions_from_the_result() -> None:
    assert RESULT.gate_values("val_perplexity") == (134.3, None)
    assert RESULT.gate_values("num_parameters") == (467584.0, None)
    scored = evaluation({"perplexity": 102.0, "bleu": None}, {"perplexity": 100.0})
    assert scored.gate_values("perplexity") == (102.0, 100.0)
    assert scored.gate_values("bleu") == (None, None)
    assert scored.scored_metrics() == ["perplexity"]
