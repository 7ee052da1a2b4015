"""Load a model in the engine that will serve it, generate from it, and measure what it costs there.

The quantize stage runs these checks on its artefact (a quantized model is only useful if its
serving engine loads it), and the benchmark uses them to compare throughput across formats.
Both engines decode greedily, so their generations are comparable, and both score perplexity on
the same token rows: the transformers engine with `kubeforge.quantize.perplexity`, vLLM from its
prompt log-probabilities.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kubeforge.errors import KubeForgeError

# vLLM sizes its scheduler for max_model_len; models advertise up to 128k positions, far beyond
# what the checks need and what a 1 GiB CPU KV cache holds for one sequence of a 7B model.
VLLM_MAX_MODEL_LEN = 2048
# vLLM on CPU: the engine core in this process (no extra worker process to spawn and clean up),
# and a KV cache small enough for laptops; callers that set either keep their value.
VLLM_CPU_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Exit)\b(?::.*)?$")
_PYDANTIC_NOISE = re.compile(r"\s*\[type=.*$")


@dataclass
class EngineCheck:
    engine: str
    """"transformers" or "vllm"."""
    generations: list[str]
    """The greedy continuation of each prompt, special tokens removed."""
    generated_tokens: int
    """New tokens over all prompts, each row counted up to and including its end-of-sequence token."""
    tokens_per_second: float
    """Generation throughput over the batch of prompts (generated tokens / timed generate call)."""
    perplexity: float | None
    """exp of the mean next-token cross-entropy on the eval tokens, computed in this engine."""
    seconds: float
    """The whole check: loading, a warm-up pass, generation and scoring."""


def _generated_lengths(new_tokens: Any, eos_ids: set[int]) -> list[int]:
    lengths = []
    for row in new_tokens.tolist():
        ends = [i for i, token in enumerate(row) if token in eos_ids]
        lengths.append(ends[0] + 1 if ends else len(row))
    return lengths


def check_transformers(model_dir: Path, prompts: list[str], max_new_tokens: int, eval_tokens: np.ndarray | None,
                       batch_size: int, pad_id: int | None = None) -> EngineCheck:
    """Greedy generation and perplexity with the transformers engine on CPU, float32 or dynamic INT8."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubeforge.quantize.dynamic import is_dynamic_int8, load_dynamic_int8
    from kubeforge.quantize.perplexity import perplexity

    start = time.perf_counter()
    model_dir = Path(model_dir)
    if is_dynamic_int8(model_dir):
        model, tokenizer = load_dynamic_int8(model_dir)
        if tokenizer is None:
            raise KubeForgeError(f"{model_dir} holds no tokenizer files; copy the source model's tokenizer there "
                                 "before quantizing")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not model.can_generate():
        raise KubeForgeError(f"{model_dir}: {type(model).__name__} does not generate text; the transformers "
                             "engine check needs a causal language model")

    # Decoder-only models continue from the last position, so a batch of prompts is padded on the left.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    settings = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=2, **settings)  # warm-up: prefill and one decode step
        generate_start = time.perf_counter()
        output = model.generate(**batch, max_new_tokens=max_new_tokens, **settings)
        generate_seconds = time.perf_counter() - generate_start
    new_tokens = output[:, batch["input_ids"].shape[1]:]
    lengths = _generated_lengths(new_tokens, eos_ids)
    generations = [tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
                   for row, n in zip(new_tokens, lengths, strict=True)]

    score = None
    if eval_tokens is not None and len(eval_tokens):
        score = perplexity(model, eval_tokens, batch_size, pad_id=pad_id)
    generated = sum(lengths)
    return EngineCheck("transformers", generations, generated, generated / max(generate_seconds, 1e-9), score,
                       time.perf_counter() - start)


def _vllm_lengths(model_dir: Path, eval_tokens: np.ndarray | None) -> tuple[int, int | None]:
    """(max_model_len, how many tokens of each eval row vLLM can score, None for all).

    Scoring a row's prompt log-probabilities asks vLLM for one generated token too, so a row needs
    max_model_len >= its length + 1; rows as long as the model's context are scored without their
    last token.
    """
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise KubeForgeError(f"{path} cannot be read ({exc}); {model_dir} is not a Hugging Face model folder") from exc
    limit = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    limit = int(limit) if limit else VLLM_MAX_MODEL_LEN
    needed = int(eval_tokens.shape[1]) + 1 if eval_tokens is not None and len(eval_tokens) else 0
    length = min(limit, max(VLLM_MAX_MODEL_LEN, needed))
    return length, (length - 1 if needed > length else None)


