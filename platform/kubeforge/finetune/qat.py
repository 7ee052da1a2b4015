"""Quantization-aware training with torchao (`spec.finetune.qat`), and the quantized model it ends with.

torchao's two-step QAT API: `quantize_(model, QATConfig(base, step="prepare"))` swaps every
targeted `torch.nn.Linear` for a `FakeQuantizedLinear` that rounds its weights and inputs to the
integer grid of `base` in the forward pass and lets the gradients through unchanged (straight-through
estimator); after training `QATConfig(base, step="convert")` swaps them back and quantizes them for
real with the same grid. `base` is `Int8DynamicActivationIntxWeightConfig`: INT8 per-token dynamic
activations with INT8 per-channel (`8da8w`) or INT4 per-group (`8da4w`) weights, the one family
whose fake quantization torchao infers for integer weights and whose converted tensors run on CPU.

Serving: the converted model is saved as a plain Hugging Face folder whose `config.json` carries a
`TorchAoConfig` (`quantization_config`), so `AutoModelForCausalLM.from_pretrained` (the transformers
engine's load path, `kubeforge.serve.hf_engine`) rebuilds torchao's quantized tensors and runs them.
The weights are `pytorch_model.bin` (torch.save), not safetensors: transformers 5.19's
`save_pretrained` cannot save torchao 0.18's tensor subclasses at all (its shared-storage check asks
their storage for a data pointer: "Attempted to access the data pointer on an invalid python
storage"), while its loader reads the pickled ones and reproduces the logits exactly.

An output projection tied to the input embedding is neither fake-quantized nor converted (as the
quantize stage's dynamic-int8 does): the embedding stays in float for lookups, so quantizing the tie
only adds a copy.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubeforge.errors import StageError
from kubeforge.spec.finetune import QATSettings

if TYPE_CHECKING:
    import torch

STAGE = "finetune"
QAT_SUBDIR = "qat"
WEIGHTS_FILE = "pytorch_model.bin"


def base_config(settings: QATSettings) -> Any:
    """The torchao configuration whose grid training fakes and the conversion applies."""
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if settings.scheme == "8da8w":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4,  # type: ignore[attr-defined]  # torch>=2.3, not in its stubs
        weight_granularity=PerGroup(settings.group_size)
    )


def quantized_layers(model: torch.nn.Module) -> list[str]:
    """Names of the linear layers QAT trains and converts: all but an output projection tied to the embedding."""
    import torch

    output: Any = model.get_output_embeddings()  # type: ignore[operator]
    inputs: Any = model.get_input_embeddings()  # type: ignore[operator]
    tied = output is not None and inputs is not None and output.weight is inputs.weight
    return [
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not (tied and module is output)
    ]


def check_convertible(settings: QATSettings, model: torch.nn.Module) -> None:
    """Refuse, before training, a scheme torchao cannot convert this model to (works on a meta model)."""
    names = quantized_layers(model)
    if not names:
        raise StageError(STAGE, "spec.finetune.qat: the model has no torch.nn.Linear layers for torchao to quantize")
    if settings.scheme != "8da4w":
        return
    modules = dict(model.named_modules())
    widths = sorted({int(modules[name].in_features) for name in names})
    bad = [w for w in widths if w % settings.group_size]
    if bad:
        raise StageError(
            STAGE, f"spec.finetune.qat.group_size: {settings.group_size} does not divide the input width "
            f"{bad[0]} of some linear layers (widths: {', '.join(map(str, widths))}); torchao's 8da4w groups "
            "each row's inputs, so pick a group size that divides them all",
        )


def _filter(names: list[str]) -> Any:
    wanted = set(names)
    return lambda module, fqn: fqn in wanted


def prepare(model: torch.nn.Module, settings: QATSettings) -> torch.nn.Module:
    """Swap the targeted linear layers for torchao's fake-quantized ones, in place."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    check_convertible(settings, model)
    quantize_(model, QATConfig(base_config(settings), step="prepare"), filter_fn=_filter(quantized_layers(model)))
    return model


def is_prepared(model: torch.nn.Module) -> bool:
    from torchao.quantization.qat import FakeQuantizedLinear

    return any(isinstance(m, FakeQuantizedLinear) for m in model.modules())


def without_fake_quantizers(model: torch.nn.Module, settings: QATSettings) -> torch.nn.Module:
    """A CPU float32 copy of a prepared model with plain linear layers: the trained weights unrounded."""
    import torch
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    plain = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    names = [name for name, m in plain.named_modules() if isinstance(m, FakeQuantizedLinear)]
    # A convert without a base configuration only swaps FakeQuantizedLinear back to torch.nn.Linear.
    quantize_(plain, QATConfig(step="convert"), filter_fn=_filter(names))
    return plain


def convert(plain: torch.nn.Module, settings: QATSettings) -> torch.nn.Module:
    """Quantize a plain copy in place with the grid training faked (torchao tensors: INT weights + scales)."""
    from torchao.quantization import quantize_

    quantize_(plain, base_config(settings), filter_fn=_filter(quantized_layers(plain)))
    return plain


def save_quantized(quantized: torch.nn.Module, settings: QATSettings, target: Path) -> None:
    """A Hugging Face folder that `from_pretrained` loads back into the same quantized model."""
    import torch
    from transformers import TorchAoConfig

    target.mkdir(parents=True, exist_ok=True)
    model_config: Any = quantized.config
    model_config.quantization_config = TorchAoConfig(base_config(settings))
    model_config.use_cache = True
    model_config.save_pretrained(str(target))
    generation: Any = getattr(quantized, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(target))
    torch.save(quantized.state_dict(), target / WEIGHTS_FILE)
