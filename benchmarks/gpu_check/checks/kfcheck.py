"""KubeForge GPU verification steps (one subcommand per step; run.sh runs each in its own process).

Every step drives the project's own code in this process, without Ray, the way the tests and
benchmarks do (tests/integration/test_finetune.py `_local`, tests/unit/test_engine_fsdp.py,
benchmarks/bench_lora_vs_full.py): a recipe (`kubeforge.pretrain.recipe.PretrainRecipe`,
`kubeforge.finetune.recipe.FinetuneRecipe`) built from its typed loop configuration
(`kubeforge.pretrain.config.PretrainLoop`, `kubeforge.finetune.stage.loop_config`) and run on a
`kubeforge.engine.session.LocalSession` (rank 0 of 1) on CUDA; quantization through
`kubeforge.quantize.llmc.quantize`. Each step prints one line

    RESULT <step>: PASS|FAIL|SKIP|DRY-OK | key=value ...

and writes $KF_WORK/results/<step>.json. `summary` gathers those into $OUT/gpu_summary.json.

GPU_CHECK_DRY=1: CPU, tiny sizes, CUDA-only parts (bitsandbytes, MFU) skipped or expected to be refused
(qlora is then checked to be refused on CPU, and the same adapter training and merge run as lora).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# Make modules that the remote machine lacks unimportable here too (a local dry run sets it to
# "ray,mlflow,optuna,vllm"): a None entry in sys.modules makes `import` fail and find_spec return None.
for _name in filter(None, os.environ.get("KF_BLOCK_MODULES", "").split(",")):
    sys.modules[_name.strip()] = None  # type: ignore[assignment]

DRY = os.environ.get("GPU_CHECK_DRY") == "1"
WORK = Path(os.environ.get("KF_WORK", "/tmp/kf-gpu"))
RESULTS = WORK / "results"
MODELS = WORK / "models"
# LocalSession("cuda") as the tests' GPU paths use it; KF_DEVICE=cuda:0 pins the index if a library wants one.
DEVICE = "cpu" if DRY else os.environ.get("KF_DEVICE", "cuda")

# Sizes. GPU: the real check; DRY: seconds on a CPU.
VOCAB = 512 if DRY else 16384
SMALL_SEQ = 32 if DRY else 256
SPEED_SEQ = 64 if DRY else 1024
# The small model is also the quantize stage's input: W4A16 groups 128 input columns, so hidden and
# intermediate sizes are multiples of 128.
SMALL_ARCH: dict[str, Any] = (
    {"hidden_size": 128, "num_layers": 2, "num_heads": 2, "intermediate_size": 256, "max_position_embeddings": 128}
    if DRY else
    {"hidden_size": 384, "num_layers": 4, "num_heads": 6, "intermediate_size": 1024, "max_position_embeddings": 512}
)
# ~100M parameters with a 16384-token vocabulary (tied embeddings): 12 x 7.08M + 12.6M.
SPEED_ARCH: dict[str, Any] = (
    {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "max_position_embeddings": 128}
    if DRY else
    {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "max_position_embeddings": 1024}
)
SPEED_BATCH = int(os.environ.get("KF_SPEED_BATCH", "4" if DRY else "32"))
SPEED_STEPS = int(os.environ.get("KF_SPEED_STEPS", "4" if DRY else "30"))
WARMUP_STEPS_EXCLUDED = 1 if DRY else 5  # first steps left out of the steady-state figures


# ------------------------------------------------------------------------------------------------ helpers

def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Step:
    """Collects checks and figures; writes the JSON result and the RESULT line whatever happens."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.figures: dict[str, Any] = {}
        self.checks: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.status: str | None = None
        self.error: str | None = None
        self.started = time.perf_counter()

    def check(self, label: str, ok: bool, detail: Any = None) -> bool:
        ok = bool(ok)
        self.checks.append({"check": label, "ok": ok, "detail": detail})
        log(f"  check {'ok  ' if ok else 'FAIL'} {label}" + (f" ({detail})" if detail is not None else ""))
        return ok

    def note(self, text: str) -> None:
        self.notes.append(text)
        log(f"  note: {text}")

    def __enter__(self) -> Step:
        log(f"== step {self.name} ({'DRY, cpu' if DRY else DEVICE})")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None:
            self.error = f"{exc_type.__name__}: {exc}"
            traceback.print_exception(exc_type, exc, tb)
            self.status = "FAIL"
        elif self.status is None:
            self.status = "PASS" if all(c["ok"] for c in self.checks) else "FAIL"
        self.figures["wall_s"] = round(time.perf_counter() - self.started, 2)
        # What this step needed besides the standard library: the list to hold against what the GPU
        # machine has (its image and the carried wheels).
        self.figures["third_party_modules"] = sorted(
            name for name, module in sys.modules.items()
            if module is not None and "." not in name and not name.startswith("_")
            and name not in sys.stdlib_module_names and name != "kubeforge"
        )
        RESULTS.mkdir(parents=True, exist_ok=True)
        record = {
            "step": self.name, "status": self.status, "dry": DRY, "figures": self.figures, "checks": self.checks,
            "notes": self.notes, "error": self.error,
        }
        (RESULTS / f"{self.name}.json").write_text(json.dumps(record, indent=1, default=_jsonable))
        failed = [c["check"] for c in self.checks if not c["ok"]]
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in self.figures.items() if not isinstance(v, (dict, list)))
        line = f"RESULT {self.name}: {self.status} | {shown}"
        if failed:
            line += f" | failed: {'; '.join(failed)}"
        if self.error:
            line += f" | error: {self.error[:300]}"
        print(line, flush=True)
        return True  # the exception is recorded; the process exits 0 or 1 from main()


