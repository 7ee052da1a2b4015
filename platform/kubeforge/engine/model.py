"""The models the stages train and score: built from a `model` section (Llama for causal, BERT for
mlm), and loaded back from a fine-tuning stage's output."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubeforge.errors import StageError
from kubeforge.spec.finetune import LoraSettings
from kubeforge.spec.pretrain import PretrainSpec
from kubeforge.stages.finetune import FINETUNE, FinetuneResult

if TYPE_CHECKING:
    from transformers import PreTrainedModel


MLP_MULTIPLE = 32


def default_intermediate_size(objective: str, hidden_size: int) -> int:
    """Feed-forward width when the spec leaves it null.

    BERT uses 4 x hidden. Llama's gated MLP has three matrices instead of two, so 8/3 x hidden keeps
    the parameter count of a 4 x hidden two-matrix MLP; rounded up to a multiple of 32 because
    matmuls with such widths are faster on every backend, and because vLLM's CPU INT8 kernel needs
    the fused gate/up projection (2 x intermediate) to fill whole 32-column blocks.
    """
    if objective == "mlm":
        return 4 * hidden_size
    return MLP_MULTIPLE * math.ceil(8 * hidden_size / 3 / MLP_MULTIPLE)


def intermediate_size(spec: PretrainSpec) -> int:
    return spec.model.intermediate_size or default_intermediate_size(spec.objective, spec.model.hidden_size)


def build_config(spec: PretrainSpec, vocab_size: int, special_tokens: Mapping[str, int | None]) -> object:
    """The `transformers` config; special ids come from the data stage's tokenizer."""
    arch = spec.model
    pad_id = special_tokens.get("pad_id")
    eos_id = special_tokens.get("eos_id")
    if spec.objective == "mlm":
        from transformers import BertConfig

        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=arch.hidden_size,
            num_hidden_layers=arch.num_layers,
            num_attention_heads=arch.num_heads,
            intermediate_size=intermediate_size(spec),
            max_position_embeddings=arch.max_position_embeddings,
            hidden_dropout_prob=arch.dropout,
            attention_probs_dropout_prob=arch.dropout,
            # Packed shards have no sentence pairs: one segment type is all the model needs.
            type_vocab_size=1,
            pad_token_id=pad_id if pad_id is not None else 0,
            tie_word_embeddings=arch.tie_word_embeddings,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads or arch.num_heads,
        intermediate_size=intermediate_size(spec),
        max_position_embeddings=arch.max_position_embeddings,
        # Llama has no hidden-state dropout; attention dropout is the one place the knob applies.
        attention_dropout=arch.dropout,
        pad_token_id=pad_id,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=arch.tie_word_embeddings,
    )


def build_model(spec: PretrainSpec, vocab_size: int, special_tokens: Mapping[str, int | None]) -> PreTrainedModel:
    """A freshly initialised model: LlamaForCausalLM for `causal`, BertForMaskedLM for `mlm`."""
    import torch
    from transformers import BertForMaskedLM, LlamaForCausalLM

    config = build_config(spec, vocab_size, special_tokens)
    # Same initial weights on every worker and on every rerun with the same seed.
    torch.manual_seed(spec.train.seed)
    if spec.objective == "mlm":
        return BertForMaskedLM(config)
    return LlamaForCausalLM(config)


def count_parameters(model: object) -> int:
    """Unique parameters: tied input and output embeddings count once."""
    return sum(p.numel() for p in model.parameters())  # type: ignore[attr-defined]


def load_for_inference(stage_dir: Path, result: FinetuneResult, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of a finished fine-tuning stage, in eval mode on `device`.

    The merged model when there is one (a plain `transformers` model); otherwise (prefix tuning) the
    base model with the adapter on top through `PeftModel.from_pretrained`. The tokenizer comes with
    the output and carries the chat template the model was trained with.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any
    if result.model_dir:
        folder = stage_dir / result.model_dir
        model = AutoModelForCausalLM.from_pretrained(str(folder))
    elif result.adapter_dir:
        from peft import PeftModel

        folder = stage_dir / result.adapter_dir
        base = AutoModelForCausalLM.from_pretrained(result.base_model_dir)
        model = PeftModel.from_pretrained(base, str(folder))
    else:
        raise StageError(FINETUNE.name, f"the fine-tuning output in {stage_dir} has neither model_dir nor adapter_dir")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model.to(device)
    model.eval()
    return model, tokenizer


def with_lora(model: Any, lora: LoraSettings, task_type: str) -> Any:
    """`model` with peft LoRA adapters on `lora.target_modules` (`task_type`: peft's CAUSAL_LM, SEQ_CLS...)."""
    from peft import LoraConfig, TaskType, get_peft_model

    return get_peft_model(model, LoraConfig(
        task_type=TaskType[task_type], r=lora.rank, lora_alpha=lora.alpha,  # type: ignore[arg-type]
        lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
    ))


def check_lora_targets(model_dir: Path, target_modules: tuple[str, ...], stage: str, field: str) -> None:
    """LoRA target modules the model folder lacks, found without loading its weights (on a stage's driver)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    missing = [m for m in target_modules if m not in available]
    if missing:
        raise StageError(stage, f"{field}: {', '.join(missing)} not among the base model's linear layers "
                                f"({', '.join(available)})")
