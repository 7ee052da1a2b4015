"""`spec.finetune`: adapt a trained model to a task (SFT, DPO or distillation) with full or PEFT training."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from kubeforge.spec.base import StrictModel
from kubeforge.spec.pretrain import CheckpointSettings, EvalSettings, ModelArchitecture, Resources, TrainSettings

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class LoraSettings(StrictModel):
    """Low-rank adapters (peft `LoraConfig`); also the adapters that `qlora` trains."""

    rank: PositiveInt = 8
    alpha: PositiveFloat = 16
    """Scaling: the adapter's update is multiplied by alpha / rank."""
    dropout: Fraction = 0.05
    target_modules: Annotated[tuple[str, ...], Field(min_length=1)] = ("q_proj", "v_proj")
    """Names of the linear layers that get adapters (for the Llama models: q_proj, k_proj, v_proj, o_proj,
    gate_proj, up_proj, down_proj)."""


class QLoraSettings(StrictModel):
    """4-bit quantization of the frozen base model (bitsandbytes; CUDA only)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    """Quantize the quantization constants too (saves about 0.4 bit per parameter)."""


class PrefixSettings(StrictModel):
    """Prefix tuning: trained key/value prefixes in every layer (peft `PrefixTuningConfig`)."""

    num_virtual_tokens: PositiveInt = 16
    projection: bool = False
    """Reparameterise the prefixes through a two-layer MLP (prefix tuning as first published);
    off trains them directly in every layer, as P-Tuning v2 does."""


class TaskSpec(StrictModel):
    """Training examples: a built-in task or a JSONL file (exactly one)."""

    builtin: Literal["python-docstrings"] | None = None
    """`python-docstrings`: write a function of the standard-library corpus from its signature and
    docstring (for `dpo`: the real function is preferred over a corrupted copy)."""
    path: str | None = None
    """JSONL, relative to the manifest: `instruction`/`input`/`output` records for `sft` and `distill`,
    `prompt`/`chosen`/`rejected` for `dpo`."""
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    """Share of examples held out for evaluation; the split is by function (or by record content), so no
    example appears in both."""
    max_examples: PositiveInt | None = None
    """Use at most this many examples (after the split, from the training side); null means all."""
    seed: int = 0

    @model_validator(mode="after")
    def _exactly_one(self) -> TaskSpec:
        if (self.builtin is None) == (self.path is None):
            raise ValueError("set exactly one of builtin and path")
        return self


class DPOSettings(StrictModel):
    beta: PositiveFloat = 0.1
    """Strength of the implicit KL penalty towards the reference (the model before fine-tuning)."""


class DistillSettings(StrictModel):
    """The fine-tuning base is the teacher; the student is a new, smaller model or an existing one."""

    temperature: PositiveFloat = 2.0
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.5
    """Loss = alpha x KL(teacher || student at temperature) x T^2 + (1 - alpha) x cross-entropy."""
    student: ModelArchitecture | None = None
    """Architecture of a new student, trained from scratch on the teacher's tokenizer."""
    student_path: str | None = None
    """An existing Hugging Face model folder (relative to the manifest) to use as the student; its
    tokenizer must equal the teacher's."""

    @model_validator(mode="after")
    def _one_student(self) -> DistillSettings:
        if (self.student is None) == (self.student_path is None):
            raise ValueError("set exactly one of student and student_path")
        return self


class QATSettings(StrictModel):
    """Quantization-aware training (torchao): the linear layers train through fake quantization of
    their weights and inputs, and the run ends with a quantized model folder (`qat/`) that the
    transformers engine loads and serves on CPU."""

    scheme: Literal["8da8w", "8da4w"] = "8da8w"
    """`8da8w`: INT8 dynamic per-token activations and INT8 per-channel weights. `8da4w`: INT8 dynamic
    per-token activations and INT4 weights in groups of `group_size` input features (stored one
    value per byte by torchao's CPU layout, so the folder is not smaller than `8da8w`'s)."""
    group_size: PositiveInt = 32
    """`8da4w` only: input features that share one weight scale; must divide every quantized layer's
    input width."""

    @model_validator(mode="after")
    def _group_size_for_int4(self) -> QATSettings:
        if self.scheme == "8da8w" and "group_size" in self.model_fields_set:
            raise ValueError("group_size: only used with scheme '8da4w' (8da8w scales each output channel)")
        return self


class EWCSettings(StrictModel):
    """Elastic weight consolidation: a penalty strength/2 x sum_i F_i (theta_i - theta*_i)^2 that holds the
    parameters the pretraining corpus is most sensitive to near their values before fine-tuning."""

    strength: PositiveFloat = 1000.0
    """lambda in the penalty lambda/2 x sum_i F_i (theta_i - theta*_i)^2."""
    samples: PositiveInt = 64
    """Rows of the data stage's train shards whose per-row squared gradients, averaged, estimate the
    diagonal Fisher information F (one backward pass each, before the first step)."""


