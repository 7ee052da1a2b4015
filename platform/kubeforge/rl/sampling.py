"""Where the rl stage's completions are sampled: vLLM in the worker's own process where it is installed
(`rollout.engine: vllm`, or `auto`), else `transformers` generate.

vLLM runs in-process (V1 multiprocessing off, as TRL's colocate mode), so each Ray Train worker has its
own engine on its own device. Its weights follow the policy: before a step's rollouts the recipe hands it
the current policy's weights (LoRA merged) through `reload_weights`, which loads a checkpoint-format
iterator in place. Sampling is seeded per request (`SamplingParams.seed`), so the same weights and seed
draw the same completions, which is what a resumed run relies on.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Sequence

import torch

from kubeforge.spec.rl import RolloutSettings


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_engine(spec: RolloutSettings) -> str:
    """`vllm` or `transformers` for `rollout.engine` (`auto`: vLLM where it is installed)."""
    if spec.engine == "auto":
        return "vllm" if vllm_available() else "transformers"
    return spec.engine


class VllmSampler:
    """A vLLM engine in this process holding a copy of the policy's weights."""

    def __init__(self, model_dir: str, max_model_len: int, bf16: bool, spec: RolloutSettings) -> None:
        # vLLM's platform (its CPU build, or CUDA) decides the device: a Ray Train worker sees its own GPU.
        # Read when the engine is made: an in-process engine shares this process's device and Python objects.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.vllm_kv_cache_gib))
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        self.spec = spec
        self.llm = LLM(
            model=model_dir, dtype="bfloat16" if bf16 else "float32", max_model_len=max_model_len,
            enforce_eager=True, seed=0, gpu_memory_utilization=spec.vllm_gpu_memory_utilization,
        )

    def load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights)})
        # Cached prefixes hold keys and values of the old weights: every prompt shares the chat template's
        # beginning, so without this each completion would partly come from an earlier policy.
        self.llm.reset_prefix_cache()

    def sample(self, prompt_ids: Sequence[int], count: int, seed: int, eos_ids: Sequence[int]) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            n=count, temperature=self.spec.temperature, top_p=self.spec.top_p, max_tokens=self.spec.max_new_tokens,
            seed=seed, stop_token_ids=list(eos_ids),
        )
        [output] = self.llm.generate([TokensPrompt(prompt_token_ids=list(prompt_ids))], params, use_tqdm=False)
        return [list(choice.token_ids) for choice in output.outputs]
