"""PyTorch dynamic INT8 quantization, served on CPU by the transformers engine.

Every `torch.nn.Linear` becomes a `DynamicQuantizedLinear`: INT8 weights (per-tensor scale), with
activations quantized on the fly from each batch's range, so no calibration data is needed.

`torch.ao.quantization.quantize_dynamic` is deprecated in favour of torchao's `quantize_` (a
separate package, not installed here; its warning still says "will be removed in 2.10"), and torch
also deprecates quantized tensors themselves, but both still work in torch 2.13's CPU build. The
warnings are silenced and recorded in the folder's `kubeforge_quantization.json`, so that the torch
upgrade that removes them is easy to trace.

An output projection tied to the input embedding is left in float32: the embedding matrix must be
stored in float32 anyway for lookups, so keeping the tie costs nothing, while quantizing it unties
it and stores an extra INT8 copy. On the tiny test Llama (vocab 512, hidden 128) keeping it tied
gave 0.36x of the float size and +0.08% perplexity, quantizing it 0.40x and +0.10%. An untied
output projection is quantized like any other linear layer, since that does shrink the model.

The quantized model's state dict is saved as safetensors (`model_int8.safetensors`) next to the
original config, each INT8 weight as its integer values plus its scale and zero point. Not
`torch.save`: pickling a quantized weight looks its `torch.qscheme` up by scanning `sys.modules`
(the object has no `__module__`), and transformers 5 registers alias modules there whose attribute
lookup imports optional packages (torchvision), so saving failed in any process that had imported
enough of transformers. safetensors has no pickle, so loading runs no code either.
`load_dynamic_int8` rebuilds the float model from the config, applies the same swap and loads the
state dict strictly, which reproduces the saved model's logits exactly.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

from kubeforge.errors import KubeForgeError
from kubeforge.quantize.serving import MARKER, quantization_of, write_marker

SCHEME = "dynamic-int8"
FORMAT = "torch-dynamic-int8"
WEIGHTS_FILE = "model_int8.safetensors"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
# Everything a tokenizer may be saved as; config.json and generation_config.json are copied too.
TOKENIZER_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "spiece.model",
    "chat_template.*",
)


class UnsupportedArchitecture(KubeForgeError):
    """The model has nothing dynamic INT8 can quantize (no torch.nn.Linear layers)."""


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise KubeForgeError(f"{path} does not exist: {model_dir} is not a Hugging Face model folder")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise KubeForgeError(f"{path} is not valid JSON ({exc}); re-save the model") from exc
    if not isinstance(config, dict):
        raise KubeForgeError(f"{path} must hold a JSON object")
    return config


def _architecture(config: dict[str, Any], model_dir: Path) -> str:
    architectures = config.get("architectures") or []
    if not architectures or not isinstance(architectures[0], str):
        raise KubeForgeError(f"{Path(model_dir) / 'config.json'}: field 'architectures' is missing or empty; "
                             "save the model with save_pretrained from a *ForCausalLM or *ForMaskedLM class")
    return str(architectures[0])


def _auto_class(architecture: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForMaskedLM if architecture.endswith("ForMaskedLM") else AutoModelForCausalLM


def _targets(model: Any, architecture: str, model_dir: Path) -> tuple[list[str], list[str]]:
    """(names of the linear layers to quantize, names of linear layers kept in float32)."""
    import torch

    output = model.get_output_embeddings()
    inputs = model.get_input_embeddings()
    tied = output is not None and inputs is not None and output.weight is inputs.weight
    quantized: list[str] = []
    kept: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            (kept if tied and module is output else quantized).append(name)
    if not quantized:
        # Name what the model projects with instead, e.g. GPT-2's transformers Conv1D.
        kinds = sorted({type(m).__name__ for m in model.modules()
                        if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
                        and m is not inputs and m is not output})
        raise UnsupportedArchitecture(
            f"quantize.scheme: {SCHEME} cannot quantize {architecture} ({model_dir}): it has no torch.nn.Linear "
            f"layers to swap for INT8 ones" + (f" (its projections are {', '.join(kinds)})" if kinds else "")
            + "; use a supported architecture such as LlamaForCausalLM or BertForMaskedLM"
        )
    return quantized, kept


def _quantize(model: Any, names: list[str]) -> list[str]:
    """Swap the named linear layers in place; returns the warnings torch raised (its deprecation notices)."""
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # A name -> qconfig dict rather than {nn.Linear}: the same call must skip a tied lm_head.
        quantize_dynamic(model, dict.fromkeys(names, default_dynamic_qconfig), dtype=torch.qint8, inplace=True)
    notices: list[str] = []
    for warning in caught:
        line = str(warning.message).strip().splitlines()[0].strip()
        if line not in notices:
            notices.append(line)
    return notices


PACKED = "._packed_params._packed_params"
PACKED_DTYPE = "._packed_params.dtype"


def _flatten(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(plain tensors for safetensors, {tied key: key holding its tensor}).

    A quantized linear layer's packed (weight, bias) pair becomes `<layer>.weight` (its int8
    values), `<layer>.weight_scale`, `<layer>.weight_zero_point` and `<layer>.bias`. Tied
    parameters are stored once: safetensors refuses tensors that share memory.
    """
    import torch

    tensors: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in state.items():
        if key.endswith(PACKED_DTYPE):
            continue  # always torch.qint8; the rebuilt layer provides it
        if key.endswith(PACKED):
            prefix = key.removesuffix(PACKED)
            weight, bias = value
            if weight.qscheme() != torch.per_tensor_affine:
                raise ValueError(f"{prefix}: only per-tensor INT8 weights are saved, got {weight.qscheme()}")
            tensors[f"{prefix}.weight"] = weight.int_repr().contiguous()
            tensors[f"{prefix}.weight_scale"] = torch.tensor(weight.q_scale(), dtype=torch.float64)
            tensors[f"{prefix}.weight_zero_point"] = torch.tensor(weight.q_zero_point(), dtype=torch.int64)
            if bias is not None:
                tensors[f"{prefix}.bias"] = bias.detach().contiguous()
            continue
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                    tuple(value.stride()), value.dtype)
        if identity in seen and value.numel():
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        tensors[key] = value.detach().contiguous()
    return tensors, aliases


