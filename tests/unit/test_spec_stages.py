"""The tune, finetune and evaluate sections: their order, their inputs and the errors that span sections."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from kubeforge.context import StageOutput
from kubeforge.errors import SpecError
from kubeforge.executor import plan, stage_section
from kubeforge.spec.load import parse_manifest
from kubeforge.stages.tune import TuneResult
from tests.data_fixtures import RecordingReporter

pytestmark = pytest.mark.unit

FULL: dict[str, Any] = {
    "apiVersion": "kubeforge.io/v1alpha1",
    "kind": "ModelPipeline",
    "metadata": {"name": "demo"},
    "spec": {
        "data": {"sources": [{"type": "python-stdlib"}]},
        "pretrain": {},
        "tune": {
            "target": "finetune",
            "search_space": {
                "train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
                "lora.rank": {"type": "choice", "values": [4, 8, 16]},
            },
        },
        "finetune": {"task": {"builtin": "python-docstrings"}, "hyperparameters_from": "tune"},
        "evaluate": {},
    },
}


def doc(**sections: Any) -> dict[str, Any]:
    """FULL with whole spec sections replaced (None removes one)."""
    out = copy.deepcopy(FULL)
    for name, value in sections.items():
        if value is None:
            out["spec"].pop(name, None)
        else:
            out["spec"][name] = value
    return out


def problems(manifest: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_manifest(manifest)
    return [str(p) for p in info.value.problems]


def test_stage_order_and_inputs_follow_the_sections() -> None:
    pipeline = parse_manifest(FULL)
    assert pipeline.stage_names() == ["data", "pretrain", "tune", "finetune", "evaluate"]
    assert pipeline.stage_deps("tune") == ("data", "pretrain")
    assert pipeline.stage_deps("finetune") == ("data", "pretrain", "tune")
    assert pipeline.stage_deps("evaluate") == ("data", "pretrain", "finetune")

    over_pretraining = doc(
        tune={"target": "pretrain", "search_space": {"train.lr": {"type": "uniform", "low": 1e-4, "high": 1e-3}}},
        pretrain={"hyperparameters_from": "tune"},
        finetune={"task": {"builtin": "python-docstrings"}},
    )
    pipeline = parse_manifest(over_pretraining)
    assert pipeline.stage_names() == ["data", "tune", "pretrain", "finetune", "evaluate"]
    assert pipeline.stage_deps("pretrain") == ("data", "tune")
    assert pipeline.stage_deps("finetune") == ("data", "pretrain")


def test_changing_the_search_changes_the_keys_of_the_stages_that_use_its_result() -> None:
    before = {s.name: s.key for s in plan(parse_manifest(FULL), Path("."))}
    wider = doc(tune={**FULL["spec"]["tune"], "num_samples": 16})
    after = {s.name: s.key for s in plan(parse_manifest(wider), Path("."))}
    assert before["pretrain"] == after["pretrain"]
    assert {name for name in before if before[name] != after[name]} == {"tune", "finetune", "evaluate"}


def test_the_best_configuration_overrides_only_the_searched_settings() -> None:
    pipeline = parse_manifest(FULL)
    best = TuneResult(
        best_config={"train.lr": 0.004, "lora.rank": 16}, best_metrics={"val_loss": 1.0}, best_trial="t1",
        metric="val_loss", mode="min", num_trials=1, completed_trials=1, early_stopped_trials=0, failed_trials=0,
        total_trial_steps=10, study_storage="optuna.journal", plots=[],
    )
    tune = StageOutput("tune", "k", Path("."), best, None)
    section = stage_section(pipeline, "finetune", {"tune": tune}, RecordingReporter())
    assert section.train.lr == 0.004
    assert section.lora_settings.rank == 16
    assert section.train.max_steps == pipeline.spec.finetune.train.max_steps
    assert section.lora_settings.alpha == 16  # untouched defaults stay


def test_search_space_errors_name_the_dimension() -> None:
    bad_path = doc(tune={"search_space": {"train.learning_rate": {"type": "uniform", "low": 0, "high": 1}}})
    (line,) = problems(bad_path)
    assert line.startswith("spec.tune.search_space.train.learning_rate: not a setting of spec.finetune (settable:")
    assert "train.lr" in line

    assert problems(doc(tune={"search_space": {}})) == ["spec.tune.search_space: must have at least 1 item(s) (got {})"]
    degenerate = doc(tune={"search_space": {
        "train.lr": {"type": "loguniform", "low": 0.01, "high": 0.01},
        "lora.rank": {"type": "choice", "values": [8]},
    }})
    assert problems(degenerate) == [
        "spec.tune.search_space.train.lr: low must be < high (got low=0.01, high=0.01)",
        "spec.tune.search_space.lora.rank: a choice needs at least two different values (got [8])",
    ]
    assert problems(doc(tune={"search_space": {"train.lr": {"type": "loguniform", "low": 0, "high": 1}}})) == [
        "spec.tune.search_space.train.lr: a loguniform dimension needs low > 0 (got 0)"
    ]


def test_a_metric_no_stage_reports_is_refused_with_the_ones_that_exist() -> None:
    manifest = doc(tune={**FULL["spec"]["tune"], "metric": "bleu"})
    assert problems(manifest) == [
        "spec.tune.metric: no stage reports 'bleu'; finetune with objective sft reports val_loss, val_perplexity"
    ]
    dpo = doc(
        tune={**FULL["spec"]["tune"], "metric": ["val_loss", "reward_accuracy"], "mode": ["min", "max"]},
        finetune={"task": {"builtin": "python-docstrings"}, "objective": "dpo"},
    )
    assert parse_manifest(dpo).spec.tune.modes == ["min", "max"]  # type: ignore[union-attr]


def test_cross_section_references_must_resolve() -> None:
    assert problems(doc(tune=None)) == ["spec.finetune.hyperparameters_from: there is no tune section to take them from"]
    assert problems(doc(pretrain=None, tune=None, finetune={"task": {"builtin": "python-docstrings"}})) == [
        "spec.finetune.base_model: set a model folder, or add a pretrain section to train one"
    ]
    over_pretraining = doc(tune={**FULL["spec"]["tune"], "target": "pretrain"})
    (line,) = problems(over_pretraining)
    assert line.startswith("spec.finetune.hyperparameters_from: the tune section searches 'pretrain'")


def test_finetune_settings_that_would_be_ignored_are_refused() -> None:
    task = {"builtin": "python-docstrings"}
    assert problems(doc(tune=None, finetune={"task": task, "method": "qlora"})) == [
        "spec.finetune.method: 'qlora' needs 4-bit CUDA kernels (bitsandbytes): set resources.use_gpu: true, "
        "or use method 'lora' on CPU"
    ]
    assert problems(doc(tune=None, finetune={"task": task, "method": "full", "lora": {"rank": 4}})) == [
        "spec.finetune.lora: only used with method lora or qlora (got method 'full')"
    ]
    assert problems(doc(tune=None, finetune={"task": task, "objective": "distill", "method": "full"})) == [
        "spec.finetune.distill: objective 'distill' needs distill.student or distill.student_path"
    ]
    assert problems(doc(tune=None, finetune={"task": {"builtin": "python-docstrings", "path": "x.jsonl"}})) == [
        "spec.finetune.task: set exactly one of builtin and path"
    ]
    assert problems(doc(tune=None, finetune={"task": task, "max_length": 1024})) == [
        "spec.finetune.max_length: must be <= pretrain.model.max_position_embeddings (512) (got 1024)"
    ]
