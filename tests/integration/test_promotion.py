"""Registration and the promote stage against a real MLflow store, with the session's tiny model as the
registered candidate: gates pass and fail as specified, aliases move only on success, approval pauses."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from kubeforge.context import StageContext, StageOutput
from kubeforge.errors import StageError
from kubeforge.registry.lineage import register_stage_model
from kubeforge.spec.load import parse_manifest
from kubeforge.spec.promotion import PromotionSpec
from kubeforge.stages.evaluate import EvaluateResult
from kubeforge.stages.pretrain import PRETRAIN
from kubeforge.stages.promote import PromoteResult
from tests.data_fixtures import RecordingReporter
from tests.stage_fixtures import TinyLM

pytestmark = pytest.mark.integration

EVALUATION = EvaluateResult(
    candidate={"perplexity": 120.0, "rouge_l": 0.05}, base=None, champion={"perplexity": 100.0, "rouge_l": 0.04},
    champion_version="1", champion_scored_version="1", models={}, comparison="comparison.csv",
    comparison_md="comparison.md", plots=[], samples="samples.jsonl", task=None, num_examples=0,
    perplexity_split="test", doctest_isolation=None,
)
RUN_TAGS = {"kubeforge.spec_hash": "s123", "kubeforge.code_version": "0.1.0+gabc", "kubeforge.dataset_hash": "d456",
            "kubeforge.stage": "pretrain", "kubeforge.run": "run-1", "kubeforge.unrelated": "x"}


def registered_candidate(tiny_lm: TinyLM, model: str) -> StageOutput:
    """The tiny model registered as version of `model`, as the executor registers a finished stage."""
    pretrain = tiny_lm.pretrain
    registered = register_stage_model(tiny_lm.tracking_uri, model, PRETRAIN, pretrain.result,
                                      str(pretrain.mlflow_run_id), RUN_TAGS, {"data": tiny_lm.data})
    assert registered is not None
    return StageOutput("pretrain", "key", pretrain.directory, pretrain.result, pretrain.mlflow_run_id, registered)


def promote(tiny_lm: TinyLM, model: str, section: dict[str, Any], candidate: StageOutput,
            evaluation: EvaluateResult | None = None) -> PromoteResult:
    from kubeforge.promote.stage import run

    manifest = tiny_lm.pipeline.model_dump(mode="json", exclude_none=True)
    manifest["metadata"]["name"] = model
    manifest["spec"]["evaluate"] = {}
    manifest["spec"]["promotion"] = section
    out_dir = tiny_lm.root / f"promote-{model}-{time.monotonic_ns()}"
    out_dir.mkdir()
    ctx = StageContext(
        pipeline=parse_manifest(manifest), stage="promote", out_dir=out_dir, base_dir=tiny_lm.root,
        tracker=tiny_lm.tracker("promote"), reporter=RecordingReporter(),
        inputs={"data": tiny_lm.data, "pretrain": candidate,
                "evaluate": StageOutput("evaluate", "k", out_dir, evaluation or EVALUATION, None)},
    )
    return run(PromotionSpec.model_validate(section), ctx)


def registry(tiny_lm: TinyLM) -> Any:
    from kubeforge.registry.client import Registry

    return Registry(tiny_lm.tracking_uri)


def test_a_stage_model_becomes_one_version_with_its_lineage(tiny_lm: TinyLM) -> None:
    first = registered_candidate(tiny_lm, "lineage")
    again = registered_candidate(tiny_lm, "lineage")  # a resumed stage registers nothing new
    assert first.registered is not None and again.registered is not None
    assert first.registered.version == again.registered.version == "1"
    (version,) = registry(tiny_lm).versions("lineage")
    tags = version.tags
    assert tags["kubeforge.role"] == "base" and tags["kubeforge.method"] == "pretrain-causal"
    assert tags["kubeforge.quantization"] == "none" and tags["kubeforge.format"] == "hf"
    assert (tags["kubeforge.spec_hash"], tags["kubeforge.dataset_hash"]) == ("s123", "d456")
    assert tags["kubeforge.code_version"] == "0.1.0+gabc" and "kubeforge.unrelated" not in tags
    assert tiny_lm.data.mlflow_run_id in tags["kubeforge.parent_runs"]
    assert version.source.endswith("/model") and version.run_id == tiny_lm.pretrain.mlflow_run_id


def test_a_failed_gate_names_every_failure_and_moves_no_alias(tiny_lm: TinyLM) -> None:
    candidate = registered_candidate(tiny_lm, "gated")
    section = {"gates": [
        {"metric": "evaluate.perplexity", "max_regression": 0.02},  # 20% worse than the champion: fails
        {"metric": "evaluate.rouge_l", "min": 0.01},  # passes
        {"metric": "pretrain.val_perplexity", "max": 1.0},  # fails
    ]}
    with pytest.raises(StageError) as info:
        promote(tiny_lm, "gated", section, candidate)
    message = info.value.message
    assert message.startswith("version 1 of 'gated' failed 2 of 3 gates; it is registered but not challenger")
    assert "evaluate.perplexity: 120 is +20.00% worse than the champion's 100 (max 2.00%)" in message
    assert "pretrain.val_perplexity: " in message and "is above max 1" in message
    assert "evaluate.rouge_l" not in message
    reg = registry(tiny_lm)
    assert reg.alias("gated", "challenger") is None
    assert reg.version("gated", "1").tags["kubeforge.gates"] == "failed"


def test_passing_gates_make_the_candidate_challenger_with_an_audit_record(tiny_lm: TinyLM) -> None:
    candidate = registered_candidate(tiny_lm, "passing")
    result = promote(tiny_lm, "passing", {"gates": [{"metric": "evaluate.perplexity", "max_regression": 0.25}]},
                     candidate)
    assert result.gates_verdict == "passed" and result.aliases == ["challenger"]
    reg = registry(tiny_lm)
    challenger = reg.alias("passing", "challenger")
    assert challenger is not None and challenger.version == "1"
    assert reg.alias("passing", "champion") is None  # production's alias moves only by canary or by hand
    (record,) = reg.audit("passing")
    assert (record.action, record.alias, record.from_version, record.to_version) == ("promote", "challenger", None, "1")
    assert "passed 1 gate(s)" in record.reason and record.user


def test_manual_approval_pauses_the_pipeline_until_approved(tiny_lm: TinyLM) -> None:
    candidate = registered_candidate(tiny_lm, "approved")
    section = {"approval": {"poll_s": 0.2, "timeout_s": 120}, "alias": "champion"}
    outcome: dict[str, PromoteResult] = {}
    waiting = threading.Thread(target=lambda: outcome.update(result=promote(tiny_lm, "approved", section, candidate)))
    waiting.start()
    reg = registry(tiny_lm)
    deadline = time.monotonic() + 60
    while reg.version("approved", "1").approval != "pending":
        assert time.monotonic() < deadline and waiting.is_alive(), "the stage never asked for approval"
        time.sleep(0.1)
    assert reg.alias("approved", "challenger") is None, "no alias moves before approval"
    reg.approve("approved", "1", reason="looks good", user="alice")
    waiting.join(timeout=60)
    assert outcome["result"].approved_by == "alice" and outcome["result"].aliases == ["challenger", "champion"]
    assert reg.alias("approved", "champion").version == "1"  # type: ignore[union-attr]
    assert [r.action for r in reg.audit("approved")] == ["approve", "promote", "promote"]


def test_an_approval_that_never_comes_fails_resumably(tiny_lm: TinyLM) -> None:
    candidate = registered_candidate(tiny_lm, "unapproved")
    with pytest.raises(StageError) as info:
        promote(tiny_lm, "unapproved", {"approval": {"poll_s": 0.1, "timeout_s": 0.5}}, candidate)
    assert info.value.resumable
    assert "kubeforge models approve unapproved 1" in info.value.message
    assert registry(tiny_lm).alias("unapproved", "challenger") is None
