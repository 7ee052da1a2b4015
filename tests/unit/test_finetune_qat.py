"""Quantization-aware fine-tuning with torchao: what the spec refuses, that training sees exactly the
model that is served, and a tiny QAT run whose quantized folder the transformers serving engine loads."""

from __future__ import annotations

import asyncio
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from kubeforge.errors import StageError
from kubeforge.spec.finetune import FinetuneSpec, QATSettings

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore")]

TASK = {"builtin": "python-docstrings"}


def _llama(vocab: int = 256, tie: bool = True, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize(("section", "field"), [
    ({"method": "qlora", "qat": {}, "resources": {"use_gpu": True}}, "qat: only used with method 'full'"),
    ({"method": "lora", "qat": {}}, "qat: only used with method 'full'"),
    ({"method": "full", "qat": {"scheme": "4w"}}, "qat.scheme"),
    ({"method": "full", "qat": {"scheme": "8da8w", "group_size": 64}}, "group_size: only used with scheme '8da4w'"),
])
def test_the_spec_refuses_qat_it_cannot_train_or_convert(section: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field.replace("(", r"\(").replace(".", r"\.")):
        FinetuneSpec.model_validate({"task": TASK, **section})
    FinetuneSpec.model_validate({"task": TASK, "method": "full", "qat": {"scheme": "8da4w", "group_size": 64}})


def test_a_group_size_that_does_not_divide_a_layer_is_refused_naming_the_field() -> None:
    from kubeforge.finetune.qat import check_convertible

    with torch.device("meta"):
        model = _llama()
    check_convertible(QATSettings(scheme="8da4w", group_size=32), model)  # 64 and 128 wide inputs
    with pytest.raises(StageError, match=r"spec\.finetune\.qat\.group_size: 48 does not divide the input width 64"):
        check_convertible(QATSettings(scheme="8da4w", group_size=48), model)


@pytest.mark.parametrize("scheme", ["8da8w", "8da4w"])
@pytest.mark.parametrize("tie", [True, False])
def test_training_sees_exactly_the_model_that_is_converted(scheme: str, tie: bool) -> None:
    from torchao.quantization.qat import FakeQuantizedLinear

    from kubeforge.finetune import qat

    settings = QATSettings(scheme=scheme)  # type: ignore[arg-type]
    model = _llama(tie=tie).eval()
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        float_logits = model(input_ids=ids).logits
    qat.prepare(model, settings)
    fake = [name for name, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)]
    assert len(fake) == 14 + (0 if tie else 1)  # 7 per layer; a tied lm_head stays float and tied
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    with torch.no_grad():
        trained_logits = model(input_ids=ids).logits
    assert (trained_logits - float_logits).abs().max() > 1e-3  # the forward pass is fake-quantized
    plain = qat.without_fake_quantizers(model, settings)
    assert not any(isinstance(m, FakeQuantizedLinear) for m in plain.modules())
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, float_logits)  # weights untouched, unrounded
        quantized = qat.convert(plain, settings)
        converted = quantized(input_ids=ids).logits
    assert torch.equal(converted, trained_logits)
    qdata = quantized.model.layers[0].mlp.down_proj.weight.qdata
    low, high = (-8, 7) if scheme == "8da4w" else (-128, 127)
    assert int(qdata.min()) >= low and int(qdata.max()) <= high
    assert len(torch.unique(qdata)) > (16 if scheme == "8da8w" else 8)  # the grid is used, not a coarser one


def _base_folder(tmp_path: Path, tokenizer: Any) -> Path:
    folder = tmp_path / "base"
    model = _llama(vocab=len(tokenizer), tie=True)
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _examples(count: int, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (20,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 8 + ids[8:]})
    return out


def run_local(tmp_path: Path, tokenizer: Any, section: dict[str, Any], ewc_rows: Any = None) -> tuple[Any, Path]:
    """The fine-tuning recipe in this process on a tiny Llama; (session, final checkpoint folder)."""
    from kubeforge.engine.session import LocalSession
    from kubeforge.finetune.config import FinetuneLoop
    from kubeforge.finetune.recipe import FinetuneRecipe

    base = _base_folder(tmp_path, tokenizer)
    spec = FinetuneSpec.model_validate({
        "task": TASK, "method": "full", "replay_fraction": 0, "max_length": 32,
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0},
        "eval": {"every_steps": 4, "max_batches": 1}, "checkpoint": {"every_steps": 4}, **section,
    })
    config = FinetuneLoop(
        spec=spec, base_model_dir=str(base), student_path=None, task_dir=str(tmp_path),
        train_examples=_examples(16, len(tokenizer), 0), validation_examples=_examples(4, len(tokenizer), 1),
        dropped_examples=0, num_test_examples=0, pad_id=0, ewc_rows=ewc_rows,
    )
    session = LocalSession(keep_checkpoints=tmp_path / "kept")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        FinetuneRecipe(config, session).run()
    assert session.last_checkpoint is not None
    return session, session.last_checkpoint


def test_a_tiny_qat_run_ends_with_a_quantized_folder_the_transformers_engine_serves(
    tmp_path: Path, chat_tokenizer: Any
) -> None:
    from transformers import AutoModelForCausalLM

    from kubeforge.serve.hf_engine import TransformersServer

    _, checkpoint = run_local(tmp_path, chat_tokenizer, {"qat": {"scheme": "8da4w", "group_size": 32}})
    folder = checkpoint / "qat"
    assert (folder / "pytorch_model.bin").is_file() and (checkpoint / "merged" / "config.json").is_file()
    recorded = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert recorded["quant_method"] == "torchao", recorded
    assert recorded["quant_type"]["default"]["_data"]["weight_dtype"]["_data"] == "int4", recorded
    served = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert type(served.model.layers[0].mlp.down_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"

    # The serving engine itself (the Ray Serve deployment's class, without Ray).
    server = TransformersServer.func_or_class(
        str(folder), {"model": "m", "version": "1", "variant": "qat"}, {"dtype": "auto", "max_model_len": None},
    )

    async def generate() -> list[dict[str, Any]]:
        request = {"prompt": "def one():", "max_tokens": 6, "temperature": 0.0}
        return [event async for event in server.generate(request)]

    events = asyncio.run(generate())
    assert events[0]["type"] == "start" and events[-1]["type"] == "done", events
    assert events[-1]["completion_tokens"] >= 1, events


def test_the_fine_tuning_policy_trains_through_fake_quantization(tmp_path: Path, chat_tokenizer: Any) -> None:
    from torchao.quantization.qat import FakeQuantizedLinear

    from kubeforge.finetune.methods import build_models

    base = _base_folder(tmp_path, chat_tokenizer)
    for qat_section, expected in (({"qat": {"scheme": "8da8w"}}, 14), ({}, 0)):
        spec = FinetuneSpec.model_validate({"task": TASK, "method": "full", **qat_section})
        models = build_models(spec, base, None, torch.device("cpu"))
        assert sum(isinstance(m, FakeQuantizedLinear) for m in models.policy.modules()) == expected
