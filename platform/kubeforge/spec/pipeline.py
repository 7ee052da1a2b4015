"""The `ModelPipeline` manifest: the one source of truth for what a pipeline does.

Its `spec` has a section per registered stage (`kubeforge.stages`) plus `cluster`. `pipeline_model()`
builds the pydantic model from the registry; `ModelPipeline` and `PipelineSpec` are the classes code
and type checkers see, and carry the rules that span sections.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, create_model, model_validator

from kubeforge import stages
from kubeforge.spec.base import StrictModel
from kubeforge.spec.cluster import ClusterSpec
from kubeforge.spec.pretrain import ModelArchitecture
from kubeforge.spec.quantize import SERVING_ENGINE, SUPPORTED_ARCHITECTURES
from kubeforge.spec.tune import field_paths
from kubeforge.stages.data import DATA
from kubeforge.stages.finetune import FINETUNE
from kubeforge.stages.pretrain import PRETRAIN
from kubeforge.stages.promote import PROMOTE
from kubeforge.stages.quantize import QUANTIZE
from kubeforge.stages.tune import TUNE
from kubeforge.workdir import stage_key

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


CLUSTER_DOC = """How the operator runs the stages on Kubernetes (image, scheduling, work volume, retries); the
operator requires it. `kubeforge run` validates it and runs on the local Ray runtime instead."""


class PipelineSpec(StrictModel):
    """The sections of a pipeline; `pipeline_model()` adds one per registered stage, then `cluster`."""

    if TYPE_CHECKING:
        cluster: ClusterSpec | None

    # Checks that span sections are raised from here (not from the sections) because the limit lives
    # in another section; each message starts with the path of the field to change, which the error
    # formatter turns into the reported location.
    @model_validator(mode="after")
    def _sequences_fit_the_model(self) -> PipelineSpec:
        data, pretrain, finetune = DATA.section_of(self), PRETRAIN.section_of(self), FINETUNE.section_of(self)
        if pretrain is not None and data is not None:
            seq_len = data.packing.seq_len
            limit = pretrain.model.max_position_embeddings
            if seq_len > limit:
                raise ValueError(
                    f"data.packing.seq_len: must be <= pretrain.model.max_position_embeddings ({limit}) (got {seq_len})"
                )
            if finetune is not None and finetune.base_model is None and finetune.max_length > limit:
                raise ValueError(
                    f"finetune.max_length: must be <= pretrain.model.max_position_embeddings ({limit}) "
                    f"(got {finetune.max_length})"
                )
        return self

    @model_validator(mode="after")
    def _stages_have_their_inputs(self) -> PipelineSpec:
        finetune = FINETUNE.section_of(self)
        if finetune is not None and finetune.base_model is None and PRETRAIN.section_of(self) is None:
            raise ValueError("finetune.base_model: set a model folder, or add a pretrain section to train one")
        makers = [s for s in stages.model_stages() if s.needs_model is None]
        if any(maker.section_of(self) is not None for maker in makers):
            return self
        for stage in stages.present(self):
            if stage.needs_model is not None:
                raise ValueError(f"{stage.section}: needs a model to {stage.needs_model}; add a "
                                 f"{' or '.join(m.section for m in makers)} section")
        return self

    @model_validator(mode="after")
    def _quantizer_supports_the_model(self) -> PipelineSpec:
        quantize = QUANTIZE.section_of(self)
        if quantize is None:
            return self
        finetune = FINETUNE.section_of(self)
        if finetune is not None and finetune.method == "prefix":
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
        promotion = PROMOTE.section_of(self)
        if promotion is None:
            return self
        gated = {s.name: s for s in stages.all_stages() if s.metrics}
        for i, gate in enumerate(promotion.gates):
            stage = gated.get(gate.stage)
            if stage is None:
                raise ValueError(
                    f"promotion.gates.{i}.metric: no stage '{gate.stage}' reports metrics for gates "
                    f"(stages: {', '.join(gated)})"
                )
            if stage.section_of(self) is None:
                raise ValueError(
                    f"promotion.gates.{i}.metric: '{gate.metric}' comes from the {gate.stage} stage, which this "
                    f"manifest does not have; add a {stage.section} section or drop the gate"
                )
            if not stage.produces(gate.name):
                raise ValueError(
                    f"promotion.gates.{i}.metric: the {gate.stage} stage does not produce '{gate.name}' "
                    f"(it produces: {', '.join(stage.metric_names())})"
                )
        return self

    @model_validator(mode="after")
    def _search_fits_its_target(self) -> PipelineSpec:
        tune = TUNE.section_of(self)
        for stage in stages.present(self):
            if getattr(stage.section_of(self), "hyperparameters_from", None) != TUNE.name:
                continue
            if tune is None:
                raise ValueError(f"{stage.section}.hyperparameters_from: there is no tune section to take them from")
            if tune.target != stage.name:
                raise ValueError(
                    f"{stage.section}.hyperparameters_from: the tune section searches '{tune.target}', "
                    f"not '{stage.name}'"
                )
        if tune is None:
            return self
        targets = {s.name: s for s in stages.training_stages()}
        if tune.target not in targets:
            raise ValueError(f"tune.target: '{tune.target}' is not a stage that trains ({', '.join(targets)})")
        stage = targets[tune.target]
        section = stage.section_of(self)
        if section is None:
            raise ValueError(f"tune.target: the manifest has no {tune.target} section to search over")
        settable = field_paths(stage.spec_type)
        for path in tune.search_space:
            if path not in settable:
                raise ValueError(
                    f"tune.search_space.{path}: not a setting of spec.{tune.target} "
                    f"(settable: {', '.join(settable)})"
                )
        assert stage.training is not None  # training_stages() holds only those
        reported = stage.training.eval_metrics(section)
        varies = stage.training.eval_metrics_vary_with
        who = f"{tune.target} with {varies} {getattr(section, varies)}" if varies else tune.target
        for metric in tune.metrics:
            if metric not in reported:
                raise ValueError(f"tune.metric: no stage reports '{metric}'; {who} reports {', '.join(reported)}")
        return self

    def final_model(self) -> tuple[str, ModelArchitecture, str] | None:
        """The `transformers` class, sizes and manifest path of the pipeline's final model when the
        manifest decides them; None when it comes from a model folder read at run time."""
        finetune, pretrain = FINETUNE.section_of(self), PRETRAIN.section_of(self)
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
        return stages.order(self.spec)

    def stage_deps(self, name: str) -> tuple[str, ...]:
        """The stages whose outputs `name` reads; all of them come earlier in `stage_names()`."""
        return stages.inputs(self.spec, name)

    def section(self, stage: str) -> Any:
        """The manifest section of stage `stage` (None when the manifest has none)."""
        return getattr(self.spec, stages.get(stage).section, None)

    def local_paths(self) -> list[tuple[str, str]]:
        """(field, path) of every local file or folder the manifest names (object-store URIs are not)."""
        return [(f"spec.{stages.get(name).section}.{field}", path) for name in self.stage_names()
                for field, path in stages.get(name).local_paths(self.section(name))]

    def stage_keys(self, extra: Callable[[stages.Stage[Any, Any], Any], Any] | None = None) -> dict[str, str]:
        """Each stage's cache key, in execution order: a hash of its section and its inputs' keys, and of
        `extra(stage, section)` (the local executor's fingerprint of source files). Without `extra` (the
        operator, which cannot read them) a key changes exactly when the manifest changes the stage."""
        keys: dict[str, str] = {}
        for name in self.stage_names():
            section = self.section(name)
            inputs = {dep: keys[dep] for dep in self.stage_deps(name)}
            keys[name] = stage_key(name, section.model_dump(mode="json"), inputs,
                                   None if extra is None else extra(stages.get(name), section))
        return keys

    def __reduce__(self) -> tuple[Any, ...]:
        # The validating class is built at run time (pipeline_model); a pickle (Ray ships contexts to
        # trials) carries the document and validates it again on the other side.
        return _rebuild, (self.model_dump(mode="json", exclude_unset=True),)


def _rebuild(document: dict[str, Any]) -> ModelPipeline:
    return pipeline_model().model_validate(document)


_MODELS: dict[tuple[stages.Stage[Any, Any], ...], type[ModelPipeline]] = {}


def pipeline_model() -> type[ModelPipeline]:
    """The `ModelPipeline` model with a section for every registered stage: what manifests validate against."""
    key = tuple(stages.all_stages())
    if key not in _MODELS:
        sections: dict[str, Any] = {}
        for stage in key:
            if stage.required:
                sections[stage.section] = (stage.spec_type, ...)
            else:
                sections[stage.section] = (stage.spec_type | None, None)
        # After the stages, as it has always come last.
        sections["cluster"] = (ClusterSpec | None, Field(default=None, description=CLUSTER_DOC))
        spec = create_model("PipelineSpec", __base__=PipelineSpec, __module__=__name__, __doc__=None, **sections)
        _MODELS[key] = create_model(
            "ModelPipeline", __base__=ModelPipeline, __module__=__name__, __doc__=ModelPipeline.__doc__,
            spec=(spec, ...),
        )
    return _MODELS[key]


def json_schema() -> dict[str, Any]:
    """JSON Schema of the ModelPipeline manifest (the CRD's schema is derived from it)."""
    return pipeline_model().model_json_schema()
