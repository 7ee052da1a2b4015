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
