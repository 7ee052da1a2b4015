"""What a registered version says of itself (tags written by `kubeforge.registry.lineage`)."""

from __future__ import annotations

import pytest

from tests.stage_fixtures import finetune_result

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("method", "model_dir", "adapter"), [
    ("lora", "merged", "adapter"),  # served merged, or as an adapter over its base (spec.lora)
    ("qlora", "merged", "adapter"),
    ("prefix", None, None),  # the adapter is the registered model itself, and vLLM has no prefix kernels
    ("full", "merged", None),
])
def test_only_lora_fine_tunings_register_an_adapter_to_serve_over_the_base(method, model_dir, adapter) -> None:
    result = finetune_result(method=method, model_dir=model_dir, adapter_dir="adapter" if method != "full" else None)
    lineage = result.lineage()
    assert lineage.lora_adapter == adapter
    assert lineage.format == ("hf" if model_dir else "peft-adapter")
