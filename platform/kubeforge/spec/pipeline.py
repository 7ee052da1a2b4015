"""The `ModelPipeline` manifest: the one source of truth for what a pipeline does."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from kubeforge.spec.base import StrictModel
from kubeforge.spec.data import DataSpec
from kubeforge.spec.pretrain import PretrainSpec

API_VERSION = "kubeforge.io/v1alpha1"

# A Kubernetes object name that is also a valid DNS-1123 label, because the operator derives
# RayJob and Service names from it.
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class Metadata(StrictModel):
    name: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS1123_LABEL)]
    """Pipeline name: the MLflow experiment and registered model are named after it."""
    namespace: Annotated[str, Field(max_length=63, pattern=DNS1123_LABEL)] | None = None
    """Kubernetes namespace of the resource; `kubeforge run` records it as the MLflow tag `kubeforge.namespace`."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Kubernetes labels; recorded on every stage's MLflow run as `kubeforge.label.<key>`."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Kubernetes annotations; recorded on every stage's MLflow run as `kubeforge.annotation.<key>`."""


class PipelineSpec(StrictModel):
    data: DataSpec
    pretrain: PretrainSpec | None = None

    @model_validator(mode="after")
    def _sequences_fit_the_model(self) -> PipelineSpec:
        if self.pretrain is not None:
            seq_len = self.data.packing.seq_len
            limit = self.pretrain.model.max_position_embeddings
            if seq_len > limit:
                # Raised from here (not from DataSpec) because the limit lives in another section;
                # the formatter turns the path prefix into the field the user must change.
                raise ValueError(
                    f"data.packing.seq_len: must be <= pretrain.model.max_position_embeddings ({limit}) (got {seq_len})"
                )
        return self


class ModelPipeline(StrictModel):
    """A pipeline manifest: `kubectl apply` and `kubeforge run` take the same file."""

    apiVersion: Literal["kubeforge.io/v1alpha1"]
    kind: Literal["ModelPipeline"]
    metadata: Metadata
    spec: PipelineSpec

    def stage_names(self) -> list[str]:
        """Stages this manifest asks for, in execution order."""
        names = ["data"]
        if self.spec.pretrain is not None:
            names.append("pretrain")
        return names
