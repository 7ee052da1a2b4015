"""The stage registry is the one list of stages: a stage registered here (a throwaway one) shows up in the
manifest and its CRD, the pipeline's order, the executor's plan and dispatch, the job entrypoint, the
operator's RayJob, and the metric lists that gates and the tune stage check against — and is gone again
once it is unregistered."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubeforge import stages
from kubeforge.entrypoint import main as job_main
from kubeforge.errors import SpecError
from kubeforge.executor import plan
from kubeforge.spec.base import StrictModel
from kubeforge.spec.crd import crd
from kubeforge.spec.load import parse_manifest
from kubeforge.spec.pipeline import json_schema
from kubeforge.stages import Metric, PodSize, Stage
from kubeforge.stages.results import StageResult
from kubeforge_operator.config import OperatorConfig
from kubeforge_operator.owner import Owner
from kubeforge_operator.rayjob import stage_rayjob
from tests.helpers import TINY_PRETRAIN, small_manifest

pytestmark = pytest.mark.unit


class SmokeSpec(StrictModel):
    """Probes the pretrained model with a few prompts."""

    workers: int = 3
    prompts: int = 8


@dataclass(frozen=True)
class SmokeResult(StageResult):
    pass_rate: float
    latency_s: float


def run_smoke(spec: SmokeSpec, ctx: Any) -> SmokeResult:
    return SmokeResult(pass_rate=1.0, latency_s=0.1)


SMOKE: Stage[SmokeSpec, SmokeResult] = Stage(
    name="smoke",
    section="smoke",
    spec_type=SmokeSpec,
    result_type=SmokeResult,
    run=f"{__name__}:run_smoke",
    reads=("data", "pretrain"),
    pod_size=lambda spec: PodSize(spec.workers, 2.0, 0),
    metrics=(Metric("pass_rate"), Metric("latency_s", lower_is_better=True)),
)
CONFIG = OperatorConfig(stage_image="stage:1", quantize_image="quantize:1")
OWNER = Owner(name="registry", namespace="ml", uid="uid-1")


def manifest(**sections: Any) -> dict[str, Any]:
    doc = small_manifest("registry", pretrain=TINY_PRETRAIN)
    doc["spec"] |= {"cluster": {"workdir_claim": "work"}, **sections}
    return doc


def test_a_registered_stage_appears_wherever_stages_are_listed(tmp_path: Path) -> None:
    with stages.registered(SMOKE):
        # The manifest's schema and the CRD generated from it.
        assert "smoke" in json_schema()["$defs"]["PipelineSpec"]["properties"]
        spec_schema = crd("ModelPipeline")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        assert spec_schema["properties"]["smoke"]["properties"]["workers"]["default"] == 3

        # The pipeline's order and inputs, and the executor's plan and dispatch.
        pipeline = parse_manifest(manifest(smoke={"workers": 4}))
        assert pipeline.stage_names() == ["data", "pretrain", "smoke"]
        assert pipeline.stage_deps("smoke") == ("data", "pretrain")
        planned = {p.name: p for p in plan(pipeline, tmp_path)}
        assert planned["smoke"].deps == ("data", "pretrain")
        assert stages.get("smoke").load_run() is run_smoke

        # The job entrypoint accepts it.
        usage = io.StringIO()
        with contextlib.redirect_stdout(usage), pytest.raises(SystemExit):
            job_main(["--help"])
        assert "smoke" in usage.getvalue()

        # The operator's RayJob: its pod size comes from the section through the registry.
        rayjob = stage_rayjob(pipeline, "smoke", OWNER, CONFIG)
        (workers,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        assert workers["replicas"] == 4
        assert workers["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "2"
        assert rayjob["spec"]["entrypoint"].startswith("python jobs/stage.py smoke ")

        # The metric lists: gates may name its metrics (and only those), in the direction it declares.
        gated = manifest(smoke={}, promotion={"gates": [{"metric": "smoke.pass_rate", "min": 0.9}]})
        assert parse_manifest(gated).stage_names()[-2:] == ["smoke", "promote"]
        wrong = manifest(smoke={}, promotion={"gates": [{"metric": "smoke.accuracy", "min": 0.9}]})
        with pytest.raises(SpecError, match=r"the smoke stage does not produce 'accuracy' \(it produces: "
                                            r"pass_rate, latency_s\)"):
            parse_manifest(wrong)
        assert "latency_s" in stages.lower_is_better() and "pass_rate" not in stages.lower_is_better()

    # Unregistered, it is gone again: its section is an unknown field.
    with pytest.raises(SpecError, match=r"spec\.smoke"):
        parse_manifest(manifest(smoke={}))
    assert "smoke" not in json_schema()["$defs"]["PipelineSpec"]["properties"]


def test_the_tune_stage_searches_the_stages_that_declare_a_training_loop() -> None:
    targets = json_schema()["$defs"]["TuneSpec"]["properties"]["target"]["enum"]
    assert targets == [s.name for s in stages.training_stages()] == ["pretrain", "finetune"]
    doc = manifest(tune={"target": "smoke", "search_space": {"train.lr": {"type": "uniform", "low": 0.1, "high": 1}}})
    with stages.registered(SMOKE), pytest.raises(SpecError, match=r"tune\.target: 'smoke' is not a stage that trains "
                                                                   r"\(pretrain, finetune\)"):
        parse_manifest(doc)


def test_stage_order_follows_inputs_and_breaks_ties_by_registration() -> None:
    """The tune stage runs before the stage it searches for, unless it reads that stage's output."""
    space = {"train.lr": {"type": "uniform", "low": 1e-4, "high": 1e-3}}
    over_pretraining = parse_manifest(manifest(tune={"target": "pretrain", "search_space": space}))
    assert over_pretraining.stage_names() == ["data", "tune", "pretrain"]
    doc = manifest(tune={"target": "finetune", "search_space": space},
                   finetune={"task": {"builtin": "python-docstrings"}, "max_length": 64})
    over_finetuning = parse_manifest(doc)
    assert over_finetuning.stage_names() == ["data", "pretrain", "tune", "finetune"]
    assert over_finetuning.stage_deps("tune") == ("data", "pretrain")


def test_a_second_stage_with_the_same_name_or_section_is_refused() -> None:
    with pytest.raises(ValueError, match="a stage named 'data' is already registered"):
        stages.register(Stage(name="data", section="other", spec_type=SmokeSpec, result_type=SmokeResult,
                              run=f"{__name__}:run_smoke"))
    with pytest.raises(ValueError, match=r"another stage already reads spec\.pretrain"):
        stages.register(Stage(name="other", section="pretrain", spec_type=SmokeSpec, result_type=SmokeResult,
                              run=f"{__name__}:run_smoke"))
    assert [s.name for s in stages.all_stages()] == [
        "data", "tune", "pretrain", "finetune", "reward", "rl", "evaluate", "quantize", "promote",
    ]
