"""Dynamic INT8 quantization and the serving-engine checks, on the session's tiny trained Llama.

vLLM runs twice in this file (about 20-30 s each on a 2-core machine): on the unquantized model, where
its bf16 perplexity must agree with the float32 transformers one, and on a folder it must refuse.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kubeforge.errors import KubeForgeError
from kubeforge.quantize.dynamic import (
    WEIGHTS_FILE,
    UnsupportedArchitecture,
    is_dynamic_int8,
    load_dynamic_int8,
    quantize_dynamic_int8,
    weights_size,
)
from kubeforge.quantize.engines import _error_line, check_transformers, check_vllm
from kubeforge.quantize.perplexity import perplexity
from kubeforge.quantize.serving import MARKER
from tests.stage_fixtures import TinyLM

pytestmark = pytest.mark.integration

PROMPT_TOKENS = 16
MAX_NEW_TOKENS = 16
BATCH_SIZE = 8


@pytest.fixture(scope="module")
def model_dir(tiny_lm: TinyLM) -> Path:
    return tiny_lm.pretrain.directory / tiny_lm.pretrain.result.model_dir


@pytest.fixture(scope="module")
def pad_id(tiny_lm: TinyLM) -> int | None:
    return tiny_lm.data.result.special_tokens.get("pad_id")


@pytest.fixture(scope="module")
def eval_tokens(tiny_lm: TinyLM) -> np.ndarray:
    from kubeforge.engine.batches import TokenShards, validation_batches

    shards = TokenShards([tiny_lm.data.directory / p for p in tiny_lm.data.result.shards["test"]])
    return np.concatenate(validation_batches(shards, 0, 1, BATCH_SIZE, 4))


@pytest.fixture(scope="module")
def prompts(model_dir: Path, eval_tokens: np.ndarray) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [str(tokenizer.decode(row[:PROMPT_TOKENS].tolist())) for row in eval_tokens[:4]]


@pytest.fixture(scope="module")
def quantized(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dynamic-int8") / "model"
    return out, quantize_dynamic_int8(model_dir, out)


def test_dynamic_int8_round_trips_smaller_and_nearly_as_good(
    model_dir: Path, quantized: tuple[Path, dict], eval_tokens: np.ndarray, pad_id: int | None
) -> None:
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic
    from transformers import AutoModelForCausalLM

    out, result = quantized
    assert result["format"] == "torch-dynamic-int8"
    assert result["size_bytes"] == (out / WEIGHTS_FILE).stat().st_size == weights_size(out)
    # The tied lm_head stays float32 and tied: the embedding is stored in float32 anyway.
    assert result["float_modules"] == ["lm_head"]
    assert {"config.json", "tokenizer.json", MARKER} <= {p.name for p in out.iterdir()}
    assert is_dynamic_int8(out) and not is_dynamic_int8(model_dir)
    ratio = weights_size(out) / weights_size(model_dir)
    print(f"\ndynamic-int8 size {weights_size(model_dir)} -> {weights_size(out)} bytes ({ratio:.3f}x)")
    assert ratio < 0.5

    float_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    before = perplexity(float_model, eval_tokens, BATCH_SIZE, pad_id=pad_id)
    in_memory = quantize_dynamic(
        float_model,
        {name: default_dynamic_qconfig for name, module in float_model.named_modules()
         if isinstance(module, torch.nn.Linear) and name != "lm_head"},
        dtype=torch.qint8,
    )
    loaded, tokenizer = load_dynamic_int8(out)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    assert isinstance(loaded.model.layers[0].mlp.gate_proj, torch.ao.nn.quantized.dynamic.Linear)
    batch = torch.from_numpy(eval_tokens[:4])
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, in_memory(batch).logits)
    after = perplexity(loaded, eval_tokens, BATCH_SIZE, pad_id=pad_id)
    print(f"dynamic-int8 perplexity {before:.4f} -> {after:.4f} ({after / before - 1:+.3%})")
    assert after / before - 1 < 0.03
    assert tokenizer.get_vocab()


def test_encoder_models_round_trip(tmp_path: Path) -> None:
    import torch
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    result = quantize_dynamic_int8(tmp_path / "bert", tmp_path / "int8")
    assert result["float_modules"] == ["cls.predictions.decoder"]
    model, _ = load_dynamic_int8(tmp_path / "int8")
    assert type(model).__name__ == "BertForMaskedLM"
    with torch.no_grad():
        assert model(torch.arange(8)[None]).logits.shape == (1, 8, 64)


def test_check_transformers_generates_from_dynamic_int8(
    quantized: tuple[Path, dict], prompts: list[str], eval_tokens: np.ndarray, pad_id: int | None
) -> None:
    out, _ = quantized
    check = check_transformers(out, prompts, MAX_NEW_TOKENS, eval_tokens, BATCH_SIZE, pad_id=pad_id)
    print(f"\ntransformers dynamic-int8: {check.tokens_per_second:.1f} tokens/s, perplexity {check.perplexity:.4f}, "
          f"{check.seconds:.1f} s, {check.generations[0]!r}")
    assert check.engine == "transformers"
    assert len(check.generations) == len(prompts) and all(check.generations)
    assert 0 < check.generated_tokens <= len(prompts) * MAX_NEW_TOKENS
    assert check.tokens_per_second > 0
    assert check.perplexity is not None and check.perplexity > 1


def test_check_vllm_agrees_with_transformers(
    model_dir: Path, prompts: list[str], eval_tokens: np.ndarray, pad_id: int | None
) -> None:
    reference = check_transformers(model_dir, prompts, MAX_NEW_TOKENS, eval_tokens, BATCH_SIZE, pad_id=pad_id)
    check = check_vllm(model_dir, prompts, MAX_NEW_TOKENS, eval_tokens, pad_id=pad_id)
    assert reference.perplexity is not None and check.perplexity is not None
    print(f"\nvllm bf16: {check.tokens_per_second:.1f} tokens/s, perplexity {check.perplexity:.4f}, {check.seconds:.1f} s"
          f"\ntransformers fp32: {reference.tokens_per_second:.1f} tokens/s, perplexity {reference.perplexity:.4f}"
          f"\ngenerations vllm {check.generations!r}\n            hf   {reference.generations!r}")
    assert check.engine == "vllm"
    assert len(check.generations) == len(prompts) and all(check.generations)
    assert 0 < check.generated_tokens <= len(prompts) * MAX_NEW_TOKENS
    assert abs(check.perplexity / reference.perplexity - 1) < 0.05


def test_model_without_linear_layers_is_refused(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    # GPT-2's blocks project with transformers' Conv1D; its only nn.Linear is the tied lm_head.
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(UnsupportedArchitecture, match=r"dynamic-int8 cannot quantize GPT2LMHeadModel .*Conv1D"):
        quantize_dynamic_int8(tmp_path / "gpt2", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert issubclass(UnsupportedArchitecture, KubeForgeError)


def test_vllm_error_line_extraction() -> None:
    # What vLLM 0.32 writes for a folder with truncated weights, followed by a log line; a failed
    # vLLM launch costs ~20 s here, so the extraction is checked on its recorded output.
    stderr = (
        "Traceback (most recent call last):\n"
        '  File "vllm/engine/arg_utils.py", line 2838, in create_engine_config\n'
        "    config = VllmConfig(\n"
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for VllmConfig\n"
        "  Value error, Unterminated string starting at: line 1 column 958 (char 957) [type=value_error, "
        "input_value=ArgsKwargs((), {}), input_type=ArgsKwargs]\n"
        "    For further information visit https://errors.pydantic.dev/2.14/v/value_error\n"
        "(MainProcess pid=1) INFO 11-22 12:34:30 [core.py:402] shutting down\n"
    )
    assert _error_line(stderr) == (
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for VllmConfig "
        "Value error, Unterminated string starting at: line 1 column 958 (char 957)"
    )
    assert _error_line("Traceback:\n  File x\nRuntimeError: boom\n") == "RuntimeError: boom"