def _jsonable(value: Any) -> Any:
    try:
        return float(value)
    except Exception:
        return str(value)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:.4f}".rstrip("0").rstrip(".") if not math.isnan(value) else "nan"
    return str(value)


def cuda_peak_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(step: Step, prefix: str = "") -> None:
    import torch

    if torch.cuda.is_available() and not DRY:
        step.figures[f"{prefix}peak_alloc_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        step.figures[f"{prefix}peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    else:
        import resource

        step.figures[f"{prefix}peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def recording_session(keep: Path | None):
    """LocalSession (rank 0 of 1, no Ray) that also keeps the loop's progress messages (step events
    carry per-step tokens/s and MFU; LocalSession itself drops them)."""
    from kubeforge.engine.session import LocalSession

    class RecordingSession(LocalSession):
        def __init__(self) -> None:
            super().__init__(device=DEVICE, keep_checkpoints=keep)
            self.messages: list[dict[str, Any]] = []

        def push(self, message: dict[str, Any]) -> None:
            self.messages.append(dict(message))

    if keep is not None:
        shutil.rmtree(keep, ignore_errors=True)
        keep.mkdir(parents=True)
    return RecordingSession()


def step_rates(messages: list[dict[str, Any]], skip: int) -> dict[str, float]:
    """Steady-state figures from the loop's per-step messages, the first `skip` steps left out."""
    steps = [m for m in messages if m.get("event") == "step"]
    steady = steps[skip:] or steps
    out: dict[str, float] = {"steps_reported": len(steps)}
    if steady:
        out["steady_tokens_per_s_median"] = statistics.median(m["tokens_per_second"] for m in steady)
        out["first_step_tokens_per_s"] = steps[0]["tokens_per_second"]
    mfus = [m["mfu"] for m in steady if "mfu" in m]
    if mfus:
        out["steady_mfu_median"] = statistics.median(mfus)
        out["steady_mfu_max"] = max(mfus)
    return out


def meta() -> dict[str, Any]:
    return json.loads((WORK / "prep.json").read_text())


def copy_tokenizer(model_dir: Path) -> None:
    """As the pretrain stage does: the tokenizer files next to the weights, so the folder loads whole."""
    for item in (WORK / "tokenizer").iterdir():
        if item.is_file() and not (model_dir / item.name).exists():
            shutil.copy2(item, model_dir / item.name)


def base_model(order: tuple[str, ...]) -> tuple[Path, str]:
    for name in order:
        path = MODELS / name
        if (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file():
            return path, name
    raise RuntimeError(f"no base model among {order} under {MODELS} (did prep/pretrain run?)")


# ------------------------------------------------------------------------------------------------ env

def cmd_env(_: argparse.Namespace) -> int:
    import importlib.metadata as md

    with Step("env") as step:
        versions = {}
        for name in ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "peft", "bitsandbytes",
                     "pydantic", "pydantic_core", "typing_extensions", "llmcompressor", "compressed-tensors",
                     "datasets", "pyarrow", "fsspec", "huggingface_hub", "numpy", "pandas", "loguru", "dill",
                     "multiprocess", "pyyaml", "rich", "scipy"):
            try:
                versions[name] = md.version(name)
            except md.PackageNotFoundError:
                versions[name] = None
        step.figures["versions"] = versions
        log("  versions: " + ", ".join(f"{k}={v}" for k, v in versions.items()))
        step.figures["python"] = sys.version.split()[0]
        import torch

        step.figures["torch_cuda"] = torch.version.cuda
        if DRY:
            step.note("skipped: no CUDA (dry run): torch.cuda/bf16, bf16 matmul TFLOP/s, MFU peak, peft+bitsandbytes "
                      "imports, bitsandbytes nf4 round trip, llmcompressor/compressed_tensors/datasets/loguru findable")
        else:
            ok = step.check("torch.cuda.is_available()", torch.cuda.is_available())
            if ok:
                props = torch.cuda.get_device_properties(0)
                step.figures["device"] = torch.cuda.get_device_name(0)
                step.figures["gpu_mem_gib"] = round(props.total_memory / 2**30, 1)
                step.figures["capability"] = f"{props.major}.{props.minor}"
                step.check("bf16 supported", torch.cuda.is_bf16_supported())
                # What a plain bf16 matmul reaches here: context for the MFU figures below.
                a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
                b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
                for _ in range(3):
                    a @ b
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(10):
                    a @ b
                torch.cuda.synchronize()
                step.figures["matmul_bf16_tflops"] = round(10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12, 1)
                del a, b
        # The project's modules import (pydantic specs, recipes, sessions) without Ray.
        import kubeforge
        import kubeforge.engine.session
        import kubeforge.finetune.recipe
        import kubeforge.finetune.stage
        import kubeforge.pretrain.recipe
        import kubeforge.quantize.llmc
        import kubeforge.spec
        from kubeforge.engine.steps import peak_flops
        from kubeforge.finetune.methods import save_merged  # noqa: F401

        step.figures["kubeforge_from"] = str(Path(kubeforge.__file__).parent)
        step.check("kubeforge imports (spec, engine.session, pretrain.recipe, finetune.recipe/stage/methods, "
                   "quantize.llmc)", True)
        step.check("ray not importable (the recipes must run without it)", _missing("ray"),
                   "ray present" if not _missing("ray") else None)
        if not DRY:
            step.figures["peak_flops_bf16"] = peak_flops(torch.cuda.get_device_name(0), True)
            step.check("MFU peak known for this GPU", step.figures["peak_flops_bf16"] is not None)
            import peft  # noqa: F401
            from peft.utils.integrations import dequantize_bnb_weight  # noqa: F401

            step.check("peft imports", True, versions["peft"])
            import bitsandbytes.functional as bnbf

            w = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
            q, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
            d = bnbf.dequantize_4bit(q, state)
            rel = float((d.float() - w.float()).norm() / w.float().norm())
            step.figures["bnb_nf4_roundtrip_rel_err"] = rel
            step.check("bitsandbytes nf4 (double quant) round trip on CUDA, rel err < 0.2", rel < 0.2, round(rel, 4))
        for name in ("llmcompressor", "compressed_tensors", "datasets", "loguru"):
            import importlib.util

            step.check(f"{name} findable", importlib.util.find_spec(name) is not None) if not DRY else None
    return 0 if step.status in ("PASS", "DRY-OK") else 1


def _missing(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


# ------------------------------------------------------------------------------------------------ prep

def cmd_prep(_: argparse.Namespace) -> int:
    with Step("prep") as step:
        from kubeforge.data.packing import assign_splits
        from kubeforge.data.sources import stdlib_files
        from kubeforge.data.tokenizer import special_token_ids, train_tokenizer
        from kubeforge.engine.model import build_model
        from kubeforge.formats.functions import INSTRUCTION, extract_functions
        from kubeforge.spec.data import PackingSpec, StdlibSource, TokenizerSpec, stdlib_dir
        from kubeforge.spec.pretrain import ModelArchitecture, PretrainSpec

        for old in ("tokenizer", f"data{SMALL_SEQ}", f"data{SPEED_SEQ}", "models", "task.jsonl", "prep.json"):
            target = WORK / old
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        WORK.mkdir(parents=True, exist_ok=True)
        max_files = 40 if DRY else 1200
        files = stdlib_files(StdlibSource(type="python-stdlib", max_files=max_files))
        step.figures["stdlib_dir"] = str(stdlib_dir())
        docs: list[tuple[str, str]] = []
        # ~2M tokens with the 16K vocabulary: the speed run's 30 x 32 rows of 1024 tokens without repeats.
        budget = 300_000 if DRY else 8_000_000  # characters
        used = 0
        for rel, path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            if not text.strip():
                continue
            docs.append((rel, text))
            used += len(text)
            if used >= budget:
                break
        if len(docs) < (10 if DRY else 200):
            # A machine without the standard library's sources: fall back to site-packages .py files.
            import sysconfig

            step.note(f"only {len(docs)} stdlib files; adding site-packages sources")
            for path in sorted(Path(sysconfig.get_paths()["purelib"]).rglob("*.py")):
                text = path.read_text(encoding="utf-8", errors="replace")
                if text.strip():
                    docs.append((str(path), text))
                    used += len(text)
                if used >= budget:
                    break
        step.figures["documents"] = len(docs)
        step.figures["characters"] = used
        texts = [t for _, t in docs]
        t0 = time.perf_counter()
        # The tokenizer learns from the first ~4M characters (bounded time: BPE merges are sequential).
        tok_texts, seen = [], 0
        for text in texts:
            tok_texts.append(text)
            seen += len(text)
            if seen >= (200_000 if DRY else 4_000_000):
                break
        step.figures["tokenizer_characters"] = seen
        tokenizer = train_tokenizer(tok_texts, TokenizerSpec(vocab_size=VOCAB), WORK / "tokenizer")
        step.figures["tokenizer_s"] = round(time.perf_counter() - t0, 2)
        special = special_token_ids(tokenizer)
        vocab_size = len(tokenizer)
        step.figures["vocab_size"] = vocab_size
        # The documents' splits as the data stage decides them (a hash of the seed and the id); the
        # token streams are packed with the data stage's own shard planning and writing.
        splits = assign_splits([rel for rel, _ in docs], PackingSpec())
        t0 = time.perf_counter()
        streams = _token_streams(tokenizer, texts, splits, special["eos_id"])
        step.figures["tokenize_s"] = round(time.perf_counter() - t0, 2)
        shards: dict[str, Any] = {}
        for seq in sorted({SMALL_SEQ, SPEED_SEQ}):
            out = WORK / f"data{seq}"
            shards[str(seq)], rows = _pack(streams, PackingSpec(seq_len=seq), special["pad_id"], out)
            step.figures[f"rows_{seq}"] = rows
        step.figures["train_tokens"] = len(streams["train"])
        # The fine-tuning task: docstring -> body of the corpus' functions (as benchmarks/bench_lora_vs_full.py).
        records = 0
        with (WORK / "task.jsonl").open("w") as handle:
            for rel, text in docs[: (40 if DRY else 400)]:
                try:
                    functions = extract_functions(text, rel)
                except Exception:
                    continue
                for function in functions:
                    handle.write(json.dumps({"instruction": INSTRUCTION, "input": function.header,
                                             "output": function.body}) + "\n")
                    records += 1
        step.figures["task_records"] = records
        # A random model of the small architecture: the fine-tuning and quantize steps' base when the
        # pretraining step did not leave its trained model.
        random_dir = MODELS / "random_small"
        model = build_model(PretrainSpec(model=ModelArchitecture(**SMALL_ARCH)), vocab_size, special)
        model.save_pretrained(str(random_dir))
        copy_tokenizer(random_dir)
        (WORK / "prep.json").write_text(json.dumps(
            {"vocab_size": vocab_size, "special_tokens": special, "shards": shards, "task": str(WORK / "task.jsonl")},
            indent=1))
        step.check("train rows for the small run", step.figures[f"rows_{SMALL_SEQ}"]["train"] > 0)
        step.check("validation rows", step.figures[f"rows_{SMALL_SEQ}"]["validation"] > 0)
        step.check("test rows (quantize perplexity)", step.figures[f"rows_{SMALL_SEQ}"]["test"] > 0)
        speed_rows = SPEED_BATCH * SPEED_STEPS
        step.figures["speed_rows_needed"] = speed_rows
        if step.figures[f"rows_{SPEED_SEQ}"]["train"] < speed_rows:
            step.note(f"speed run repeats rows: {step.figures[f'rows_{SPEED_SEQ}']['train']} train rows of "
                      f"{SPEED_SEQ} for {speed_rows} drawn (tokens/s is unaffected)")
        step.check("task records >= 64", records >= 64, records)
    return 0 if step.status == "PASS" else 1


def _token_streams(tokenizer: Any, texts: list[str], splits: list[str], eos_id: int) -> dict[str, Any]:
    """Per split, its documents' tokens in corpus order, each followed by eos, as
    `kubeforge.data.packing.tokenize_part` makes them (the Rust tokenizer directly, no special tokens)."""
    import numpy as np

    from kubeforge.data.packing import SPLITS

    pieces: dict[str, list[Any]] = {split: [] for split in SPLITS}
    eos = np.array([eos_id], dtype=np.int32)
    for start in range(0, len(texts), 256):
        encoded = tokenizer.backend_tokenizer.encode_batch_fast(texts[start : start + 256], add_special_tokens=False)
        for encoding, split in zip(encoded, splits[start : start + 256], strict=True):
            pieces[split] += [np.asarray(encoding.ids, dtype=np.int32), eos]
    return {split: np.concatenate(p) if p else np.empty(0, dtype=np.int32) for split, p in pieces.items()}


def _pack(streams: dict[str, Any], spec: Any, pad_id: int, out: Path) -> tuple[dict[str, list[str]], dict[str, int]]:
    """The streams as .npy shards of `spec.seq_len`-token rows (the last row of a split padded), written
    by the data stage's `plan_shards` / `write_shard`; the shard paths and rows per split."""
    import numpy as np

    from kubeforge.data.packing import SPLITS, plan_shards, write_shard

    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        np.save(work / f"corpus.{split}.npy", streams[split])
    tokenized = [{"tokens": {split: len(streams[split]) for split in SPLITS}}]
    paths, writes = plan_shards(["corpus"], tokenized, spec)
    for item in writes:
        write_shard(item, str(work), spec.seq_len, pad_id, str(out))
    shutil.rmtree(work)
    rows = {split: sum(int(np.load(out / p, mmap_mode="r").shape[0]) for p in paths[split]) for split in SPLITS}
    return {split: [str(out / p) for p in paths[split]] for split in SPLITS}, rows


# ------------------------------------------------------------------------------------------------ pretraining

def _pretrain(step: Step, arch: dict[str, Any], seq: int, train: dict[str, Any], eval_: dict[str, Any],
              keep: Path) -> tuple[Any, dict[str, Any], Path | None]:
    """The pretraining recipe on a LocalSession, as tests/unit/test_engine_fsdp.py runs it without Ray:
    `PretrainRecipe(PretrainLoop(...), LocalSession(...)).run()`."""
    import torch

    from kubeforge.engine.steps import resolve_bf16
    from kubeforge.pretrain.config import PretrainLoop
    from kubeforge.pretrain.recipe import MODEL_SUBDIR, PretrainRecipe
    from kubeforge.spec.pretrain import PretrainSpec

    info = meta()
    spec = PretrainSpec.model_validate({
        "model": arch, "train": {"precision": "auto", **train}, "eval": eval_,
        # Only the final checkpoint (which holds the model folder); one process, so strategy ddp (the default).
        "checkpoint": {"every_steps": train["max_steps"], "keep": 1},
        "resources": {"workers": 1, "use_gpu": not DRY},
    })
    bf16 = resolve_bf16(spec.train.precision, torch.device(DEVICE))
    step.figures["bf16_autocast"] = bf16
    if not DRY:
        step.check("precision auto resolves to bf16 autocast on this GPU", bf16)
    session = recording_session(keep)
    shards = info["shards"][str(seq)]
    config = PretrainLoop(
        spec=spec, train_files=shards["train"], validation_files=shards["validation"],
        vocab_size=info["vocab_size"], special_tokens=info["special_tokens"],
    )
    cuda_peak_reset()
    t0 = time.perf_counter()
    PretrainRecipe(config, session).run()
    step.figures["loop_wall_s"] = round(time.perf_counter() - t0, 2)
    peak_memory(step)
    final = session.final
    model_dir = session.last_checkpoint / MODEL_SUBDIR if session.last_checkpoint else None
    return session, final, model_dir


def _check_saved_model(step: Step, model_dir: Path | None, final: dict[str, Any], target: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    ok = step.check("final checkpoint has a model folder",
                    model_dir is not None and (model_dir / "config.json").is_file(), str(model_dir))
    if not ok:
        return
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    n = sum(p.numel() for p in model.parameters())
    step.check("model loads with AutoModelForCausalLM, parameter count matches", n == final["num_parameters"],
               f"{type(model).__name__}, {n:,} vs {final['num_parameters']:,}")
    model.to(DEVICE).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.arange(4, 36, device=DEVICE).reshape(2, 16)).logits
    step.check("loaded model runs a forward pass, finite logits", bool(torch.isfinite(logits).all()))
    dest = MODELS / target
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(model_dir, dest)
    copy_tokenizer(dest)


def cmd_pretrain(_: argparse.Namespace) -> int:
    """Check 1: the pretraining loop on CUDA, precision auto (bf16 autocast): loss falls, MFU in (0, 1)."""
    with Step("pretrain") as step:
        steps = 12 if DRY else 200
        session, final, model_dir = _pretrain(
            step, SMALL_ARCH, SMALL_SEQ,
            {"max_steps": steps, "batch_size": 4 if DRY else 16, "lr": 2e-3, "warmup_steps": 2 if DRY else 20},
            {"every_steps": steps // 2, "max_batches": 2 if DRY else 4},
            WORK / "ckpt_pretrain",
        )
        f = step.figures
        f["num_parameters"] = final["num_parameters"]
        f["initial_val_loss"] = final["initial_val_loss"]
        f["val_loss"] = final["val_loss"]
        f["initial_val_ppl"] = final["initial_val_perplexity"]
        f["val_ppl"] = final["val_perplexity"]
        f["train_loss"] = final["train_loss"]
        f["tokens_per_s"] = final["tokens_per_second"]
        f.update(step_rates(session.messages, WARMUP_STEPS_EXCLUDED))
        log(f"  tokens/s (loop, all {final['step']} steps): {final['tokens_per_second']:.0f}")
        step.check("val loss fell", final["val_loss"] < final["initial_val_loss"],
                   f"{final['initial_val_loss']:.3f} -> {final['val_loss']:.3f}")
        if not DRY:
            step.check("val perplexity < 0.5 x initial (as tests/integration/test_pretrain_gpu.py)",
                       final["val_perplexity"] < 0.5 * final["initial_val_perplexity"])
        step.check("tokens/s > 0", final["tokens_per_second"] > 0)
        mfus = [m.get("mfu") for m in session.messages if m.get("event") == "step"]
        if DRY:
            step.check("no MFU on CPU", all(m is None for m in mfus))
        else:
            step.check("MFU reported on every step, all in (0, 1)",
                       bool(mfus) and all(m is not None and 0 < m < 1 for m in mfus),
                       f"min {min(m or 0 for m in mfus):.4f} max {max(m or 0 for m in mfus):.4f}" if mfus else "none")
        _check_saved_model(step, model_dir, final, "small")
    return 0 if step.status == "PASS" else 1


def cmd_speed(_: argparse.Namespace) -> int:
    """Check 4: tokens/s and MFU of the pretraining loop for a ~100M-parameter Llama, seq 1024, bf16."""
    with Step("speed") as step:
        session, final, model_dir = _pretrain(
            step, SPEED_ARCH, SPEED_SEQ,
            {"max_steps": SPEED_STEPS, "batch_size": SPEED_BATCH, "lr": 6e-4, "warmup_steps": 5 if not DRY else 1},
            {"every_steps": SPEED_STEPS, "max_batches": 1},
            WORK / "ckpt_speed",
        )
        f = step.figures
        f["num_parameters"] = final["num_parameters"]
        f["seq_len"] = SPEED_SEQ
        f["batch_size"] = SPEED_BATCH
        f["steps"] = final["step"]
        f["tokens_per_s"] = final["tokens_per_second"]
        f.update(step_rates(session.messages, WARMUP_STEPS_EXCLUDED))
        f["initial_val_loss"] = final["initial_val_loss"]
        f["val_loss"] = final["val_loss"]
        f["train_loss"] = final["train_loss"]
        if not DRY:
            import torch

            from kubeforge.engine.steps import peak_flops

            peak = peak_flops(torch.cuda.get_device_name(0), True)
            f["device"] = torch.cuda.get_device_name(0)
            f["peak_flops_assumed"] = peak
            if peak:
                f["mfu_loop_avg"] = 6 * final["num_parameters"] * final["tokens_per_second"] / peak
            mfus = [m.get("mfu") for m in session.messages if m.get("event") == "step"]
            step.check("MFU in (0, 1) on every step", bool(mfus) and all(m is not None and 0 < m < 1 for m in mfus))
        step.check("losses finite", all(math.isfinite(final[k]) for k in ("train_loss", "val_loss")))
        step.check("val loss fell", final["val_loss"] < final["initial_val_loss"],
                   f"{final['initial_val_loss']:.3f} -> {final['val_loss']:.3f}")
        log(f"  SPEED: {final['num_parameters'] / 1e6:.1f}M params, seq {SPEED_SEQ}, batch {SPEED_BATCH}: "
            f"loop avg {final['tokens_per_second']:.0f} tokens/s, steady median "
            f"{f.get('steady_tokens_per_s_median', float('nan')):.0f} tokens/s, "
            f"steady MFU {f.get('steady_mfu_median', float('nan')):.4f}")
        _check_saved_model(step, model_dir, final, "speed")
        shutil.rmtree(WORK / "ckpt_speed", ignore_errors=True)  # optimizer state: ~1.2 GB
    return 0 if step.status == "PASS" else 1


# ------------------------------------------------------------------------------------------------ fine-tuning

def _finetune(step: Step, method: str, base: Path, section_extra: dict[str, Any], keep: Path | None,
              save_outputs: bool) -> tuple[Any, dict[str, Any], Any]:
    """The fine-tuning recipe on a LocalSession, as tests/integration/test_finetune.py `_local` and
    benchmarks/bench_lora_vs_full.py run it without Ray: `loop_config(spec, ctx)` (the stage's own
    preparation: task split, encoding, held-out examples), then `FinetuneRecipe(config, session).run()`.
    The final checkpoint holds `adapter/` and `merged/` (`kubeforge.finetune.methods.save_merged`)."""
    import dataclasses

    from kubeforge.context import StageContext
    from kubeforge.finetune.recipe import FinetuneRecipe
    from kubeforge.finetune.stage import loop_config
    from kubeforge.progress import LineReporter
    from kubeforge.spec.finetune import FinetuneSpec
    from kubeforge.spec.load import parse_manifest

    section: dict[str, Any] = {
        "base_model": str(base), "method": method, "task": {"path": meta()["task"], "max_examples": 400},
        # qlora needs use_gpu in the manifest; on CPU (dry run) the recipe then refuses it, as designed.
        "replay_fraction": 0.0, "resources": {"workers": 1, "use_gpu": method == "qlora" or not DRY},
        **section_extra,
    }
    if method == "qlora":
        section["qlora"] = {"quant_type": "nf4", "double_quant": True}
    pipeline = parse_manifest({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelPipeline", "metadata": {"name": "gpucheck"},
        "spec": {"data": {"sources": [{"type": "python-stdlib"}]}, "finetune": section},  # data: required, unused
    })
    out_dir = WORK / f"ft-{step.name}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    ctx = StageContext(pipeline=pipeline, stage="finetune", out_dir=out_dir, base_dir=WORK, tracker=None,  # type: ignore[arg-type]
                       reporter=LineReporter())  # loop_config logs nothing
    spec = FinetuneSpec.model_validate(section)
    config = dataclasses.replace(loop_config(spec, ctx), save_outputs=save_outputs)
    step.figures["train_examples"] = len(config.train_examples)
    step.figures["validation_examples"] = len(config.validation_examples)
    session = recording_session(keep)
    cuda_peak_reset()
    t0 = time.perf_counter()
    FinetuneRecipe(config, session).run()
    step.figures["loop_wall_s"] = round(time.perf_counter() - t0, 2)
    peak_memory(step)
    return session, session.final, config


def _record_finetune(step: Step, session: Any, final: dict[str, Any]) -> None:
    f = step.figures
    f["trainable_parameters"] = final["trainable_parameters"]
    f["total_parameters"] = final["total_parameters"]
    f["trainable_share"] = final["trainable_parameters"] / final["total_parameters"]
    f["initial_val_loss"] = final["initial_val_loss"]
    f["val_loss"] = final["val_loss"]
    f["train_loss"] = final["train_loss"]
    f["tokens_per_s"] = final["tokens_per_second"]
    rates = step_rates(session.messages, 3 if not DRY else 1)
    f.update({k: v for k, v in rates.items() if "mfu" not in k})


def _expect_qlora_refused_on_cpu(step: Step, fn) -> None:
    """Dry run: qlora must be refused on a machine without CUDA (`check_qlora_device`), with a StageError."""
    from kubeforge.errors import StageError

    try:
        fn()
    except StageError as exc:
        if "CUDA" in str(exc):
            step.check("qlora refused on CPU with a StageError naming CUDA", True, str(exc)[:120])
            return
        raise
    raise AssertionError("qlora ran on CPU: expected check_qlora_device to refuse")


def cmd_ft_qlora(_: argparse.Namespace) -> int:
    """Check 2: QLoRA (nf4, double quant) on the pretrained small model through the fine-tuning recipe,
    then the merged model (`kubeforge.finetune.methods.save_merged`: adapters folded into the dequantized
    4-bit weights) against the 4-bit base + adapter, as tests/integration/test_finetune_gpu.py.

    Dry run (CPU): qlora is checked to be refused, then the same run as lora exercises the recipe's
    adapter + merge path (`save_merged` without the dequantization) against base + adapter in fp32."""
    with Step("ft_qlora") as step:
        base, base_name = base_model(("small", "random_small"))
        step.figures["base"] = base_name
        if base_name != "small":
            step.note("pretrain step left no model: fine-tuning the random small model instead")
        keep = WORK / "ckpt_ft_qlora"
        steps = 12 if DRY else 30
        section = {
            "max_length": 128,
            "train": {"max_steps": steps, "batch_size": 4 if DRY else 8, "lr": 1e-2, "warmup_steps": 2},
            "eval": {"every_steps": steps // 3, "max_batches": 2}, "checkpoint": {"every_steps": steps, "keep": 1},
        }
        method = "qlora"
        if DRY:
            _expect_qlora_refused_on_cpu(step, lambda: _finetune(step, "qlora", base, section, keep, True))
            method = "lora"
            step.note("dry run: the adapter training and merge run as lora (no 4-bit base on CPU)")
        step.figures["method"] = method
        session, final, config = _finetune(step, method, base, section, keep, True)
        _record_finetune(step, session, final)
        step.check("val loss fell", final["val_loss"] < final["initial_val_loss"],
                   f"{final['initial_val_loss']:.3f} -> {final['val_loss']:.3f}")
        step.check("trainable share < 5%", step.figures["trainable_share"] < 0.05,
                   f"{step.figures['trainable_share']:.4%}")
        from kubeforge.finetune.recipe import ADAPTER_SUBDIR, MERGED_SUBDIR

        ckpt = session.last_checkpoint
        merged, adapter = (ckpt / MERGED_SUBDIR, ckpt / ADAPTER_SUBDIR) if ckpt else (None, None)
        ok = step.check("merged/ and adapter/ written", bool(merged and (merged / "config.json").is_file()
                                                             and adapter and adapter.is_dir()), str(ckpt))
        if ok:
            _check_merged(step, merged, adapter, config.base_model_dir)
        if DRY:
            step.status = "DRY-OK" if all(c["ok"] for c in step.checks) else "FAIL"
    return 0 if step.status in ("PASS", "DRY-OK") else 1


def _check_merged(step: Step, merged: Path, adapter: Path, base_model_dir: str) -> None:
    """The merged folder computes what the trained model (base + adapter) computes. On CUDA the base is
    loaded in 4 bits as the recipe trained it (bf16 compute vs the merged fp32: allclose atol 0.1 rtol
    0.05, as the test); in the dry run the base is plain fp32 and the match is tight."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_model = AutoModelForCausalLM.from_pretrained(str(merged)).to(DEVICE).eval()
    step.figures["merged_dtype"] = str(next(merged_model.parameters()).dtype)
    if DRY:
        base = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
        atol, rtol = 1e-4, 1e-4
    else:
        from transformers import BitsAndBytesConfig

        base = AutoModelForCausalLM.from_pretrained(
            base_model_dir, device_map={"": 0}, dtype=torch.bfloat16,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
        )
        import bitsandbytes as bnb

        n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
        step.figures["linear4bit_layers"] = n4
        step.check("base loads as bitsandbytes 4-bit", n4 > 0, n4)
        atol, rtol = 0.1, 0.05
    trained = PeftModel.from_pretrained(base, str(adapter)).eval()
    vocab = int(merged_model.config.vocab_size)
    input_ids = (torch.arange(3, 67).reshape(2, 32) % (vocab - 8) + 4).to(DEVICE)
    with torch.no_grad():
        expected = trained(input_ids=input_ids).logits.float()
        got = merged_model(input_ids=input_ids).logits.float()
    diff = (got - expected).abs()
    step.figures["logits_max_abs_diff"] = float(diff.max())
    step.figures["logits_mean_abs_diff"] = float(diff.mean())
    step.figures["logits_top1_agreement"] = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
    step.check(f"merged logits close to {'base' if DRY else '4-bit base'} + adapter "
               f"(allclose atol {atol}, rtol {rtol})",
               bool(torch.allclose(got, expected, atol=atol, rtol=rtol)), f"max |diff| {float(diff.max()):.4g}")
    # The merged folder is a plain model (no quantization config), loadable anywhere.
    merged_config = json.loads((merged / "config.json").read_text())
    step.check("merged config has no quantization_config", "quantization_config" not in merged_config)
    step.check("merged folder has the tokenizer", (merged / "tokenizer_config.json").is_file())


def cmd_ft_compare(args: argparse.Namespace) -> int:
    """Check 2 (comparison): qlora / lora / full on the same base, same batches: tokens/s and peak memory."""
    method = args.method
    with Step(f"ft_{method}_cmp") as step:
        base, base_name = base_model(("speed", "small", "random_small"))
        step.figures["method"] = method
        step.figures["base"] = base_name
        steps = 4 if DRY else 30
        section = {
            "max_length": 128 if DRY else 256,
            "train": {"max_steps": steps, "batch_size": 4 if DRY else 8, "lr": 1e-4 if method == "full" else 1e-3,
                      "warmup_steps": 2},
            "eval": {"every_steps": steps, "max_batches": 2}, "checkpoint": {"every_steps": steps},
        }
        if DRY and method == "qlora":
            _expect_qlora_refused_on_cpu(step, lambda: _finetune(step, method, base, section, None, False))
            step.status = "DRY-OK" if all(c["ok"] for c in step.checks) else "FAIL"
            return 0 if step.status == "DRY-OK" else 1
        session, final, _ = _finetune(step, method, base, section, None, False)
        _record_finetune(step, session, final)
        step.check("losses finite", all(math.isfinite(final[k]) for k in ("train_loss", "val_loss")))
        step.figures["val_loss_fell"] = final["val_loss"] < final["initial_val_loss"]
        if method != "full":
            step.check("trainable share < 5%", step.figures["trainable_share"] < 0.05,
                       f"{step.figures['trainable_share']:.4%}")
    return 0 if step.status in ("PASS", "DRY-OK") else 1


# ------------------------------------------------------------------------------------------------ quantize

def cmd_quantize(args: argparse.Namespace) -> int:
    """Check 3: llm-compressor through kubeforge.quantize.llmc.quantize on CUDA, then load in transformers."""
    scheme = args.scheme
    with Step(f"quant_{scheme.replace('-', '_')}") as step:
        import numpy as np

        from kubeforge.quantize import llmc
        from kubeforge.quantize.perplexity import perplexity

        base, base_name = base_model(("small", "random_small"))
        step.figures["base"] = base_name
        info = meta()
        shards = info["shards"][str(SMALL_SEQ)]
        pad_id = info["special_tokens"]["pad_id"]
        inputs = WORK / f"quant-{scheme}-inputs"
        inputs.mkdir(parents=True, exist_ok=True)
        calibration_file = None
        # As the quantize stage's driver does (kubeforge.quantize.stage._inputs): the first training rows
        # calibrate GPTQ, the test split scores perplexity; both handed to llmc.quantize as .npy files.
        # Read with numpy alone: this interpreter is the quantize environment's.
        if scheme in llmc.CALIBRATED:
            train = _rows(shards["train"], 8 if DRY else 64)
            calibration_file = str(inputs / "calibration.npy")
            np.save(calibration_file, train)
            step.figures["calibration_samples"] = len(train)
        eval_rows = _rows(shards["test"] or shards["validation"], 8 if DRY else 64)
        step.figures["eval_rows"] = len(eval_rows)
        np.save(inputs / "eval.npy", eval_rows)
        out = WORK / f"quant-{scheme}"
        shutil.rmtree(out, ignore_errors=True)
        result = llmc.quantize(str(base), str(out), scheme, calibration_file, str(inputs / "eval.npy"), 8, 0.8,
                               ["lm_head"], DEVICE, pad_id)
        f = step.figures
        for key in ("format", "perplexity_before", "perplexity_after", "size_bytes", "seconds", "llmcompressor",
                    "compressed_tensors"):
            f[key] = result.get(key)
        f["ppl_increase"] = result["perplexity_after"] / result["perplexity_before"] - 1
        f["base_safetensors_bytes"] = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        f["artefact_dir_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        f["size_ratio_vs_base"] = result["size_bytes"] / f["base_safetensors_bytes"]
        config = json.loads((out / "config.json").read_text())
        qc = config.get("quantization_config") or {}
        f["quant_method"] = qc.get("quant_method")
        f["ct_format"] = qc.get("format")
        step.check("config.json has a compressed-tensors quantization_config",
                   qc.get("quant_method") == "compressed-tensors", f"{qc.get('quant_method')}/{qc.get('format')}")
        step.check("artefact smaller than the base weights", result["size_bytes"] < f["base_safetensors_bytes"],
                   f"{result['size_bytes']:,} vs {f['base_safetensors_bytes']:,} bytes")
        step.check("perplexities finite",
                   math.isfinite(result["perplexity_before"]) and math.isfinite(result["perplexity_after"]))
        # The artefact loads in transformers (compressed-tensors integration) and scores like the in-memory model.
        import torch
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(str(out), device_map={"": DEVICE} if not DRY else None)
        if DRY:
            loaded.to(DEVICE)
        f["loaded_class"] = type(loaded).__name__
        f["loaded_weight_dtypes"] = sorted({str(p.dtype) for p in loaded.parameters()})
        ppl_loaded = perplexity(loaded, eval_rows, 8, device=DEVICE, pad_id=pad_id)
        f["perplexity_loaded"] = ppl_loaded
        step.check("loaded artefact: finite perplexity within 10% of llm-compressor's in-memory result",
                   math.isfinite(ppl_loaded) and abs(ppl_loaded / result["perplexity_after"] - 1) < 0.10,
                   f"{ppl_loaded:.4g} vs {result['perplexity_after']:.4g}")
        del loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0 if step.status == "PASS" else 1


def _rows(files: list[str], count: int) -> Any:
    """The first `count` rows of the .npy shards `files`, as int64."""
    import numpy as np

    arrays = [np.load(f, mmap_mode="r") for f in files]
    rows = np.concatenate([a for a in arrays if len(a)])[:count]
    return np.asarray(rows, dtype=np.int64)


# ------------------------------------------------------------------------------------------------ summary

ORDER = ("env", "prep", "pretrain", "speed", "ft_qlora", "quant_w4a16", "quant_fp8", "ft_qlora_cmp", "ft_lora_cmp",
         "ft_full_cmp")


def cmd_summary(args: argparse.Namespace) -> int:
    steps: dict[str, Any] = {}
    for name in ORDER:
        path = RESULTS / f"{name}.json"
        rc_file = RESULTS / f"{name}.rc"
        rc = rc_file.read_text().strip() if rc_file.exists() else None
        if path.exists():
            record = json.loads(path.read_text())
            record["rc"] = rc
        elif rc is not None:
            reason = {"124": "timeout", "137": "killed (timeout or memory)", "skip": "skipped (time budget)"}.get(
                rc, f"exited {rc} without a result")
            record = {"step": name, "status": "SKIP" if rc == "skip" else "FAIL", "error": reason, "rc": rc}
        else:
            record = {"step": name, "status": "NOT RUN"}
        steps[name] = record
    compare = {}
    for method in ("qlora", "lora", "full"):
        r = steps.get(f"ft_{method}_cmp", {})
        if r.get("status") == "PASS":
            fig = r["figures"]
            compare[method] = {k: fig.get(k) for k in ("tokens_per_s", "steady_tokens_per_s_median", "peak_alloc_mib",
                                                       "peak_reserved_mib", "trainable_share", "initial_val_loss",
                                                       "val_loss", "base", "total_parameters")}
    if "full" in compare:
        for method in ("lora", "qlora"):
            if method in compare and compare["full"].get("peak_alloc_mib") and compare["full"].get("tokens_per_s"):
                compare[f"{method}_over_full"] = {
                    "peak_alloc": compare[method]["peak_alloc_mib"] / compare["full"]["peak_alloc_mib"],
                    "tokens_per_s": compare[method]["tokens_per_s"] / compare["full"]["tokens_per_s"],
                }
    speed = steps.get("speed", {}).get("figures", {})
    headline = {k: speed.get(k) for k in ("device", "num_parameters", "seq_len", "batch_size", "steps", "tokens_per_s",
                                          "steady_tokens_per_s_median", "mfu_loop_avg", "steady_mfu_median",
                                          "peak_alloc_mib", "peak_flops_assumed")}
    statuses = {n: s.get("status") for n, s in steps.items()}
    summary = {
        "overall": "PASS" if all(v in ("PASS", "DRY-OK") for v in statuses.values()) else "FAIL",
        "dry": DRY, "statuses": statuses, "speed_100m": headline, "finetune_comparison": compare,
        "env": steps.get("env", {}).get("figures", {}), "steps": steps,
        "total_wall_s": float(args.elapsed) if args.elapsed else None,
        "project_commit": (Path(__file__).resolve().parents[1] / "src" / "COMMIT").read_text().strip()
        if (Path(__file__).resolve().parents[1] / "src" / "COMMIT").exists() else None,
    }
    out = Path(os.environ.get("OUT") or WORK)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_summary.json").write_text(json.dumps(summary, indent=1, default=_jsonable))
    print("==================== SUMMARY ====================")
    for name, status in statuses.items():
        record = steps[name]
        extra = record.get("error") or ""
        print(f"  {name:14s} {status:8s} {str(extra)[:150]}")
    if headline.get("tokens_per_s"):
        print(f"  speed (~100M Llama): {headline}")
    if compare:
        print(f"  fine-tune comparison: {json.dumps(compare, default=_jsonable)}")
    print(f"OVERALL: {summary['overall']}  (summary: {out / 'gpu_summary.json'})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env")
    sub.add_parser("prep")
    sub.add_parser("pretrain")
    sub.add_parser("speed")
    sub.add_parser("ft-qlora")
    p = sub.add_parser("ft-compare")
    p.add_argument("--method", choices=("qlora", "lora", "full"), required=True)
    p = sub.add_parser("quantize")
    p.add_argument("--scheme", choices=("w4a16", "fp8"), required=True)
    p = sub.add_parser("summary")
    p.add_argument("--elapsed", default=None)
    args = parser.parse_args()
    handler = {"env": cmd_env, "prep": cmd_prep, "pretrain": cmd_pretrain, "speed": cmd_speed,
               "ft-qlora": cmd_ft_qlora, "ft-compare": cmd_ft_compare, "quantize": cmd_quantize,
               "summary": cmd_summary}[args.cmd]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
