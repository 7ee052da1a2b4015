"""`spec.pretrain`: distributed pretraining of a model from scratch with Ray Train."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from kubeforge.spec.base import StrictModel

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class ModelArchitecture(StrictModel):
    """Size of the model built from a `transformers` config (Llama for causal, BERT for mlm)."""

    hidden_size: PositiveInt = 128
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 2
    num_kv_heads: PositiveInt | None = None
    """Grouped-query attention heads (Llama only); null means one per attention head."""
    intermediate_size: PositiveInt | None = None
    """Feed-forward width; null means 4 x hidden_size for BERT and 8/3 x hidden_size for Llama."""
    max_position_embeddings: PositiveInt = 512
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelArchitecture:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size must be divisible by num_heads (got {self.hidden_size} and {self.num_heads})"
            )
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads must be divisible by num_kv_heads (got {self.num_heads} and {self.num_kv_heads})"
            )
        return self


class TrainSettings(StrictModel):
    """Optimisation: AdamW with linear warmup then cosine decay."""

    lr: PositiveFloat = 1e-3
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    """The cosine schedule ends at lr x min_lr_ratio."""
    warmup_steps: Annotated[int, Field(ge=0)] = 20
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    grad_clip: PositiveFloat | None = 1.0
    """Clip the global gradient norm to this; null disables clipping."""
    max_steps: PositiveInt = 200
    """Optimizer steps (each one covers grad_accum_steps micro-batches on every worker)."""
    batch_size: PositiveInt = 8
    """Sequences per micro-batch on each worker."""
    grad_accum_steps: PositiveInt = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: bf16 autocast on GPUs that support it, fp32 otherwise (always fp32 on CPU)."""
    activation_checkpointing: bool = False
    seed: int = 0


class EvalSettings(StrictModel):
    every_steps: PositiveInt = 50
    """Compute validation loss and perplexity every this many optimizer steps (and at the end)."""
    max_batches: PositiveInt = 20
    """Validation micro-batches per evaluation, per worker."""


class CheckpointSettings(StrictModel):
    every_steps: PositiveInt = 50
    keep: PositiveInt = 2
    """Number of most recent checkpoints kept on disk."""


class Resources(StrictModel):
    workers: PositiveInt = 2
    """Ray Train workers (one data-parallel rank each)."""
    cpus_per_worker: PositiveFloat = 1.0
    use_gpu: bool = False
    """One GPU per worker; NCCL instead of gloo."""


class MLMSettings(StrictModel):
    mask_probability: Annotated[float, Field(gt=0, lt=1)] = 0.15


class PretrainSpec(StrictModel):
    """The pretraining stage: Ray Train `TorchTrainer` over the packed shards of the data stage."""

    hyperparameters_from: Literal["tune"] | None = None
    """Take the best configuration of the `tune` stage (which must target `pretrain`) over these settings."""
    objective: Literal["causal", "mlm"] = "causal"
    """`causal`: Llama architecture, next-token prediction. `mlm`: BERT, masked language modelling."""
    model: ModelArchitecture = ModelArchitecture()
    train: TrainSettings = TrainSettings()
    eval: EvalSettings = EvalSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    resources: Resources = Resources()
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """`fsdp` shards parameters, gradients and optimizer state across the workers' GPUs, one
    transformer layer at a time; it needs resources.use_gpu and 2 workers or more."""
    max_failures: Annotated[int, Field(ge=0)] = 3
    """Worker failures Ray Train recovers from (restarting from the last checkpoint) before giving up."""
    mlm: MLMSettings | None = None
    """Masking settings; only with objective `mlm` (which uses 15% masking when this is omitted)."""

    @model_validator(mode="after")
    def _consistent(self) -> PretrainSpec:
        if self.strategy == "fsdp" and not self.resources.use_gpu:
            raise ValueError("strategy 'fsdp' needs resources.use_gpu: true (use 'ddp' on CPU)")
        if self.strategy == "fsdp" and self.resources.workers < 2:
            raise ValueError(
                f"strategy 'fsdp' shards the model across resources.workers, and {self.resources.workers} "
                "worker has nothing to shard it across: use strategy 'ddp' or 2 workers or more"
            )
        if self.mlm is not None and self.objective != "mlm":
            raise ValueError(f"mlm settings are only used with objective 'mlm' (got objective '{self.objective}')")
        if self.model.num_kv_heads is not None and self.objective == "mlm":
            raise ValueError("model.num_kv_heads applies to the Llama (causal) architecture only")
        return self

    @property
    def mask_probability(self) -> float:
        return (self.mlm or MLMSettings()).mask_probability
