"""The quantize stage on the session's tiny pretrained Llama: every CPU-capable scheme loads and
generates in the engine that serves it within the perplexity gate; the GPU-only ones still produce
their artefact; bad input is refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubeforge.errors import KubeForgeError, StageError
from kubeforge.quantize.serving import quantization_of, require_servable
from kubeforge.spec.quantize import QuantizeSpec
from kubeforge.stages.quantize import QuantizeResult
from tests.stage_fixtures import TinyLM

pytestmark = pytest.mark.integration

SMALL = {"perplexity_batches": 4, "batch_size": 4, "calibration_samples": 16, "check_max_new_tokens": 8}


def quantize(tiny_lm: TinyLM, name: str, **section: Any) -> tuple[QuantizeResult, Path]:
    """The stage's result and its folder."""
    from kubeforge.quantize.stage import run

    section = {**SMALL, **section}
    ctx = tiny_lm.context("quantize", section, name)
    return run(QuantizeSpec.model_validate(section), ctx), ctx.out_dir


def test_dynamic_int8_is_smaller_stays_within_the_gate_and_generates_in_transformers(tiny_lm: TinyLM) -> None:
    result, out_dir = quantize(tiny_lm, "q-dynamic", scheme="dynamic-int8")
    assert result.format == "torch-dynamic-int8"
    assert result.size_ratio < 0.6, result
    assert result.perplexity_increase <= 0.03, result
    check = result.check
    assert check["engine"] == "transformers" and check["generated_tokens"] > 0 and check["tokens_per_second"] > 0
    assert check["perplexity"] == pytest.approx(result.perplexity, rel=1e-3)
    model = out_dir / "model"
    assert quantization_of(model)["scheme"] == "dynamic-int8"  # type: ignore[index]
    with pytest.raises(KubeForgeError, match="which the transformers engine serves, not vllm"):
        require_servable(model, "vllm", "cpu")


def test_w8a8_int8_runs_in_the_quantize_environment_and_serves_in_vllm_on_cpu(tiny_lm: TinyLM) -> None:
    result, out_dir = quantize(tiny_lm, "q-w8a8", scheme="w8a8-int8")
    assert result.format == "compressed-tensors" and result.calibration_samples == 16
    assert result.perplexity_increase <= 0.03, result
    assert result.size_ratio < 0.6, result
    config = json.loads((out_dir / "model" / "config.json").read_text())
    assert "quantization_config" in config
    check = result.check
    assert check["engine"] == "vllm" and check["generated_tokens"] > 0, check
    # vLLM's INT8 kernels (bf16 activations) against llm-compressor's fake quantization in fp32.
    assert check["perplexity"] == pytest.approx(result.perplexity, rel=0.05)
    # Served with float32 activations, vLLM's engine would start and then fail on the first request.
    with pytest.raises(KubeForgeError, match=r"^engine\.dtype: float32, but .* take bfloat16 or float16 activations"):
        require_servable(out_dir / "model", "vllm", "cpu", "float32")
    require_servable(out_dir / "model", "vllm", "cpu", "auto")


def test_gpu_only_scheme_is_produced_on_cpu_but_refused_for_cpu_serving(tiny_lm: TinyLM) -> None:
    # GPTQ's 128-column groups do not divide the tiny model's 352-wide down projection.
    result, out_dir = quantize(tiny_lm, "q-w4a16", scheme="w4a16", ignore=["lm_head", "re:.*down_proj$"])
    assert result.format == "compressed-tensors"
    assert result.perplexity_increase <= 0.03, result
    assert "only with CUDA kernels" in result.check["skipped"], result.check
    with pytest.raises(KubeForgeError, match="quantized with w4a16, which vLLM serves only with CUDA kernels"):
        require_servable(out_dir / "model", "vllm", "cpu")


def test_more_calibration_samples_than_the_data_holds_is_refused(tiny_lm: TinyLM) -> None:
    with pytest.raises(StageError) as info:
        quantize(tiny_lm, "q-too-many", scheme="w8a8-int8", calibration_samples=100_000)
    assert info.value.message.startswith("quantize.calibration_samples: 100000 asked for, but the data stage's "
                                         "train split holds ")
