"""The finetune stage: a trained model fine-tuned on a task with Ray Train (SFT, DPO or distillation)."""

from __future__ import annotations

from dataclasses import dataclass

from kubeforge.spec.finetune import FinetuneSpec
from kubeforge.stages import Metric, PodSize, Stage, Training
from kubeforge.stages.results import ModelLineage, ModelResult

EVAL_METRICS: dict[str, tuple[str, ...]] = {
    "sft": ("val_loss", "val_perplexity"),
    "distill": ("val_loss", "val_perplexity"),
    "dpo": ("val_loss", "reward_accuracy", "reward_margin"),
}
"""What every evaluation reports besides `step`, by objective."""


@dataclass(frozen=True)
class FinetuneResult(ModelResult):
    model_dir: str | None
    """`merged`: a plain model folder (not for prefix tuning, whose prefixes cannot be merged)."""
    adapter_dir: str | None
    """`adapter`: the PEFT adapter (lora, qlora, prefix)."""
    task_dir: str
    """The task's splits; `test.jsonl` there is held out for the evaluate stage."""
    base_model_dir: str
    objective: str
    method: str
    trainable_parameters: int
    total_parameters: int
    trainable_share: float
    initial_val_loss: float
    val_loss: float
    final_step: int
    train_loss: float
    tokens_per_second: float
    tokens_seen: int
    resumed_from_step: int
    restored_from_steps: list[int]
    num_train_examples: int
    num_validation_examples: int
    num_test_examples: int
    dropped_examples: int
    """Examples whose prompt alone fills max_length."""
    workers: int
    val_perplexity: float | None = None
    initial_val_perplexity: float | None = None
    reward_accuracy: float | None = None
    """DPO: the share of held-out pairs whose chosen answer the model prefers."""
    reward_margin: float | None = None
    initial_reward_accuracy: float | None = None
    initial_reward_margin: float | None = None
    merge_note: str | None = None
    qat_dir: str | None = None
    """`qat` (with spec.finetune.qat): the torchao-quantized model, a folder the transformers engine loads."""
    qat_scheme: str | None = None

    def model_artifact(self) -> str | None:
        return self.model_dir or self.adapter_dir

    def lineage(self) -> ModelLineage:
        # Only LoRA adapters can be served over their base (vLLM has no prefix-tuning kernels).
        adapter = self.adapter_dir if self.method in ("lora", "qlora") else None
        return ModelLineage(method=f"{self.objective}-{self.method}", format="hf" if self.model_dir else "peft-adapter",
                            lora_adapter=adapter)


FINETUNE: Stage[FinetuneSpec, FinetuneResult] = Stage(
    name="finetune",
    section="finetune",
    spec_type=FinetuneSpec,
    result_type=FinetuneResult,
    run="kubeforge.finetune.stage:run",
    # The corpus (built-in tasks, replay) and the pretrained model when no base_model is given.
    reads=("data", "pretrain"),
    pod_size=lambda spec: PodSize.of_workers(spec.resources),
    local_paths=lambda spec: [(field, path) for field, path in (
        ("task.path", spec.task.path), ("base_model", spec.base_model),
        ("distill.student_path", spec.distill.student_path if spec.distill is not None else None),
    ) if path is not None],
    model_role="finetuned",
    metrics=(
        Metric("val_loss", lower_is_better=True), Metric("val_perplexity", lower_is_better=True),
        Metric("reward_accuracy"), Metric("reward_margin"),
    ),
    training=Training(
        loop_config="kubeforge.finetune.stage:loop_config",
        recipe="kubeforge.finetune.recipe:FinetuneRecipe",
        eval_metrics=lambda spec: EVAL_METRICS[spec.objective],
        eval_metrics_vary_with="objective",
    ),
)
