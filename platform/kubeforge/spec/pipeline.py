"""The `ModelPipeline` manifest: the one source of truth for what a pipeline does."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from kubeforge.spec.base import StrictModel
from kubeforge.spec.cluster import ClusterSpec
from kubeforge.spec.data import DataSpec
from kubeforge.spec.evaluate import EvaluateSpec
from kubeforge.spec.finetune import FinetuneSpec
from kubeforge.spec.pretrain import ModelArchitecture, PretrainSpec
from kubeforge.spec.promotion import STAGE_METRICS, PromotionSpec
from kubeforge.spec.quantize import SERVING_ENGINE, SUPPORTED_ARCHITECTURES, QuantizeSpec
from kubeforge.spec.tune import REPORTED_METRICS, TuneSpec, field_paths

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
    tune: TuneSpec | None = None
    finetune: FinetuneSpec | None = None
    evaluate: EvaluateSpec | None = None
    quantize: QuantizeSpec | None = None
    promotion: PromotionSpec | None = None
    cluster: ClusterSpec | None = None
    """How the operator runs the stages on Kubernetes (image, scheduling, work volume, retries); the
    operator requires it. `kubeforge run` validates it and runs on the local Ray runtime instead."""

    # Checks that span sections are raised from here (not from the sections) because the limit lives
    # in another section; each message starts with the path of the field to change, which the error
    # formatter turns into the reported location.
    @model_validator(mode="after")
    def _sequences_fit_the_model(self) -> PipelineSpec:
        if self.pretrain is not None:
            seq_len = self.data.packing.seq_len
            limit = self.pretrain.model.max_position_embeddings
            if seq_len > limit:
                raise ValueError(
                    f"data.packing.seq_len: must be <= pretrain.model.max_position_embeddings ({limit}) (got {seq_len})"
                )
            finetune = self.finetune
            if finetune is not None and finetune.base_model is None and finetune.max_length > limit:
                raise ValueError(
                    f"finetune.max_length: must be <= pretrain.model.max_position_embeddings ({limit}) "
                    f"(got {finetune.max_length})"
                )
        return self

    @model_validator(mode="after")
    def _stages_have_their_inputs(self) -> PipelineSpec:
        if self.finetune is not None and self.finetune.base_model is None and self.pretrain is None:
            raise ValueError("finetune.base_model: set a model folder, or add a pretrain section to train one")
        for name, verb in (("evaluate", "score"), ("quantize", "quantize"), ("promotion", "register")):
            if getattr(self, name) is not None and self.pretrain is None and self.finetune is None:
                raise ValueError(f"{name}: needs a model to {verb}; add a pretrain or finetune section")
        return self

    @model_validator(mode="after")
    def _quantizer_supports_the_model(self) -> PipelineSpec:
        quantize = self.quantize
        if quantize is None:
            return self
        if self.finetune is not None and self.finetune.method == "prefix":
            raise ValueError(
                f"quantize.scheme: {quantize.scheme} needs one set of merged weights, but method 'prefix' keeps "
                "its prefix apart from the base model; fine-tune with lora or full"
            )
        final = self.final_model()
        if final is None:
            return self  # a model folder named in the manifest: checked when the stage reads its config
        architecture, shape, where = final
        supported = SUPPORTED_ARCHITECTURES[quantize.scheme]
        if architecture not in supported:
            raise ValueError(f"quantize.scheme: {quantize.scheme} does not support {architecture} "
                             f"(supported: {', '.join(supported)})")
        width = shape.intermediate_size
        if SERVING_ENGINE[quantize.scheme] == "vllm" and width is not None and width % 16:
            raise ValueError(
                f"{where}.intermediate_size: vLLM's quantized kernels need a multiple of 16 to serve "
                f"quantize.scheme {quantize.scheme} (got {width}); leave it null for a default that fits"
            )
        return self

    @model_validator(mode="after")
    def _gates_name_produced_metrics(self) -> PipelineSpec:
        if self.promotion is None:
            return self
        for i, gate in enumerate(self.promotion.gates):
            if gate.stage not in STAGE_METRICS:
                raise ValueError(
                    f"promotion.gates.{i}.metric: no stage '{gate.stage}' reports metrics for gates "
                    f"(stages: {', '.join(STAGE_METRICS)})"
                )
            if getattr(self, gate.stage) is None:
                raise ValueError(
                    f"promotion.gates.{i}.metric: '{gate.metric}' comes from the {gate.stage} stage, which this "
                    f"manifest does not have; add a {gate.stage} section or drop the gate"
                )
            if gate.name not in STAGE_METRICS[gate.stage]:
                raise ValueError(
                    f"promotion.gates.{i}.metric: the {gate.stage} stage does not produce '{gate.name}' "
                    f"(it produces: {', '.join(STAGE_METRICS[gate.stage])})"
                )
        return self

    @model_validator(mode="after")
    def _search_fits_its_target(self) -> PipelineSpec:
        for name in ("pretrain", "finetune"):
            section = getattr(self, name)
            if section is not None and section.hyperparameters_from == "tune":
                if self.tune is None:
                    raise ValueError(f"{name}.hyperparameters_from: there is no tune section to take them from")
                if self.tune.target != name:
                    raise ValueError(
                        f"{name}.hyperparameters_from: the tune section searches '{self.tune.target}', not '{name}'"
                    )
        tune = self.tune
        if tune is None:
            return self
        target = getattr(self, tune.target)
        if target is None:
            raise ValueError(f"tune.target: the manifest has no {tune.target} section to search over")
        settable = field_paths(type(target))
        for path in tune.search_space:
            if path not in settable:
                raise ValueError(
                    f"tune.search_space.{path}: not a setting of spec.{tune.target} "
                    f"(settable: {', '.join(settable)})"
                )
        key = tune.target if tune.target == "pretrain" else f"finetune:{target.objective}"
        for metric in tune.metrics:
            if metric not in REPORTED_METRICS[key]:
                raise ValueError(
                    f"tune.metric: no stage reports '{metric}'; {key.replace(':', ' with objective ')} reports "
                    f"{', '.join(REPORTED_METRICS[key])}"
                )
        return self

    def final_model(self) -> tuple[str, ModelArchitecture, str] | None:
        """The `transformers` class, sizes and manifest path of the pipeline's final model when the
        manifest decides them; None when it comes from a model folder read at run time."""
        finetune, pretrain = self.finetune, self.pretrain
        if finetune is not None and finetune.distill is not None:
            student = finetune.distill.student
            return None if student is None else ("LlamaForCausalLM", student, "finetune.distill.student")
        if (finetune is not None and finetune.base_model is not None) or pretrain is None:
            return None
        architecture = "BertForMaskedLM" if pretrain.objective == "mlm" else "LlamaForCausalLM"
        return architecture, pretrain.model, "pretrain.model"


class ModelPipeline(StrictModel):
    """A pipeline manifest: `kubectl apply` and `kubeforge run` take the same file."""

    apiVersion: Literal["kubeforge.io/v1alpha1"]
    kind: Literal["ModelPipeline"]
    metadata: Metadata
    spec: PipelineSpec

    def stage_names(self) -> list[str]:
        """Stages this manifest asks for, in execution order."""
        spec = self.spec
        names = ["data"]
        if spec.tune is not None and spec.tune.target == "pretrain":
            names.append("tune")
        if spec.pretrain is not None:
            names.append("pretrain")
        if spec.tune is not None and spec.tune.target == "finetune":
            names.append("tune")
        for name in ("finetune", "evaluate", "quantize"):
            if getattr(spec, name) is not None:
                names.append(name)
        if spec.promotion is not None:
            names.append("promote")
        return names

    def stage_deps(self, name: str) -> tuple[str, ...]:
        """The stages whose outputs `name` reads; all of them come earlier in `stage_names()`."""
        spec = self.spec
        present = set(self.stage_names())
        wanted: tuple[str, ...]
        if name == "data":
            return ()
        if name == "pretrain":
            wanted = ("data", "tune") if spec.pretrain and spec.pretrain.hyperparameters_from else ("data",)
        elif name == "tune":
            wanted = ("data",) if spec.tune and spec.tune.target == "pretrain" else ("data", "pretrain")
        elif name == "finetune":
            wanted = ("data", "pretrain", "tune") if spec.finetune and spec.finetune.hyperparameters_from else (
                "data", "pretrain")
        elif name in ("evaluate", "quantize"):
            wanted = ("data", "pretrain", "finetune")
        elif name == "promote":
            # Its gates read any earlier stage's metrics, and it registers the last model.
            wanted = ("data", "pretrain", "finetune", "evaluate", "quantize")
        else:
            raise KeyError(name)
        return tuple(d for d in wanted if d in present)