def _error_line(text: str) -> str | None:
    """What went wrong: the last 'SomethingError: ...' line of a traceback, with the detail lines that
    follow it (pydantic's ValidationError, which vLLM raises for a bad config, puts the reason there)."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    for index in range(len(lines) - 1, -1, -1):
        if _ERROR_LINE.match(lines[index]):
            detail = []
            for line in lines[index + 1:]:
                if not line[0].isspace():  # log lines written after the traceback
                    break
                if not line.strip().startswith("For further information"):
                    detail.append(_PYDANTIC_NOISE.sub("", line.strip()))
            message = " ".join([lines[index], *detail])
            return message if len(message) <= 500 else message[:497] + "..."
    return lines[-1].strip() if lines else None


def check_vllm(model_dir: Path, prompts: list[str], max_new_tokens: int, eval_tokens: np.ndarray | None,
               dtype: str = "bfloat16", timeout_s: float = 600, pad_id: int | None = None) -> EngineCheck:
    """Greedy generation and perplexity in vLLM, run in a child process (see `vllm_probe`).

    Perplexity is exp(-mean log-probability of each eval row's tokens 1..L-1), the same quantity as
    `kubeforge.quantize.perplexity` computes; rows as long as the model's context lose their last
    token (see `_vllm_lengths`).
    """
    import kubeforge

    start = time.perf_counter()
    model_dir = Path(model_dir).resolve()
    max_model_len, keep = _vllm_lengths(model_dir, eval_tokens)
    rows = None
    if eval_tokens is not None and len(eval_tokens):
        rows = np.asarray(eval_tokens)[:, :keep].astype(np.int64).tolist()
    request = {"model": str(model_dir), "dtype": dtype, "max_model_len": max_model_len, "prompts": list(prompts),
               "max_new_tokens": max_new_tokens, "eval_tokens": rows, "pad_id": pad_id}

    env = dict(os.environ)
    for name, value in VLLM_CPU_ENV.items():
        env.setdefault(name, value)
    # The child imports this package from wherever this process found it, installed or not.
    package_root = str(Path(kubeforge.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)

    with tempfile.TemporaryDirectory(prefix="kubeforge-vllm-") as tmp:
        request_file, result_file = Path(tmp) / "request.json", Path(tmp) / "result.json"
        stdout_file, stderr_file = Path(tmp) / "stdout.log", Path(tmp) / "stderr.log"
        request_file.write_text(json.dumps(request))
        with stdout_file.open("wb") as stdout, stderr_file.open("wb") as stderr:
            # A session of its own, so that a timeout can stop vLLM together with anything it started.
            child = subprocess.Popen(
                [sys.executable, "-m", "kubeforge.quantize.vllm_probe", str(request_file), str(result_file)],
                stdout=stdout, stderr=stderr, env=env, start_new_session=True,
            )
            try:
                code = child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                raise KubeForgeError(f"vLLM did not load and score {model_dir} within {timeout_s:.0f} s; "
                                     "raise the timeout or check the model size against this machine") from None
        if code != 0 or not result_file.is_file():
            stderr_text = stderr_file.read_text(errors="replace")
            line = _error_line(stderr_text) or _error_line(stdout_file.read_text(errors="replace"))
            how = f"exit code {code}" if code >= 0 else f"killed by signal {-code}"
            raise KubeForgeError(f"vLLM could not serve {model_dir} ({how}): {line or 'no error output'}")
        result = json.loads(result_file.read_text())

    score = None
    if result["logprob_count"]:
        score = math.exp(-result["logprob_sum"] / result["logprob_count"])
    generated = int(result["generated_tokens"])
    return EngineCheck("vllm", list(result["generations"]), generated,
                       generated / max(float(result["generation_seconds"]), 1e-9), score,
                       time.perf_counter() - start)
