"""Quantization schemes against the unquantized model: size, perplexity and serving throughput ratios.

For each scheme, side by side in one run on the same model and the same test sequences:

* **size ratio**: bytes of the quantized weights over the unquantized model's (safetensors fp32);
* **perplexity change**: test-split perplexity after / before - 1, as the quantize stage gates it;
* **throughput ratio**: generated tokens per second of the quantized model over the unquantized one
  *in the same engine* (transformers for `dynamic-int8`, vLLM for the compressed-tensors schemes),
  greedy, the same prompts, the same number of new tokens. `w4a16` and `fp8` need vLLM's CUDA
  kernels, so on a CPU machine their throughput is not measured (shown as n/a).

The model is the quickstart's pretrained one: the benchmark runs the quickstart's data and pretrain
sections through the executor in `--workdir`, so after `make demo` (same work directory) both are
reused and nothing trains. Quantizations run exactly as the quantize stage runs them: `dynamic-int8`
in-process, the llm-compressor schemes in the quantize environment (`.venv-quantize`).

    .venv/bin/python benchmarks/bench_quantize.py --workdir .kubeforge
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from common import REPO, pretrained_model

SCHEMES = ("dynamic-int8", "w8a8-int8", "w4a16", "fp8")


def split_tokens(data: Any, split: str, count: int) -> np.ndarray:
    from kubeforge.engine.batches import TokenShards

    shards = TokenShards([data.directory / p for p in data.result.shards[split]])
    return shards.rows(list(range(min(count, len(shards)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".kubeforge")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--eval-sequences", type=int, default=160)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from kubeforge.quantize.dynamic import weights_size
    from kubeforge.quantize.engines import check_transformers, check_vllm
    from kubeforge.quantize.stage import quantize_model
    from kubeforge.runtime import ensure_ray
    from kubeforge.spec.quantize import CALIBRATED, SERVES_ON_CPU, SERVING_ENGINE, QuantizeSpec

    ensure_ray(None, None)
    model_dir, data = pretrained_model(args.workdir, "bench_quantize")
    pad_id = data.result.special_tokens.get("pad_id")
    calibration = split_tokens(data, "train", args.calibration_samples)
    evaluation = split_tokens(data, "test", args.eval_sequences)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [str(tokenizer.decode(row[:16].tolist())) for row in split_tokens(data, "validation", args.prompts)]
    base_size = weights_size(model_dir)

    def throughput(engine: str, folder: Path) -> float:
        if engine == "vllm":
            return check_vllm(folder, prompts, args.new_tokens, None).tokens_per_second
        return check_transformers(folder, prompts, args.new_tokens, None, 8).tokens_per_second

    baseline: dict[str, float] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in args.schemes:
            work = Path(tmp) / scheme
            work.mkdir()
            out = work / "model"
            # GPTQ's 128-column groups do not divide the 352-wide down projection: it stays unquantized.
            ignore = ["lm_head", "re:.*down_proj$"] if scheme == "w4a16" else ["lm_head"]
            spec = QuantizeSpec(scheme=scheme, calibration_samples=len(calibration), batch_size=8, ignore=ignore)
            measured = quantize_model(spec, model_dir, out, calibration if scheme in CALIBRATED else None,
                                      evaluation, pad_id, "cpu")
            engine = SERVING_ENGINE[scheme]
            row: dict[str, Any] = {
                "scheme": scheme, "engine": engine, "size_ratio": weights_size(out) / base_size,
                "perplexity_before": measured["perplexity_before"], "perplexity_after": measured["perplexity_after"],
            }
            row["perplexity_change"] = row["perplexity_after"] / row["perplexity_before"] - 1
            if scheme not in SERVES_ON_CPU and not torch.cuda.is_available():
                row["throughput_ratio"] = None
            else:
                if engine not in baseline:
                    baseline[engine] = throughput(engine, model_dir)
                row["tokens_per_second"] = throughput(engine, out)
                row["baseline_tokens_per_second"] = baseline[engine]
                row["throughput_ratio"] = row["tokens_per_second"] / baseline[engine]
            rows.append(row)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; model {model_dir} "
          f"({base_size / 1e6:.2f} MB); {len(evaluation)} test sequences, {args.prompts} prompts x "
          f"{args.new_tokens} new tokens")
    print("| scheme | engine | size ratio | perplexity before → after | change | throughput ratio (tokens/s) |")
    print("|---|---|---:|---|---:|---|")
    for row in rows:
        ratio = row["throughput_ratio"]
        speed = "n/a (CUDA kernels only)" if ratio is None else (
            f"{ratio:.2f}x ({row['tokens_per_second']:.0f} vs {row['baseline_tokens_per_second']:.0f})")
        print(f"| {row['scheme']} | {row['engine']} | {row['size_ratio']:.3f} | {row['perplexity_before']:.2f} → "
              f"{row['perplexity_after']:.2f} | {row['perplexity_change']:+.2%} | {speed} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
