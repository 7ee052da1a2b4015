"""Quantization with llm-compressor, written as compressed-tensors for vLLM.

Runs in the quantize environment (infra/envs/quantize.txt), called through
`kubeforge.envs.run_in_env(QUANTIZE, quantize, ...)`: besides the standard library it imports only
what that environment has (numpy, torch, transformers, datasets, llmcompressor, compressed_tensors)
and kubeforge's dependency-free modules (errors, quantize.perplexity). Heavy imports stay inside the
functions so that the driver, which imports this module only to name the function, pays nothing.

Arguments and the result are plain values (paths, numbers, strings): they cross between
interpreters with different numpy and torch builds.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from kubeforge.errors import StageError

SCHEMES = ("w8a8-int8", "w4a16", "fp8")
CALIBRATED = frozenset({"w8a8-int8", "w4a16"})
"""GPTQ (and SmoothQuant) need calibration activations; fp8 uses dynamic activation scales."""

# Copied verbatim rather than re-saved through this environment's transformers: the folder is
# loaded by the main environment's (newer) transformers and vLLM, and must tokenize exactly as the
# unquantized model did.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)

STAGE = "quantize"


def environment() -> dict[str, str | None]:
    """Versions of this interpreter and of the libraries that shape the artefact (for lineage)."""
    versions: dict[str, str | None] = {"python": sys.version.split()[0], "executable": sys.executable}
    for name in ("torch", "transformers", "llmcompressor", "compressed-tensors", "numpy"):
        try:
            versions[name.replace("-", "_")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name.replace("-", "_")] = None
    return versions


def quantize(
    model_dir: str,
    out_dir: str,
    scheme: str,
    calibration: str | None,
    eval_tokens: str,
    batch_size: int,
    smoothing_strength: float,
    ignore: list[str],
    device: str = "cpu",
    pad_id: int | None = None,
) -> dict[str, Any]:
    """Quantize the Hugging Face model in `model_dir` with `scheme` into `out_dir` (compressed-tensors).

    `calibration` and `eval_tokens` are .npy files of [N, L] token ids. Perplexity on `eval_tokens`
    is measured before and after, on the same in-memory model (after: with llm-compressor's fake
    quantization, i.e. the quantized weights and activations the artefact encodes). `seconds` is the
    time of llm-compressor's oneshot alone.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubeforge.quantize.perplexity import perplexity

    if scheme not in SCHEMES:
        raise StageError(STAGE, f"scheme {scheme!r} is not an llm-compressor scheme; use one of {', '.join(SCHEMES)}")
    source = Path(model_dir)
    if not (source / "config.json").is_file():
        raise StageError(STAGE, f"{source}: no config.json; model_dir must be a saved Hugging Face model folder")
    if not (source / "tokenizer_config.json").is_file():
        raise StageError(STAGE, f"{source}: no tokenizer_config.json; llm-compressor needs the model's tokenizer there")
    eval_array = _load_tokens(eval_tokens, "eval_tokens")
    calibration_array = None
    if scheme in CALIBRATED:
        if calibration is None:
            raise StageError(STAGE, f"scheme {scheme} calibrates GPTQ: pass calibration (a .npy of token ids)")
        calibration_array = _load_tokens(calibration, "calibration")

    model: Any = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    before = perplexity(model, eval_array, batch_size, device=device, pad_id=pad_id)

    _quiet_llmcompressor()
    recipe = _recipe(scheme, smoothing_strength, ignore)
    dataset_args: dict[str, Any] = {}
    if calibration_array is not None:
        dataset_args = {
            "dataset": _calibration_dataset(calibration_array, pad_id),
            "max_seq_length": int(calibration_array.shape[1]),
            "num_calibration_samples": int(calibration_array.shape[0]),
            # The caller chose these samples; shuffling would only make the result depend on a seed.
            "shuffle_calibration_samples": False,
        }
    from llmcompressor import oneshot

    started = time.perf_counter()
    # No output_dir: saving is done below, so that the tokenizer files are copied, not re-written.
    # No log_dir: llm-compressor 0.14 then writes no log file anywhere (nothing lands in the cwd).
    try:
        oneshot(model=model, processor=tokenizer, recipe=recipe, **dataset_args)
    except ValueError as exc:
        _raise_if_indivisible(scheme, exc)
        raise
    seconds = time.perf_counter() - started
    after = perplexity(model, eval_array, batch_size, device=device, pad_id=pad_id)

    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(target), save_compressed=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)

    versions = environment()
    return {
        "scheme": scheme,
        "format": "compressed-tensors",
        "perplexity_before": before,
        "perplexity_after": after,
        "size_bytes": sum(path.stat().st_size for path in target.glob("*.safetensors")),
        "seconds": seconds,
        "llmcompressor": versions["llmcompressor"],
        "compressed_tensors": versions["compressed_tensors"],
        "calibration_samples": 0 if calibration_array is None else int(calibration_array.shape[0]),
    }


def _quiet_llmcompressor() -> None:
    """Ray forwards the worker's console to the driver's, and llm-compressor logs every lifecycle step
    at INFO, two lines per GPTQ layer at its METRIC level (38, between WARNING and ERROR) and a
    "No accelerator available!" warning per step on CPU: hundreds of lines on a real model.

    Its own environment variable still overrides. Called before anything imports llm-compressor
    (it configures its logger on import) and reconfigured, because a reused Ray worker imported it
    in an earlier call.
    """
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    # Set, it silences llm-compressor's warning that it sets it (our data set needs no tokenizing).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from llmcompressor import configure_logger

    configure_logger()


def _recipe(scheme: str, smoothing_strength: float, ignore: list[str]) -> list[Any]:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    if scheme == "w8a8-int8":
        # SmoothQuant first: it moves activation outliers into the weights, which INT8 activations
        # cannot represent but GPTQ's weight quantization then absorbs.
        return [
            SmoothQuantModifier(smoothing_strength=smoothing_strength),
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=list(ignore)),
        ]
    if scheme == "w4a16":
        return [GPTQModifier(targets="Linear", scheme="W4A16", ignore=list(ignore))]
    return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=list(ignore))]


def _raise_if_indivisible(scheme: str, exc: ValueError) -> None:
    """llm-compressor's check that grouped weight quantization (W4A16: groups of 128 input columns)
    fits each layer, restated as what to change in the manifest."""
    message = str(exc)
    if "not divisible by group_size" not in message:
        return
    layers = [line.strip()[2:] for line in message.splitlines() if line.strip().startswith("- ")]
    raise StageError(
        STAGE,
        f"scheme {scheme} quantizes weights in groups of input columns, and these layers' widths are not a "
        f"multiple of the group size: {'; '.join(layers)}. Add them to quantize.ignore (a name, or a pattern "
        "such as 're:.*down_proj$'), or use a model whose widths (intermediate_size) are multiples of 128",
    ) from exc


def _load_tokens(path: str, name: str) -> Any:
    import numpy as np

    file = Path(path)
    if not file.is_file():
        raise StageError(STAGE, f"{name}: {file} does not exist")
    array = np.load(file)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] < 2:
        raise StageError(STAGE, f"{name}: {file} must hold a non-empty [N, L] array, L >= 2; got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise StageError(STAGE, f"{name}: {file} must hold integer token ids, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _calibration_dataset(tokens: Any, pad_id: int | None) -> Any:
    import numpy as np
    from datasets import Dataset

    mask = np.ones_like(tokens) if pad_id is None else (tokens != pad_id).astype(np.int64)
    return Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": mask.tolist()})
