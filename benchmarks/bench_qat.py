"""Quantization-aware training against post-training quantization at the same torchao scheme.

Same base model (the quickstart's pretrained model), same docstring-task examples, same batches and
steps: full SFT once without QAT, whose float result is then quantized after training (PTQ:
`kubeforge.finetune.qat.convert`, the same torchao configuration the QAT run converts with), and once
with `qat: {scheme}`, whose `qat/` folder is the quantized model. Each quantized model is loaded back
from its folder the way the transformers serving engine loads it, and scored against its own float
weights (the PTQ source; for QAT its `merged/` weights) on the task's held-out validation examples and
on the general test split. Sizes are the weight files on disk.

    .venv/bin/python benchmarks/bench_qat.py --steps 60 --scheme 8da4w --scheme 8da8w
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Any

from bench_forgetting import general_rows
from common import REPO, pretrained_model


def task_loss(model: Any, examples: list[dict[str, list[int]]], pad_id: int) -> float:
    """Mean response-token cross-entropy (the fine-tuning loss) over the held-out task examples, as perplexity."""
    import torch

    from kubeforge.finetune import losses
    from kubeforge.finetune.recipe import pad_batch

    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), 8):
            rows = [(e["input_ids"], e["labels"]) for e in examples[start : start + 8]]
            batch = pad_batch(rows, pad_id, torch.device("cpu"))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss_sum, count = losses.lm_loss_sum(logits, batch["labels"])
            total, tokens = total + float(loss_sum), tokens + int(count)
    return math.exp(total / tokens)


def finetune(base: Path, data: Any, section: dict[str, Any], out: Path) -> tuple[Path, Any]:
    from kubeforge.context import StageContext
    from kubeforge.engine.session import LocalSession
    from kubeforge.finetune.recipe import FinetuneRecipe
    from kubeforge.finetune.stage import loop_config
    from kubeforge.spec.finetune import FinetuneSpec

    out.mkdir(parents=True)
    ctx = StageContext(pipeline=None, stage="finetune", out_dir=out, base_dir=REPO,  # type: ignore[arg-type]
                       tracker=None, reporter=None, inputs={"data": data})  # type: ignore[arg-type]
    config = loop_config(FinetuneSpec.model_validate(section), ctx)
    session = LocalSession(keep_checkpoints=out / "kept")
    FinetuneRecipe(config, session).run()
    assert session.last_checkpoint is not None
    return session.last_checkpoint, config


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".bin", ".safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".kubeforge")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--test-rows", type=int, default=64)
    parser.add_argument("--scheme", action="append", choices=["8da8w", "8da4w"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from transformers import AutoModelForCausalLM

    from kubeforge.finetune import qat
    from kubeforge.quantize.perplexity import perplexity
    from kubeforge.spec.finetune import QATSettings

    base, data = pretrained_model(args.workdir, "bench_qat")
    rows = general_rows(data, args.test_rows)
    common: dict[str, Any] = {
        "base_model": str(base), "objective": "sft", "method": "full", "max_length": 256, "replay_fraction": 0,
        "task": {"builtin": "python-docstrings", "max_examples": args.examples},
        "train": {"max_steps": args.steps, "batch_size": 8, "lr": args.lr, "warmup_steps": 5},
        "eval": {"every_steps": args.steps, "max_batches": 8}, "checkpoint": {"every_steps": args.steps},
    }

    def scores(model: Any, config: Any) -> dict[str, float]:
        return {"task_ppl": round(task_loss(model, config.validation_examples, config.pad_id), 4),
                "general_ppl": round(perplexity(model, rows, 8), 3)}

    def change(quantized: dict[str, float], source: dict[str, float]) -> dict[str, float]:
        return {f"{k}_change_pct": round(100 * (quantized[k] / source[k] - 1), 3) for k in source}

    report: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "base": str(base),
                              "args": {k: str(v) for k, v in vars(args).items()}, "schemes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        plain_ckpt, config = finetune(base, data, common, Path(tmp) / "plain")
        float_dir = plain_ckpt / "merged"
        float_scores = scores(AutoModelForCausalLM.from_pretrained(float_dir), config)
        report["float"] = {**float_scores, "bytes": size(float_dir)}
        print("float", json.dumps(report["float"]), flush=True)
        for scheme in args.scheme or ["8da4w"]:
            settings = QATSettings(scheme=scheme)
            ptq_dir = Path(tmp) / f"ptq-{scheme}"
            qat.save_quantized(qat.convert(AutoModelForCausalLM.from_pretrained(float_dir), settings), settings,
                               ptq_dir)
            ptq = scores(AutoModelForCausalLM.from_pretrained(ptq_dir), config)
            qat_ckpt, _ = finetune(base, data, {**common, "qat": {"scheme": scheme}}, Path(tmp) / f"qat-{scheme}")
            qat_float = scores(AutoModelForCausalLM.from_pretrained(qat_ckpt / "merged"), config)
            qat_quant = scores(AutoModelForCausalLM.from_pretrained(qat_ckpt / "qat"), config)
            report["schemes"][scheme] = {
                "ptq": {**ptq, **change(ptq, float_scores), "bytes": size(ptq_dir)},
                "qat_float_weights": qat_float,
                "qat": {**qat_quant, **change(qat_quant, float_scores), "bytes": size(qat_ckpt / "qat")},
            }
            print(scheme, json.dumps(report["schemes"][scheme]), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
