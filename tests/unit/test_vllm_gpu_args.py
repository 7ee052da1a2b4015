"""vLLM's arguments on each device, as vLLM's own parser reads them (no engine starts): eager and one
process on CPU, CUDA graphs on a GPU, tensor parallel workers over whole GPUs, a memory cap on a share of
one; and vLLM's refusal of a model it cannot split, worded with the manifest field to change.

Importing vLLM's parser takes seconds on a small CPU: the tests share one import (the module fixture)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubeforge.errors import KubeForgeError
from kubeforge.serve.engine import engine_config, parse_vllm_args, vllm_args

pytestmark = pytest.mark.unit

ENGINE = {"dtype": "float32", "max_model_len": 64}


@pytest.fixture(scope="module")
def parsed() -> Callable[..., Any]:
    pytest.importorskip("vllm")

    def parse(gpus: float, **engine: Any) -> Any:
        return parse_vllm_args(vllm_args("/models/tiny", ["tiny"], {**ENGINE, **engine}, gpus=gpus))

    return parse


def test_cpu_replicas_run_eager_in_the_engine_process(parsed: Callable[..., Any]) -> None:
    args = parsed(0)
    assert (args.enforce_eager, args.distributed_executor_backend, args.tensor_parallel_size) == (True, "uni", 1)
    # No GPU memory share on CPU: the KV cache is sized by VLLM_CPU_KVCACHE_SPACE there (`app.engine_env`).
    assert "--gpu-memory-utilization" not in vllm_args("/m", ["m"], ENGINE, gpus=0)


def test_one_gpu_captures_cuda_graphs_unless_the_manifest_asks_for_eager(parsed: Callable[..., Any]) -> None:
    args = parsed(1)
    assert (args.enforce_eager, args.distributed_executor_backend, args.tensor_parallel_size) == (False, "uni", 1)
    assert "--gpu-memory-utilization" not in vllm_args("/m", ["m"], ENGINE, gpus=1)  # vLLM's default on a whole GPU
    assert parsed(1, enforce_eager=True).enforce_eager is True
    assert parsed(1, enforce_eager=None).enforce_eager is False


def test_whole_gpus_above_one_are_tensor_parallel_workers(parsed: Callable[..., Any]) -> None:
    args = parsed(2)
    assert (args.tensor_parallel_size, args.distributed_executor_backend, args.enforce_eager) == (2, "mp", False)
    assert parsed(4, gpu_memory_utilization=0.8).gpu_memory_utilization == 0.8


def test_a_share_of_a_gpu_caps_vllms_memory_below_the_share(parsed: Callable[..., Any]) -> None:
    args = parsed(0.5)
    # Two replicas of 0.5 on one GPU: each leaves room for the other's CUDA context, outside vLLM's count.
    assert (args.gpu_memory_utilization, args.tensor_parallel_size, args.distributed_executor_backend) == (
        0.45, 1, "uni")
    assert parsed(0.25).gpu_memory_utilization == 0.2
    assert parsed(0.5, gpu_memory_utilization=0.3).gpu_memory_utilization == 0.3  # the manifest's own share


def test_a_model_that_cannot_be_split_names_the_gpus_field(parsed: Callable[..., Any], tmp_path: Path) -> None:
    # A model's attention heads are known once vLLM reads its config: 3 heads cannot go to 2 GPUs.
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 48,
              "intermediate_size": 64, "num_attention_heads": 3, "num_key_value_heads": 3, "num_hidden_layers": 1,
              "vocab_size": 128, "max_position_embeddings": 64, "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = parse_vllm_args(vllm_args(str(tmp_path), ["tiny"], ENGINE, gpus=2))
    with pytest.raises(KubeForgeError) as info:
        engine_config(args, {"model": "tiny", "version": "3"})
    assert str(info.value) == (
        "spec.resources.gpus_per_replica: vLLM cannot split tiny version 3 over 2 GPUs: Total number of attention "
        "heads (3) must be divisible by tensor parallel size (2); use a number of GPUs the model allows, or 1")
