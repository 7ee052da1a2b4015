"""LoRA vs full fine-tuning: trainable-parameter share, peak memory and tokens/s, as ratios LoRA / full.

Same base model, same task examples, same batches, same number of optimizer steps, measured side by
side in one run, each method in a fresh child process (so that one's memory cannot hide in the
other's peak). No Ray: the fine-tuning recipe (`kubeforge.finetune.recipe.FinetuneRecipe`) runs
in-process with `kubeforge.engine.session.LocalSession`.

* base: a randomly initialised Llama (default hidden 512, 4 layers: about 14M parameters) saved with a
  BPE tokenizer trained on standard-library files; its weights do not matter for speed or memory;
* task: the docstring -> function-body examples of those files, as an instruction JSONL;
* LoRA: rank 8 on q_proj and v_proj (the spec's defaults); full: every parameter, AdamW for both.

Memory is the child's peak resident set size (`ru_maxrss`) minus its RSS just before the loop
starts: it covers the loaded weights, gradients, optimizer state and activations, and is not
tracemalloc (which does not see PyTorch's CPU allocator). tokens/s is the loop's own steady-state
figure: non-padding tokens over time spent in optimizer steps (evaluation and start-up excluded).

    .venv/bin/python benchmarks/bench_lora_vs_full.py --steps 20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

BATCH_SIZE = 8
MAX_LENGTH = 128
SOURCE_FILES = 120


def prepare(root: Path, hidden: int, layers: int) -> None:
    """Tokenizer, random base model and the task JSONL under `root`."""
    from kubeforge.data.tokenizer import special_token_ids, train_tokenizer
    from kubeforge.engine.model import build_model
    from kubeforge.formats.functions import extract_functions
    from kubeforge.spec.data import TokenizerSpec, stdlib_dir
    from kubeforge.spec.pretrain import ModelArchitecture, PretrainSpec

    files = sorted(stdlib_dir().glob("*.py"))[:SOURCE_FILES]
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    tokenizer = train_tokenizer(texts, TokenizerSpec(vocab_size=2048), root / "base")
    arch = ModelArchitecture(hidden_size=hidden, num_layers=layers, num_heads=hidden // 64,
                             max_position_embeddings=MAX_LENGTH * 2)
    model = build_model(PretrainSpec(model=arch), len(tokenizer), special_token_ids(tokenizer))
    model.save_pretrained(str(root / "base"))
    with (root / "task.jsonl").open("w") as handle:
        for path, text in zip(files, texts, strict=True):
            for function in extract_functions(text, path.name):
                record = {"instruction": "Write the body of this Python function.", "input": function.header,
                          "output": function.body}
                handle.write(json.dumps(record) + "\n")


def _section(method: str, steps: int) -> dict[str, Any]:
    return {
        "base_model": "base", "method": method, "task": {"path": "task.jsonl"}, "replay_fraction": 0.0,
        "max_length": MAX_LENGTH,
        "train": {"max_steps": steps, "batch_size": BATCH_SIZE, "lr": 1e-4 if method == "full" else 1e-3,
                  "warmup_steps": 2},
        # One evaluation at the start and one at the end, as in any run; the checkpoint is the final one.
        "eval": {"every_steps": steps, "max_batches": 2}, "checkpoint": {"every_steps": steps},
        "resources": {"workers": 1},
    }


def measure(root: str, method: str, steps: int, threads: int) -> dict[str, Any]:
    """Runs in a fresh child process: the loop for one method, with its peak memory."""
    import resource

    import psutil
    import torch

    from kubeforge.context import StageContext
    from kubeforge.engine.session import LocalSession
    from kubeforge.finetune.recipe import FinetuneRecipe
    from kubeforge.finetune.stage import loop_config
    from kubeforge.progress import LineReporter
    from kubeforge.spec.finetune import FinetuneSpec
    from kubeforge.spec.load import parse_manifest

    torch.set_num_threads(threads)
    section = _section(method, steps)
    pipeline = parse_manifest({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelPipeline", "metadata": {"name": "bench"},
        "spec": {"data": {"sources": [{"type": "python-stdlib"}]}, "finetune": section},  # data: required, unused
    })
    out_dir = Path(root) / method
    out_dir.mkdir()
    ctx = StageContext(pipeline=pipeline, stage="finetune", out_dir=out_dir, base_dir=Path(root),
                       tracker=None, reporter=LineReporter())  # type: ignore[arg-type]  # loop_config logs nothing
    config = dataclasses.replace(loop_config(FinetuneSpec.model_validate(section), ctx), save_outputs=False)
    session = LocalSession()
    before = psutil.Process().memory_info().rss
    FinetuneRecipe(config, session).run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    final = session.final
    return {
        "method": method, "trainable_parameters": final["trainable_parameters"],
        "total_parameters": final["total_parameters"],
        "trainable_share": final["trainable_parameters"] / final["total_parameters"],
        "peak_memory_mib": (peak - before) / 2**20, "tokens_per_second": final["tokens_per_second"],
        "initial_val_loss": final["initial_val_loss"], "val_loss": final["val_loss"],
        "train_examples": len(config.train_examples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import torch

    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        prepare(Path(tmp), args.hidden, args.layers)
        rows = {}
        for method in ("full", "lora"):
            with spawn.Pool(1) as pool:
                rows[method] = pool.apply(measure, (tmp, method, args.steps, args.threads))
    full, lora = rows["full"], rows["lora"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch "
          f"threads, torch {torch.__version__}; Llama hidden {args.hidden} x {args.layers} layers "
          f"({full['total_parameters'] / 1e6:.1f}M parameters), {args.steps} steps x {BATCH_SIZE} examples of at "
          f"most {MAX_LENGTH} tokens, {full['train_examples']} training examples")
    print("| method | trainable parameters | share | peak memory (RSS increase, MiB) | tokens/s | val loss |")
    print("|---|---|---|---|---|---|")
    for row in (full, lora):
        print(f"| {row['method']} | {row['trainable_parameters']:,} | {row['trainable_share']:.4f} | "
              f"{row['peak_memory_mib']:.0f} | {row['tokens_per_second']:.0f} | "
              f"{row['initial_val_loss']:.3f} -> {row['val_loss']:.3f} |")
    ratios = {
        "trainable_share": lora["trainable_share"] / full["trainable_share"],
        "peak_memory": lora["peak_memory_mib"] / full["peak_memory_mib"],
        "tokens_per_second": lora["tokens_per_second"] / full["tokens_per_second"],
    }
    print("LoRA / full: " + ", ".join(f"{name} {value:.3f}x" for name, value in ratios.items()))
    print(json.dumps({"full": full, "lora": lora, "ratios_lora_over_full": ratios}))


if __name__ == "__main__":
    main()