def _needs_full(section: str, method: str) -> str:
    if section == "qat":
        why = {
            "qlora": "qlora's base weights are already 4-bit bitsandbytes tensors, which torchao cannot "
                     "fake-quantize or convert",
        }.get(method, f"{method} freezes the base weights, while QAT trains the weights that get quantized "
                      "(fake-quantizing a frozen layer under an adapter does not model the merged weight)")
    else:
        why = (f"{method} trains adapters that start at zero, not the pretrained weights EWC anchors; "
               "the Fisher information of the pretraining corpus is a property of those weights")
    return f"{section}: only used with method 'full' ({why}); got method '{method}'"


FINETUNE_TRAIN_DEFAULTS = TrainSettings(lr=3e-4, max_steps=100, warmup_steps=10, weight_decay=0.0)


class FinetuneSpec(StrictModel):
    """The fine-tuning stage: Ray Train over the task's examples, starting from a trained model."""

    base_model: str | None = None
    """A Hugging Face model folder (relative to the manifest); null means the pretrain stage's model."""
    hyperparameters_from: Literal["tune"] | None = None
    """Take the best configuration of the `tune` stage (which must target `finetune`) over these settings."""
    objective: Literal["sft", "dpo", "distill"] = "sft"
    """`sft`: supervised instruction tuning. `dpo`: direct preference optimisation. `distill`: train a
    student on the base model's (the teacher's) logits plus the task's labels."""
    method: Literal["full", "lora", "qlora", "prefix"] = "lora"
    lora: LoraSettings | None = None
    """Adapter settings for `lora` and `qlora` (defaults when omitted)."""
    qlora: QLoraSettings | None = None
    """4-bit settings for `qlora` (defaults when omitted)."""
    prefix: PrefixSettings | None = None
    """Prefix settings for `prefix` (defaults when omitted)."""
    task: TaskSpec
    replay_fraction: Fraction = 0.1
    """Share of each batch drawn from the pretraining corpus, to limit forgetting (0 disables replay)."""
    ewc: EWCSettings | None = None
    """Elastic weight consolidation towards the base model, with the Fisher information estimated on the
    data stage's corpus (method full only); combines with replay."""
    qat: QATSettings | None = None
    """Quantization-aware training with torchao (method full only); null trains in full precision."""
    max_length: PositiveInt = 256
    """Examples are truncated to this many tokens (at most the model's max_position_embeddings)."""
    dpo: DPOSettings | None = None
    """DPO settings (defaults when omitted); only with objective `dpo`."""
    distill: DistillSettings | None = None
    """Teacher/student settings; required with objective `distill`."""
    train: TrainSettings = FINETUNE_TRAIN_DEFAULTS
    eval: EvalSettings = EvalSettings(every_steps=25, max_batches=10)
    checkpoint: CheckpointSettings = CheckpointSettings(every_steps=25)
    resources: Resources = Resources()
    max_failures: Annotated[int, Field(ge=0)] = 3

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneSpec:
        adapters = {"lora": ("lora", "qlora"), "qlora": ("qlora",), "prefix": ("prefix",)}
        for section, methods in adapters.items():
            if getattr(self, section) is not None and self.method not in methods:
                raise ValueError(
                    f"{section}: only used with method {' or '.join(methods)} (got method '{self.method}')"
                )
        if self.method == "qlora" and not self.resources.use_gpu:
            raise ValueError(
                "method: 'qlora' needs 4-bit CUDA kernels (bitsandbytes): set resources.use_gpu: true, "
                "or use method 'lora' on CPU"
            )
        for section in ("qat", "ewc"):
            if getattr(self, section) is not None and self.method != "full":
                raise ValueError(_needs_full(section, self.method))
        if self.ewc is not None and self.objective == "distill":
            raise ValueError(
                "ewc: objective 'distill' trains a student whose starting weights are not the pretrained ones "
                "EWC holds the model near; use replay_fraction to limit forgetting instead"
            )
        if self.dpo is not None and self.objective != "dpo":
            raise ValueError(f"dpo: only used with objective 'dpo' (got objective '{self.objective}')")
        if self.objective == "distill":
            if self.distill is None:
                raise ValueError("distill: objective 'distill' needs distill.student or distill.student_path")
            if self.method != "full":
                raise ValueError(
                    f"method: objective 'distill' trains a whole student, use 'full' (got '{self.method}')"
                )
        elif self.distill is not None:
            raise ValueError(f"distill: only used with objective 'distill' (got objective '{self.objective}')")
        return self

    @property
    def lora_settings(self) -> LoraSettings:
        return self.lora or LoraSettings()

    @property
    def qlora_settings(self) -> QLoraSettings:
        return self.qlora or QLoraSettings()

    @property
    def prefix_settings(self) -> PrefixSettings:
        return self.prefix or PrefixSettings()

    @property
    def dpo_settings(self) -> DPOSettings:
        return self.dpo or DPOSettings()
