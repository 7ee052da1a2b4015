"""QLoRA on a CUDA GPU (skipped without one): the 4-bit base trains its adapters, and the merged
model (adapters folded into the dequantized 4-bit weights) computes what the trained model did."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubeforge.spec.finetune import FinetuneSpec

pytestmark = [pytest.mark.integration, pytest.mark.gpu]

QLORA: dict[str, Any] = {
    "method": "qlora",
    "qlora": {"quant_type": "nf4", "double_quant": True},
    "task": {"builtin": "python-docstrings", "max_examples": 120},
    "max_length": 128,
    "train": {"max_steps": 20, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2},
    "eval": {"every_steps": 10, "max_batches": 2},
    "checkpoint": {"every_steps": 10, "keep": 1},
    "resources": {"workers": 1, "use_gpu": True},
}


def test_qlora_trains_4bit_adapters_and_merges_into_a_plain_model(tiny_lm) -> None:
    pytest.importorskip("bitsandbytes", reason="qlora needs the gpu extra (bitsandbytes)")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from kubeforge.finetune.stage import run

    ctx = tiny_lm.context("finetune", QLORA, "qlora-gpu")
    result = run(FinetuneSpec.model_validate(QLORA), ctx)
    print(json.dumps(result.to_json()))
    assert result.val_loss < result.initial_val_loss
    assert result.trainable_share < 0.05
    assert result.model_dir == "merged" and result.adapter_dir == "adapter"

    merged = AutoModelForCausalLM.from_pretrained(str(ctx.out_dir / "merged")).to("cuda").eval()
    quantized = AutoModelForCausalLM.from_pretrained(
        result.base_model_dir, device_map={"": 0}, dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
    )
    trained = PeftModel.from_pretrained(quantized, str(ctx.out_dir / "adapter")).eval()
    input_ids = (torch.arange(3, 67).reshape(2, 32) % 500 + 4).to("cuda")
    with torch.no_grad():
        expected = trained(input_ids=input_ids).logits.float()
        got = merged(input_ids=input_ids).logits.float()
    # bf16 compute in the 4-bit model vs fp32 in the merged one: close, not equal.
    assert torch.allclose(got, expected, atol=0.1, rtol=0.05)
