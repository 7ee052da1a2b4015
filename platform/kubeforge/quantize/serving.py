"""Which engine serves a quantized artefact, and refusing to serve it where its kernels do not exist."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubeforge.errors import KubeForgeError
from kubeforge.spec.quantize import SERVES_ON_CPU, SERVING_ENGINE

MARKER = "kubeforge_quantization.json"
"""Written next to the weights of every quantized model: scheme, format and serving engine."""


def write_marker(model_dir: Path, scheme: str, fmt: str, **extra: Any) -> None:
    info = {"scheme": scheme, "format": fmt, "engine": SERVING_ENGINE[scheme],
            "serves_on_cpu": scheme in SERVES_ON_CPU, **extra}
    (model_dir / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def quantization_of(model_dir: Path) -> dict[str, Any] | None:
    """The marker's content, or None for an unquantized model."""
    path = model_dir / MARKER
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise KubeForgeError(f"{path} is not valid JSON ({exc}); quantize the model again") from exc
    if not isinstance(info, dict) or "scheme" not in info:
        raise KubeForgeError(f"{path} does not say which scheme quantized the model; quantize the model again")
    return info


def require_servable(model_dir: Path, engine: str, device: str, dtype: str = "auto") -> None:
    """Raise a clear error when `engine` on `device` ("cpu" or "cuda") cannot serve this artefact with
    activations of `dtype` (the deployment's `engine.dtype`)."""
    info = quantization_of(model_dir)
    if info is None:
        return
    scheme = str(info["scheme"])
    if scheme == "w8a8-int8" and device == "cpu" and dtype == "float32":
        # vLLM starts, then its engine fails on the first request ("expect A to be bfloat16 or half").
        raise KubeForgeError(f"engine.dtype: float32, but {model_dir} is quantized with {scheme}, whose CPU kernels "
                             "in vLLM take bfloat16 or float16 activations; use dtype auto or bfloat16")
    wanted = SERVING_ENGINE[scheme]
    if engine != wanted:
        raise KubeForgeError(f"{model_dir} is quantized with {scheme}, which the {wanted} engine serves, not {engine}")
    if device == "cpu" and scheme not in SERVES_ON_CPU:
        cpu = sorted(SERVES_ON_CPU)
        raise KubeForgeError(
            f"{model_dir} is quantized with {scheme}, which vLLM serves only with CUDA kernels; serve it on a GPU, "
            f"or quantize with {' or '.join(cpu)} for CPU serving"
        )
