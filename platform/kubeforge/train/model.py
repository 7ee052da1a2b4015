"""Build the `transformers` model a `PretrainSpec` describes (Llama for causal, BERT for mlm)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from kubeforge.spec.pretrain import PretrainSpec

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
