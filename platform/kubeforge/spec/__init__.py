"""The manifest models (pydantic): the one source of truth for CLI, executor, jobs and CRDs."""

from kubeforge.spec.data import DataSpec, FilesSource, StdlibSource
from kubeforge.spec.load import load_manifest, parse_manifest, resolve_source_paths
from kubeforge.spec.pipeline import API_VERSION, ModelPipeline
from kubeforge.spec.pretrain import PretrainSpec


def json_schema() -> dict:
    """JSON Schema of the ModelPipeline manifest (issue 5/6 generate CRDs from it)."""
    return ModelPipeline.model_json_schema()


__all__ = [
    "API_VERSION",
    "DataSpec",
    "FilesSource",
    "ModelPipeline",
    "PretrainSpec",
    "StdlibSource",
    "json_schema",
    "load_manifest",
    "parse_manifest",
    "resolve_source_paths",
]
