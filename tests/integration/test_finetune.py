"""The fine-tuning stage on local Ray over the session's tiny language model: every method and
objective learns, LoRA touches no base weight and merges exactly, a rerun resumes, bad input fails
clearly before any worker starts, and vLLM serves the merged model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from kubeforge.errors import StageError
from kubeforge.finetune.config import FinetuneLoop
from kubeforge.spec.finetune import FinetuneSpec
from kubeforge.stages.finetune import FinetuneResult
from tests.stage_fixtures import finetune_result

pytestmark = pytest.mark.integration

# Prompts of the docstring task are ~80 tokens (median): at 128 about half the functions fit.
# 120 functions give ~60 usable training examples and 8 held out for the evaluations.
SMALL: dict[str, Any] = {
    "task": {"builtin": "python-docstrings", "max_examples": 120},
    "max_length": 128,
    "train": {"max_steps": 12, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2},
    "eval": {"every_steps": 6, "max_batches": 2},
    "checkpoint": {"every_steps": 6, "keep": 1},
    "resources": {"workers": 1},
}


def _section(**overrides: Any) -> dict[str, Any]:
    merged = json.loads(json.dumps(SMALL))
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def _run(tiny_lm, section: dict[str, Any], name: str) -> tuple[Any, FinetuneResult, float]:
    from kubeforge.finetune.stage import run

    ctx = tiny_lm.context("finetune", section, name)
    started = time.monotonic()
    result = run(FinetuneSpec.model_validate(section), ctx)
    seconds = time.monotonic() - started
    print(f"{name}: {seconds:.1f}s {json.dumps(result.to_json())}")
    return ctx, result, seconds


def _local(tiny_lm, section: dict[str, Any], name: str, keep: Path) -> tuple[Any, FinetuneLoop]:
    """The loop in this process with its LocalSession (no Ray Train start-up: seconds instead of ~20 s);
    the final checkpoint, with the outputs, is copied under `keep`."""
    from kubeforge.engine.session import LocalSession
    from kubeforge.finetune.recipe import FinetuneRecipe
    from kubeforge.finetune.stage import loop_config

    config = loop_config(FinetuneSpec.model_validate(section), tiny_lm.context("finetune", section, name))
    session = LocalSession(keep_checkpoints=keep)
    FinetuneRecipe(config, session).run()
    print(f"{name}: {session.evaluations[0]} -> {session.evaluations[-1]}")
    return session, config


def _base_dir(tiny_lm) -> Path:
    return tiny_lm.pretrain.directory / tiny_lm.pretrain.result.model_dir


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def _fixed_input() -> Any:
    import torch

    return torch.arange(3, 67).reshape(2, 32) % 500 + 4


@pytest.fixture(scope="module")
def lora_runs(tiny_lm):
    """LoRA on one worker for 12 steps, then a rerun in the same folder to 18 steps on two workers:
    it resumes from the first run's final checkpoint and trains on with DDP."""
    before = _digest(_base_dir(tiny_lm))
    lora = {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    first = _run(tiny_lm, _section(method="lora", lora=lora, train={"lr": 1e-2}), "lora")
    second = _run(
        tiny_lm, _section(method="lora", lora=lora, train={"lr": 1e-2, "max_steps": 18}, resources={"workers": 2}),
        "lora",
    )
    return first, second, before


def test_lora_learns_trains_few_parameters_and_leaves_the_base_untouched(tiny_lm, lora_runs) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    (ctx, result, _), _, before = lora_runs
    assert result.final_step == 12 and result.resumed_from_step == 0
    assert result.val_loss < result.initial_val_loss
    assert result.val_perplexity < result.initial_val_perplexity
    assert result.trainable_share < 0.05
    assert result.trainable_parameters == 2 * 2 * (8 * 128 + 128 * 8)  # 2 layers x (q, v) x (A + B)
    assert (result.objective, result.method) == ("sft", "lora")
    assert result.num_train_examples > 0 and result.num_test_examples > 0
    assert result.dropped_examples >= 0
    assert result.task_dir == "task" and (ctx.out_dir / "task" / "test.jsonl").is_file()
    assert result.base_model_dir == str(_base_dir(tiny_lm).resolve())

    base_dir = _base_dir(tiny_lm)
    assert _digest(base_dir) == before
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    merged = AutoModelForCausalLM.from_pretrained(str(ctx.out_dir / result.model_dir))
    merged_state = merged.state_dict()
    for name, weight in base.state_dict().items():
        adapted = "q_proj" in name or "v_proj" in name
        assert torch.equal(weight, merged_state[name]) != adapted, name

    history = MlflowClient(ctx.tracker.tracking_uri).get_metric_history(ctx.tracker.run_id, "val_loss")
    assert sorted(m.step for m in history) == [0, 6, 12]


def test_the_merged_model_equals_base_plus_adapter_and_is_a_plain_llama_folder(tiny_lm, lora_runs) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kubeforge.formats.chat import CHAT_TEMPLATE

    _, (ctx, result, _), _ = lora_runs
    merged_dir = ctx.out_dir / result.model_dir
    assert result.adapter_dir == "adapter"
    assert (ctx.out_dir / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(_base_dir(tiny_lm))), str(ctx.out_dir / result.adapter_dir)
    ).eval()
    with torch.no_grad():
        expected = with_adapter(input_ids=_fixed_input()).logits
        got = merged(input_ids=_fixed_input()).logits
    assert torch.allclose(got, expected, atol=1e-4)

    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (merged_dir / name).is_file(), name
    config, base_config = AutoConfig.from_pretrained(str(merged_dir)), AutoConfig.from_pretrained(str(_base_dir(tiny_lm)))
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert config.use_cache is True
    ignored = {"use_cache", "transformers_version", "dtype", "torch_dtype", "_name_or_path"}
    assert {k: v for k, v in config.to_dict().items() if k not in ignored} == {
        k: v for k, v in base_config.to_dict().items() if k not in ignored
    }
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_a_rerun_in_the_same_folder_resumes_on_two_workers(lora_runs) -> None:
    (_, first, _), (ctx, second, _), _ = lora_runs
    assert second.resumed_from_step == 12
    assert second.restored_from_steps == [12]
    assert second.final_step == 18
    assert second.workers == 2
    # The resumed run keeps the first run's starting point and improves on where the first one ended.
    assert second.initial_val_loss == pytest.approx(first.initial_val_loss)
    assert second.val_loss < first.initial_val_loss
    assert any("resumed from the checkpoint of step 12" in line for line in ctx.reporter.lines)