def _unflatten(tensors: dict[str, Any], aliases: dict[str, str], packed: list[str]) -> OrderedDict[str, Any]:
    """The inverse of `_flatten` for the quantized layers named in `packed`, as the rebuilt model's
    `load_state_dict` expects it."""
    import torch

    state = OrderedDict(tensors)
    for prefix in packed:
        weight = torch._make_per_tensor_quantized_tensor(
            state.pop(f"{prefix}.weight"), float(state.pop(f"{prefix}.weight_scale")),
            int(state.pop(f"{prefix}.weight_zero_point")),
        )
        state[prefix + PACKED] = (weight, state.pop(f"{prefix}.bias", None))
        state[prefix + PACKED_DTYPE] = torch.qint8
    for key, target in aliases.items():
        state[key] = state[target]
    return state


def quantize_dynamic_int8(model_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Quantize the model in `model_dir` and save it, its config and its tokenizer in `out_dir`."""
    import torch
    from safetensors.torch import save_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = _read_config(model_dir)
    architecture = _architecture(config, model_dir)
    model = _auto_class(architecture).from_pretrained(model_dir, dtype=torch.float32).eval()
    names, kept = _targets(model, architecture, model_dir)
    notices = _quantize(model, names)

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    for pattern in TOKENIZER_PATTERNS:
        for path in model_dir.glob(pattern):
            if path.is_file():
                shutil.copy2(path, out_dir / path.name)
    tensors, aliases = _flatten(model.state_dict())
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": FORMAT, "aliases": json.dumps(aliases)})
    write_marker(out_dir, SCHEME, FORMAT, torch=torch.__version__, architecture=architecture, weights=WEIGHTS_FILE,
                 quantized_modules=len(names), float_modules=kept, deprecations=notices)
    return {"size_bytes": (out_dir / WEIGHTS_FILE).stat().st_size, "format": FORMAT,
            "quantized_modules": len(names), "float_modules": kept}


def is_dynamic_int8(model_dir: Path) -> bool:
    """Whether `model_dir` holds a model saved by `quantize_dynamic_int8`."""
    marker = quantization_of(Path(model_dir))
    return marker is not None and marker.get("format") == FORMAT


def load_dynamic_int8(model_dir: Path) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a folder written by `quantize_dynamic_int8`.

    The tokenizer is None when the quantized folder holds none (neither did the source folder).
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    model_dir = Path(model_dir)
    marker = quantization_of(Path(model_dir))
    if marker is None or marker.get("format") != FORMAT:
        raise KubeForgeError(f"{model_dir / MARKER}: not a {FORMAT} model folder (missing file or other "
                             "format); quantize it with scheme dynamic-int8")
    weights = model_dir / str(marker.get("weights", WEIGHTS_FILE))
    if not weights.is_file():
        raise KubeForgeError(f"{weights} does not exist; quantize the model again")
    architecture = _architecture(_read_config(model_dir), model_dir)
    # The float weights are random here and replaced by the saved ones: only the shapes matter.
    model = _auto_class(architecture).from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    names, kept = _targets(model, architecture, model_dir)
    if kept != marker.get("float_modules", kept):
        raise KubeForgeError(f"{model_dir / MARKER}: field 'float_modules' is {marker.get('float_modules')}, "
                             f"but the config builds a model that keeps {kept} in float; quantize the model again")
    _quantize(model, names)
    with safe_open(str(weights), framework="pt") as file:
        aliases = json.loads((file.metadata() or {}).get("aliases", "{}"))
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (safe_open is not iterable)
    with warnings.catch_warnings():
        # Rebuilding quantized tensors goes through torch's deprecated qtensor constructors; the
        # notices were recorded when the folder was written.
        warnings.filterwarnings("ignore", message=".*quantiz.*")
        try:
            state = _unflatten(tensors, aliases, names)
            # Module versions travel as state-dict metadata; without them the quantized layers
            # take their pre-1.x loading path, which expects other keys.
            state._metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
            model.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError) as exc:
            raise KubeForgeError(f"{weights} does not match the model that {model_dir / 'config.json'} builds "
                                 f"({str(exc).splitlines()[0]}); quantize the model again") from exc
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    model.eval()
    has_tokenizer = any(path.is_file() for pattern in TOKENIZER_PATTERNS for path in model_dir.glob(pattern))
    return model, AutoTokenizer.from_pretrained(model_dir) if has_tokenizer else None


def weights_size(model_dir: Path) -> int:
    """Bytes of the weight files in a model folder (safetensors, dynamic INT8 included, and PyTorch .bin)."""
    model_dir = Path(model_dir)
    files = {path for pattern in WEIGHT_PATTERNS for path in model_dir.glob(pattern) if path.is_file()}
    if not files:
        raise KubeForgeError(f"{model_dir} holds no weight files ({', '.join(WEIGHT_PATTERNS)}); "
                             "is it a model folder?")
    return sum(path.stat().st_size for path in files)
