"""The quantize stage: the pipeline's model quantized, checked for perplexity and served once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubeforge.spec.quantize import QuantizeSpec
from kubeforge.stages import Metric, PodSize, Stage, model_stages
from kubeforge.stages.results import ModelLineage, ModelResult


@dataclass(frozen=True)
class QuantizeResult(ModelResult):
    model_dir: str
    scheme: str
    format: str
    architecture: str
    source_stage: str
    source_model_dir: str
    source_method: str
    """The lineage method of the model it quantized (`sft-lora`, `pretrain-causal`...)."""
    calibration_samples: int
    perplexity_before: float
    perplexity: float
    perplexity_increase: float
    size_bytes: int
    source_size_bytes: int
    size_ratio: float
    quantizer: dict[str, Any]
    check: dict[str, Any]
    """The serving engine's load-and-generate check (or why it was skipped)."""

    def model_artifact(self) -> str | None:
        return self.model_dir

    def lineage(self) -> ModelLineage:
        return ModelLineage(method=self.source_method, format=self.format, quantization=self.scheme)


QUANTIZE: Stage[QuantizeSpec, QuantizeResult] = Stage(
    name="quantize",
    section="quantize",
    spec_type=QuantizeSpec,
    result_type=QuantizeResult,
    run="kubeforge.quantize.stage:run",
    # The corpus (calibration, the perplexity check) and the pipeline's latest model, whichever stage made it.
    reads=lambda: ("data", *(s.name for s in model_stages())),
    pod_size=lambda spec: PodSize.of(use_gpu=spec.use_gpu),
    # The perplexity gate and the vLLM check run in the stage function; llm-compressor's Ray task
    # (kubeforge.envs.run_in_env) asks for no GPU and sees the GPUs of the pod it lands on, the same one.
    gpu_runs_in="driver",
    image="quantize",
    model_role="quantized",
    needs_model="quantize",
    metrics=(
        Metric("perplexity", lower_is_better=True),
        Metric("perplexity_increase", lower_is_better=True),
        Metric("size_ratio", lower_is_better=True),
    ),
)