def test_full_fine_tuning_trains_every_parameter(tiny_lm, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    session, _ = _local(tiny_lm, _section(method="full", train={"lr": 1e-3}), "full", tmp_path)
    final = session.final
    assert final["val_loss"] < final["initial_val_loss"]
    assert final["trainable_parameters"] == final["total_parameters"]
    assert session.last_checkpoint is not None
    assert not (session.last_checkpoint / "adapter").exists()
    model = AutoModelForCausalLM.from_pretrained(str(session.last_checkpoint / "merged"))
    assert sum(p.numel() for p in model.parameters()) == final["total_parameters"]


def test_prefix_tuning_learns_and_loads_as_base_plus_adapter(tiny_lm, tmp_path: Path) -> None:
    import torch

    from kubeforge.engine.model import load_for_inference

    section = _section(method="prefix", prefix={"num_virtual_tokens": 8}, train={"lr": 3e-2})
    session, config = _local(tiny_lm, section, "prefix", tmp_path)
    final = session.final
    assert final["val_loss"] < final["initial_val_loss"]
    assert final["trainable_parameters"] == 2 * 2 * 8 * 128  # layers x (key, value) x tokens x hidden
    output = session.last_checkpoint
    assert output is not None and (output / "adapter").is_dir()
    assert not (output / "merged").exists()  # prefixes are attention inputs, not weights: nothing to merge
    # The result the stage returns for prefix tuning: no model_dir, so the loader stacks base + adapter.
    result = finetune_result(model_dir=None, adapter_dir="adapter", base_model_dir=config.base_model_dir)
    model, tokenizer = load_for_inference(output, result)
    assert type(model).__name__.startswith("Peft")
    prompt = tokenizer("def main(", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4


def test_dpo_with_full_fine_tuning_raises_reward_accuracy_and_margin(tiny_lm) -> None:
    ctx, result, _ = _run(tiny_lm, _section(objective="dpo", method="full", train={"lr": 1e-3}), "dpo")
    assert result.initial_val_loss == pytest.approx(0.6931, abs=1e-3)  # policy = reference: -log sigmoid(0)
    assert result.val_loss < result.initial_val_loss
    assert result.reward_accuracy > result.initial_reward_accuracy
    assert result.reward_margin > result.initial_reward_margin
    assert result.val_perplexity is None
    client = MlflowClient(ctx.tracker.tracking_uri)
    assert [m.step for m in client.get_metric_history(ctx.tracker.run_id, "reward_accuracy")] == [0, 6, 12]


def test_dpo_with_lora_uses_the_model_without_adapters_as_reference(tiny_lm, tmp_path: Path) -> None:
    section = _section(objective="dpo", method="lora", train={"lr": 1e-2, "max_steps": 10}, eval={"every_steps": 10})
    session, _ = _local(tiny_lm, section, "dpo-lora", tmp_path)
    first, last = session.evaluations[0], session.evaluations[-1]
    assert first["val_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert last["val_loss"] < first["val_loss"]
    assert last["reward_margin"] > first["reward_margin"]
    assert session.last_checkpoint is not None and (session.last_checkpoint / "merged" / "config.json").is_file()


def test_distillation_trains_a_smaller_student_on_the_teachers_tokenizer(tiny_lm, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    student = {"hidden_size": 64, "num_layers": 1, "num_heads": 1, "max_position_embeddings": 256}
    section = _section(objective="distill", method="full", distill={"student": student, "temperature": 2.0, "alpha": 0.5})
    session, config = _local(tiny_lm, section, "distill", tmp_path)
    assert session.final["val_loss"] < session.final["initial_val_loss"]
    assert session.last_checkpoint is not None
    model = AutoModelForCausalLM.from_pretrained(str(session.last_checkpoint / "merged"))
    teacher = AutoModelForCausalLM.from_pretrained(config.base_model_dir)
    assert model.config.hidden_size == 64
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in teacher.parameters()) / 3
    assert model.config.vocab_size == teacher.config.vocab_size


def test_qlora_on_a_machine_without_cuda_fails_naming_the_method(tiny_lm) -> None:
    import sys as _sys

    import torch

    from kubeforge.finetune.methods import load_base
    from kubeforge.finetune.stage import run

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    section = _section(method="qlora", resources={"workers": 1, "use_gpu": True})
    ctx = tiny_lm.context("finetune", section, "qlora")
    started = time.monotonic()
    with pytest.raises(StageError, match=r"spec\.finetune\.method: 'qlora' .* needs a CUDA GPU .* use method 'lora'"):
        run(FinetuneSpec.model_validate(section), ctx)
    assert time.monotonic() - started < 10
    # Inside a worker (or a Tune trial) the same check comes before bitsandbytes is imported.
    with pytest.raises(StageError, match=r"spec\.finetune\.method: 'qlora'"):
        load_base(FinetuneSpec.model_validate(section), _base_dir(tiny_lm), torch.device("cpu"))
    assert "bitsandbytes" not in _sys.modules
    # Without use_gpu the manifest itself is refused.
    with pytest.raises(ValidationError, match=r"set resources\.use_gpu: true"):
        FinetuneSpec.model_validate(_section(method="qlora"))


def test_target_modules_the_model_lacks_fail_listing_the_ones_it_has(tiny_lm) -> None:
    from kubeforge.finetune.stage import run

    section = _section(method="lora", lora={"target_modules": ["q_proj", "query_key_value"]})
    ctx = tiny_lm.context("finetune", section, "bad-targets")
    with pytest.raises(StageError) as caught:
        run(FinetuneSpec.model_validate(section), ctx)
    message = str(caught.value)
    assert "spec.finetune.lora.target_modules: query_key_value is not a linear layer of the base model" in message
    assert "it has down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in message
    assert not (ctx.out_dir / "ray").exists()


def test_a_student_with_another_tokenizer_fails_naming_student_path(tiny_lm, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from kubeforge.finetune.stage import run

    student_dir = tmp_path / "student"
    shutil.copytree(_base_dir(tiny_lm), student_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    tokenizer.add_tokens(["<|student_only|>"])
    tokenizer.save_pretrained(str(student_dir))
    section = _section(objective="distill", method="full", distill={"student_path": str(student_dir)})
    ctx = tiny_lm.context("finetune", section, "bad-student")
    with pytest.raises(StageError, match=r"spec\.finetune\.distill\.student_path: the student's tokenizer \(513 tokens\) differs from the teacher's \(512 tokens"):
        run(FinetuneSpec.model_validate(section), ctx)


@pytest.mark.slow
def test_vllm_serves_the_merged_lora_model(lora_runs) -> None:
    from tests.helpers import VLLM_SCRIPT

    _, (ctx, result, _), _ = lora_runs
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", VLLM_SCRIPT, str(ctx.out_dir / result.model_dir)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    assert json.loads(line[len("RESULT"):])["tokens"] == 8
