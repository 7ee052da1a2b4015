"""The manifest models (pydantic): the one source of truth for CLI, executor, jobs and CRDs."""

from kubeforge.spec.data import DataSpec, FilesSource, StdlibSource
from kubeforge.spec.deployment import ModelDeployment
from kubeforge.spec.evaluate import EvaluateSpec
from kubeforge.spec.finetune import FinetuneSpec
from kubeforge.spec.load import (
    load_any,
    load_deployment,
    load_manifest,
    parse_deployment,
    parse_manifest,
    resolve_source_paths,
)
from kubeforge.spec.pipeline import API_VERSION, ModelPipeline
from kubeforge.spec.pretrain import PretrainSpec
from kubeforge.spec.promotion import PromotionSpec
from kubeforge.spec.quantize import QuantizeSpec
from kubeforge.spec.tune import TuneSpec


def json_schema() -> dict:
    """JSON Schema of the ModelPipeline manifest (issue 5/6 generate CRDs from it)."""
    return ModelPipeline.model_json_schema()


__all__ = [
    "API_VERSION",
    "DataSpec",
    "EvaluateSpec",
    "FilesSource",
    "FinetuneSpec",
    "ModelDeployment",
    "ModelPipeline",
    "PretrainSpec",
    "PromotionSpec",
    "QuantizeSpec",
    "StdlibSource",
    "TuneSpec",
    "json_schema",
    "load_any",
    "load_deployment",
    "load_manifest",
    "parse_deployment",
    "parse_manifest",
    "resolve_source_paths",
]
