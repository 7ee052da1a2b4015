"""`run(spec, ctx)`: quantize the pipeline's model, measure what it cost, and prove it serves.

* `dynamic-int8` runs here, in the training environment (PyTorch only).
* `w8a8-int8`, `w4a16` and `fp8` run llm-compressor in the separate quantize environment
  (kubeforge.envs): its pins cannot live next to vLLM's.

Both paths score perplexity on the same test sequences before and after quantizing (the gate),
and the artefact is then loaded and asked to generate in the engine that will serve it: the
transformers engine for `dynamic-int8`, vLLM for the compressed-tensors schemes. `w4a16` and `fp8`
need vLLM's GPU kernels, so without `use_gpu` that check is skipped and recorded as such.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from kubeforge import metrics as prometheus
from kubeforge.context import StageContext, StageOutput
from kubeforge.errors import KubeForgeError, StageError
from kubeforge.quantize.serving import require_servable, write_marker
from kubeforge.spec.quantize import CALIBRATED, SERVING_ENGINE, SUPPORTED_ARCHITECTURES, QuantizeSpec
from kubeforge.stages.data import DATA, DataResult
from kubeforge.stages.quantize import QUANTIZE, QuantizeResult
from kubeforge.stages.results import ModelResult

STAGE = QUANTIZE.name
CHECK_PROMPTS = 4
CHECK_PROMPT_TOKENS = 16


def _source_model(ctx: StageContext) -> tuple[Path, StageOutput[ModelResult]]:
    """The model to quantize: the pipeline's latest model's merged weights (fine-tuned, else pretrained)."""
    source = ctx.latest_model()
    if source is None:
        raise StageError(STAGE, "needs a model: the output of the finetune or pretrain stage")
    folder = source.result.model_dir
    if not folder:
        raise StageError(STAGE, f"the {source.name} stage left no merged model to quantize (method "
                                f"{getattr(source.result, 'method', None)!r}); fine-tune with lora or full")
    model_dir = source.directory / folder
    if not (model_dir / "config.json").is_file():
        raise StageError(STAGE, f"{model_dir} holds no config.json; rerun the {source.name} stage")
    return model_dir, source


def _check_architecture(spec: QuantizeSpec, model_dir: Path) -> str:
    """The manifest checks models it builds; a model folder named in it is checked here."""
    config = json.loads((model_dir / "config.json").read_text())
    architecture = (config.get("architectures") or ["unknown"])[0]
    supported = SUPPORTED_ARCHITECTURES[spec.scheme]
    if architecture not in supported:
        raise StageError(STAGE, f"quantize.scheme: {spec.scheme} does not support {architecture} "
                                f"({model_dir}); supported: {', '.join(supported)}")
    width = config.get("intermediate_size")
    if SERVING_ENGINE[spec.scheme] == "vllm" and isinstance(width, int) and width % 16:
        raise StageError(STAGE, f"quantize.scheme: vLLM's quantized kernels cannot serve {spec.scheme} for "
                                f"{model_dir}: its intermediate_size {width} is not a multiple of 16")
    return architecture


def _tokens(data: StageOutput[DataResult], split: str, count: int | None) -> np.ndarray:
    from kubeforge.engine.batches import TokenShards

    files = [data.directory / p for p in data.result.shards.get(split, [])]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise StageError(STAGE, f"the data stage's {split} shard {missing[0]} does not exist; rerun the data stage")
    shards = TokenShards(files)
    wanted = len(shards) if count is None else min(count, len(shards))
    return shards.rows(list(range(wanted))) if wanted else np.empty((0, shards.seq_len), dtype=np.int64)


def _inputs(spec: QuantizeSpec, data: StageOutput[DataResult]) -> tuple[np.ndarray | None, np.ndarray]:
    calibration = None
    if spec.scheme in CALIBRATED:
        calibration = _tokens(data, "train", None)
        if len(calibration) < spec.calibration_samples:
            raise StageError(
                STAGE,
                f"quantize.calibration_samples: {spec.calibration_samples} asked for, but the data stage's train "
                f"split holds {len(calibration)} sequences; lower it to at most {len(calibration)}",
            )
        calibration = calibration[: spec.calibration_samples]
    evaluation = _tokens(data, "test", spec.perplexity_batches * spec.batch_size)
    if not len(evaluation):
        evaluation = _tokens(data, "validation", spec.perplexity_batches * spec.batch_size)
    if not len(evaluation):
        raise StageError(STAGE, "the data stage has no test or validation sequences to measure perplexity on; "
                                "raise spec.data.packing.test_fraction")
    return calibration, evaluation


def _device(spec: QuantizeSpec) -> str:
    if not spec.use_gpu:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise StageError(STAGE, "spec.quantize.use_gpu: no CUDA device is visible; set use_gpu: false")
    return "cuda"


def quantize_model(spec: QuantizeSpec, model_dir: Path, out: Path, calibration: np.ndarray | None,
                   evaluation: np.ndarray, pad_id: int | None, device: str) -> dict[str, Any]:
    """Quantize `model_dir` into `out` and score perplexity before and after on `evaluation`
    (also what benchmarks/bench_quantize.py measures)."""
    if spec.scheme == "dynamic-int8":
        import torch
        from transformers import AutoModelForCausalLM

        from kubeforge.quantize.dynamic import load_dynamic_int8, quantize_dynamic_int8
        from kubeforge.quantize.perplexity import perplexity

        torch.manual_seed(0)
        before = perplexity(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), evaluation,
                            spec.batch_size, pad_id=pad_id)
        saved = quantize_dynamic_int8(model_dir, out)
        quantized, _ = load_dynamic_int8(out)
        after = perplexity(quantized, evaluation, spec.batch_size, pad_id=pad_id)
        return {**saved, "perplexity_before": before, "perplexity_after": after}

    from kubeforge.envs import QUANTIZE, run_in_env
    from kubeforge.quantize import llmc

    inputs = out.parent / "inputs"
    inputs.mkdir(exist_ok=True)
    np.save(inputs / "eval.npy", evaluation)
    calibration_file = None
    if calibration is not None:
        calibration_file = str(inputs / "calibration.npy")
        np.save(calibration_file, calibration)
    try:
        result = dict(run_in_env(
            QUANTIZE, llmc.quantize, str(model_dir), str(out), spec.scheme, calibration_file,
            str(inputs / "eval.npy"), spec.batch_size, spec.smoothing_strength, list(spec.ignore), device, pad_id,
        ))
    finally:
        shutil.rmtree(inputs, ignore_errors=True)
    write_marker(out, spec.scheme, str(result["format"]), llmcompressor=result.get("llmcompressor"),
                 compressed_tensors=result.get("compressed_tensors"))
    return result


def check_perplexity_gate(spec: QuantizeSpec, before: float, after: float) -> None:
    increase = after / before - 1
    if increase > spec.max_perplexity_increase:
        raise StageError(
            STAGE,
            f"quantize.max_perplexity_increase: {spec.scheme} raised test perplexity by {increase:.2%} "
            f"({before:.4g} -> {after:.4g}), above the {spec.max_perplexity_increase:.2%} allowed; calibrate with "
            "more samples, ignore more layers, or pick a wider scheme",
        )


def _serving_check(spec: QuantizeSpec, out: Path, evaluation: np.ndarray, tokenizer_dir: Path,
                   device: str, pad_id: int | None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from kubeforge.quantize.engines import check_transformers, check_vllm

    engine = SERVING_ENGINE[spec.scheme]
    try:
        require_servable(out, engine, device)
    except KubeForgeError as exc:
        # The manifest asked for an artefact to serve elsewhere (a GPU node): record why it is not checked here.
        return {"engine": engine, "skipped": f"{exc}; the load-and-generate check runs with use_gpu: true"}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompts = [str(tokenizer.decode(row[:CHECK_PROMPT_TOKENS].tolist())) for row in evaluation[:CHECK_PROMPTS]]
    # The same sequences as the gate, so the engine's perplexity is comparable with the quantizer's.
    if engine == "vllm":
        check = check_vllm(out, prompts, spec.check_max_new_tokens, evaluation, pad_id=pad_id)
    else:
        check = check_transformers(out, prompts, spec.check_max_new_tokens, evaluation, spec.batch_size,
                                   pad_id=pad_id)
    if check.generated_tokens == 0:
        raise StageError(STAGE, f"the quantized model in {out} loaded in {engine} but generated no tokens")
    return {
        "engine": engine,
        "generations": check.generations,
        "generated_tokens": check.generated_tokens,
        "tokens_per_second": check.tokens_per_second,
        "perplexity": check.perplexity,
        "seconds": check.seconds,
    }


def run(spec: QuantizeSpec, ctx: StageContext) -> QuantizeResult:
    from kubeforge.quantize.dynamic import weights_size

    data = ctx.require(DATA, "needs the output of the data stage (calibration and test sequences)")
    model_dir, source = _source_model(ctx)
    source_stage = source.name
    architecture = _check_architecture(spec, model_dir)
    calibration, evaluation = _inputs(spec, data)
    device = _device(spec)
    pad_id = data.result.special_tokens.get("pad_id")
    ctx.tracker.log_params({**spec.model_dump(mode="json"), "source_stage": source_stage,
                            "architecture": architecture})

    out = ctx.out_dir / "model"
    if out.exists():
        shutil.rmtree(out)  # an interrupted attempt's artefact: quantizing again is cheaper than trusting it
    ctx.reporter.log(f"{STAGE}: {spec.scheme} of {model_dir} ({architecture})"
                     + (f" with {len(calibration)} calibration sequences" if calibration is not None else ""))
    quantized = quantize_model(spec, model_dir, out, calibration, evaluation, pad_id, device)
    before, after = float(quantized["perplexity_before"]), float(quantized["perplexity_after"])
    increase = after / before - 1
    source_size = weights_size(model_dir)
    size = weights_size(out)
    size_ratio = size / source_size
    gauges = {"perplexity_before": before, "perplexity_after": after, "perplexity_increase": increase,
              "size_ratio": size_ratio}
    ctx.reporter.log(f"{STAGE}: perplexity {before:.4g} -> {after:.4g} ({increase:+.2%}), "
                     f"size {source_size / 1e6:.2f} MB -> {size / 1e6:.2f} MB ({size_ratio:.2f}x)")
    check_perplexity_gate(spec, before, after)
    check = _serving_check(spec, out, evaluation, model_dir, device, pad_id)
    if "tokens_per_second" in check:
        gauges["check_tokens_per_second"] = check["tokens_per_second"]
        ctx.reporter.log(f"{STAGE}: served by {check['engine']}: {check['generations'][0]!r} ...")
    else:
        ctx.reporter.log(f"{STAGE}: {check['skipped']}")
    summary = QuantizeResult(
        model_dir="model",
        scheme=spec.scheme,
        format=quantized["format"],
        architecture=architecture,
        source_stage=source_stage,
        source_model_dir=str(model_dir),
        source_method=source.result.lineage().method,
        calibration_samples=0 if calibration is None else len(calibration),
        perplexity_before=before,
        perplexity=after,
        perplexity_increase=increase,
        size_bytes=size,
        source_size_bytes=source_size,
        size_ratio=size_ratio,
        quantizer={k: v for k, v in quantized.items() if k not in ("perplexity_before", "perplexity_after")},
        check=check,
    )
    for name, value in gauges.items():
        prometheus.QUANTIZE_METRIC.labels(ctx.pipeline_name, spec.scheme, name).set(value)
    ctx.tracker.log_metrics(gauges)
    ctx.tracker.set_tags({"kubeforge.quantization": spec.scheme})
    ctx.tracker.log_artifact(out, "model")
    ctx.tracker.log_dict(summary.to_json(), "quantization.json")
    return summary
