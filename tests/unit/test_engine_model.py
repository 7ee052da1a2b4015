"""Model construction from the spec: Llama for causal, BERT for mlm, sizes and defaults honoured."""

from __future__ import annotations

import pytest

from kubeforge.engine.model import build_model, count_parameters, default_intermediate_size
from kubeforge.spec.pretrain import PretrainSpec

pytestmark = pytest.mark.unit

SPECIAL = {"eos_id": 0, "pad_id": 1, "mask_id": 2, "unk_id": 3}


def test_intermediate_size_defaults() -> None:
    assert default_intermediate_size("mlm", 128) == 512
    # 8/3 x 128 = 341.3, rounded up to a multiple of 32.
    assert default_intermediate_size("causal", 128) == 352
    assert default_intermediate_size("causal", 96) == 256
    assert default_intermediate_size("causal", 64) == 192


def test_causal_builds_llama_with_the_spec_sizes() -> None:
    spec = PretrainSpec.model_validate({
        "model": {"hidden_size": 64, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
                  "max_position_embeddings": 96, "dropout": 0.1},
    })
    model = build_model(spec, vocab_size=300, special_tokens=SPECIAL)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (300, 64, 3)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.intermediate_size == 192
    assert config.max_position_embeddings == 96
    assert config.attention_dropout == 0.1
    assert (config.eos_token_id, config.pad_token_id) == (0, 1)
    # Tied: the output projection is the input embedding matrix, counted once.
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    embedding = 300 * 64
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 192 + 2 * 64  # q,o + k,v (2 kv heads of 16) + mlp + norms
    assert count_parameters(model) == embedding + 3 * per_layer + 64


def test_untied_embeddings_and_explicit_intermediate() -> None:
    spec = PretrainSpec.model_validate({
        "model": {"hidden_size": 32, "num_heads": 2, "intermediate_size": 100, "tie_word_embeddings": False},
    })
    model = build_model(spec, vocab_size=200, special_tokens=SPECIAL)
    assert model.config.intermediate_size == 100
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert model.config.num_key_value_heads == 2  # null means one per attention head


def test_mlm_builds_bert() -> None:
    spec = PretrainSpec.model_validate({
        "objective": "mlm", "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "dropout": 0.2},
    })
    model = build_model(spec, vocab_size=256, special_tokens=SPECIAL)
    config = model.config
    assert type(model).__name__ == "BertForMaskedLM"
    assert config.intermediate_size == 256
    assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob) == (0.2, 0.2)
    assert config.pad_token_id == 1
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_same_seed_same_weights() -> None:
    import torch

    spec = PretrainSpec.model_validate({"model": {"hidden_size": 32, "num_heads": 2}, "train": {"seed": 5}})
    first = build_model(spec, 100, SPECIAL).state_dict()
    second = build_model(spec, 100, SPECIAL).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
