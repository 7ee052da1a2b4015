"""The quantize and promotion sections: stage order, unsupported models and gates that cannot be checked."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubeforge.promote.gates import evaluate_gates, report
from kubeforge.spec.load import parse_manifest
from kubeforge.spec.promotion import Gate
from kubeforge.stages.evaluate import EvaluateResult
from kubeforge.stages.quantize import QuantizeResult
from kubeforge.stages.results import StageResult
from tests.unit.test_spec_stages import problems

pytestmark = pytest.mark.unit

BASE: dict[str, Any] = {
    "apiVersion": "kubeforge.io/v1alpha1",
    "kind": "ModelPipeline",
    "metadata": {"name": "demo"},
    "spec": {
        "data": {"sources": [{"type": "python-stdlib"}]},
        "pretrain": {},
        "finetune": {"task": {"builtin": "python-docstrings"}},
        "evaluate": {},
        "quantize": {"scheme": "w8a8-int8"},
        "promotion": {"gates": [{"metric": "evaluate.perplexity", "max_regression": 0.02}]},
    },
}


def doc(**changes: Any) -> dict[str, Any]:
    """BASE with dotted spec paths set (None removes the key)."""
    out = copy.deepcopy(BASE)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = out["spec"]
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return out


def test_quantize_and_promote_run_last_and_read_what_they_need() -> None:
    pipeline = parse_manifest(BASE)
    assert pipeline.stage_names() == ["data", "pretrain", "finetune", "evaluate", "quantize", "promote"]
    assert pipeline.stage_deps("quantize") == ("data", "pretrain", "finetune")
    assert pipeline.stage_deps("promote") == ("data", "pretrain", "finetune", "evaluate", "quantize")


def test_an_architecture_the_scheme_does_not_support_is_named() -> None:
    mlm = doc(pretrain={"objective": "mlm"}, finetune=None, evaluate=None, promotion=None,
              quantize={"scheme": "dynamic-int8"})
    assert problems(mlm) == [
        "spec.quantize.scheme: dynamic-int8 does not support BertForMaskedLM (supported: LlamaForCausalLM)"
    ]


def test_prefix_tuning_cannot_be_quantized() -> None:
    found = problems(doc(finetune__method="prefix"))
    assert len(found) == 1 and found[0].startswith("spec.quantize.scheme: w8a8-int8 needs one set of merged weights")


def test_a_width_vllm_cannot_serve_points_at_the_model_setting() -> None:
    found = problems(doc(pretrain={"model": {"intermediate_size": 344}}))
    assert found == [
        "spec.pretrain.model.intermediate_size: vLLM's quantized kernels need a multiple of 16 to serve "
        "quantize.scheme w8a8-int8 (got 344); leave it null for a default that fits"
    ]
    # The transformers engine has no such limit.
    parse_manifest(doc(pretrain={"model": {"intermediate_size": 344}}, quantize={"scheme": "dynamic-int8"}))


def test_a_gate_on_a_metric_no_stage_produces_is_refused() -> None:
    assert problems(doc(promotion={"gates": [{"metric": "evaluate.accuracy", "min": 0.5}]})) == [
        "spec.promotion.gates.0.metric: the evaluate stage does not produce 'accuracy' (it produces: perplexity, "
        "exact_match, bleu, rouge_l, parse_rate, doctest_pass_rate)"
    ]
    assert problems(doc(quantize=None, promotion={"gates": [{"metric": "quantize.size_ratio", "max": 0.5}]})) == [
        "spec.promotion.gates.0.metric: 'quantize.size_ratio' comes from the quantize stage, which this manifest "
        "does not have; add a quantize section or drop the gate"
    ]
    found = problems(doc(promotion={"gates": [{"metric": "quantize.size_ratio", "max_regression": 0.1}]}))
    assert len(found) == 1 and "max_regression compares with the champion's score" in found[0]
    found = problems(doc(promotion={"gates": [{"metric": "evaluate.bleu"}]}))
    assert len(found) == 1 and "set min, max or max_regression" in found[0]


def evaluation(candidate: dict[str, float | None], champion: dict[str, float | None] | None) -> EvaluateResult:
    return EvaluateResult(
        candidate=candidate, base=None, champion=champion, champion_version=None, champion_scored_version=None,
        models={}, comparison="comparison.csv", comparison_md="comparison.md", plots=[], samples="samples.jsonl",
        task=None, num_examples=0, perplexity_split="test", doctest_isolation=None,
    )


def quantization(perplexity_increase: float, size_ratio: float) -> QuantizeResult:
    return QuantizeResult(
        model_dir="model", scheme="w8a8-int8", format="compressed-tensors", architecture="LlamaForCausalLM",
        source_stage="finetune", source_model_dir="merged", source_method="sft-lora", calibration_samples=8,
        perplexity_before=100.0, perplexity=100.0 * (1 + perplexity_increase), perplexity_increase=perplexity_increase,
        size_bytes=300, source_size_bytes=1000, size_ratio=size_ratio, quantizer={}, check={},
    )


RESULTS: dict[str, StageResult] = {
    "evaluate": evaluation({"perplexity": 102.0, "rouge_l": 0.30}, {"perplexity": 100.0, "rouge_l": 0.31}),
    "quantize": quantization(perplexity_increase=0.01, size_ratio=0.3),
}


def test_relative_gates_compare_with_the_champion_in_the_metrics_direction() -> None:
    gates = [
        Gate(metric="evaluate.perplexity", max_regression=0.01),  # 2% worse: fails
        Gate(metric="evaluate.perplexity", max_regression=0.03),  # passes
        Gate(metric="evaluate.rouge_l", max_regression=0.05),  # 3.2% lower: passes
        Gate(metric="evaluate.rouge_l", max_regression=0.02),  # fails
        Gate(metric="quantize.size_ratio", max=0.25),  # fails
        Gate(metric="quantize.perplexity_increase", max=0.03),  # passes
    ]
    outcomes = evaluate_gates(gates, RESULTS)
    assert [o.passed for o in outcomes] == [False, True, True, False, False, True]
    assert outcomes[0].detail == "102 is +2.00% worse than the champion's 100 (max 1.00%)"
    assert outcomes[4].detail == "0.3 is above max 0.25"
    table = report(outcomes)
    assert table.count("FAIL") == 3 and "evaluate.perplexity (max_regression 0.01)" in table


def test_without_a_champion_a_relative_gate_passes_and_says_why() -> None:
    results: dict[str, StageResult] = {"evaluate": evaluation({"perplexity": 150.0}, None)}
    (outcome,) = evaluate_gates([Gate(metric="evaluate.perplexity", max_regression=0.02)], results)
    assert outcome.passed and outcome.detail == "no champion score to compare with"


def test_a_metric_missing_from_this_run_fails_its_gate_by_name() -> None:
    results: dict[str, StageResult] = {"evaluate": evaluation({"perplexity": None, "bleu": 1.0}, None)}
    (outcome,) = evaluate_gates([Gate(metric="evaluate.perplexity", max=200)], results)
    assert not outcome.passed
    assert outcome.detail == "evaluate.perplexity: the evaluate stage produced no value for it in this run (it has: bleu)"
