"""The quantize stage's perplexity gate, on its own numbers."""

from __future__ import annotations

import pytest

from kubeforge.errors import StageError
from kubeforge.quantize.stage import check_perplexity_gate
from kubeforge.spec.quantize import QuantizeSpec

pytestmark = pytest.mark.unit


def test_the_gate_allows_up_to_its_limit_and_names_the_setting_beyond_it() -> None:
    spec = QuantizeSpec(scheme="w8a8-int8")  # 3% by default
    check_perplexity_gate(spec, 100.0, 102.9)
    check_perplexity_gate(spec, 100.0, 95.0)  # quantization may even help: never a failure
    with pytest.raises(StageError) as info:
        check_perplexity_gate(spec, 100.0, 103.5)
    assert info.value.message.startswith(
        "quantize.max_perplexity_increase: w8a8-int8 raised test perplexity by 3.50% (100 -> 103.5), above the "
        "3.00% allowed"
    )
    check_perplexity_gate(QuantizeSpec(scheme="w8a8-int8", max_perplexity_increase=0.05), 100.0, 103.5)
