"""A registry holding the tiny LM's base and LoRA adapters over it, registered as a fine-tuning registers
them: versions whose `kubeforge.lora_adapter` tag names the run's adapter folder and whose
`kubeforge.parent_version` names the base. The adapters are made with peft (random, non-zero weights, so
each answers differently)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from kubeforge.registry.audit import CHAMPION
from kubeforge.registry.client import TAG_LORA_ADAPTER, TAG_PARENT_VERSION, Registry

PROMPT = "def add(a, b):"
LORA_MODEL = "tinylm-lora"
LORA_VERSIONS = {"stable": "2", "candidate": "3", "sql": "4"}
"""Adapters of rank 8 over version 1 (the base), by the variant the serving tests give them; version 5 is
another of rank 8, version 6 one of rank 16."""


@dataclass(frozen=True)
class LoraRegistry:
    registry: Registry
    tracking_uri: str


def make_adapter(base: Path, target: Path, seed: int, rank: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=rank, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(target)


@pytest.fixture(scope="session")
def lora_registry(tiny_lm, tmp_path_factory: pytest.TempPathFactory) -> LoraRegistry:
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("lora-registry")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("lora", artifact_location=(root / "artifacts").as_uri())
    registry = Registry(uri)
    base = tiny_lm.pretrain.directory / "model"
    run = client.create_run(experiment).info.run_id
    client.log_artifacts(run, str(base), "model")
    registry.register(LORA_MODEL, run_id=run, artifact_path="model", tags={"kubeforge.role": "base"})
    for seed, rank in ((2, 8), (3, 8), (4, 8), (5, 8), (6, 16)):
        folder = root / f"adapter-{seed}"
        make_adapter(base, folder, seed, rank)
        run = client.create_run(experiment).info.run_id
        client.log_artifacts(run, str(folder), "adapter")
        registry.register(LORA_MODEL, run_id=run, artifact_path="adapter",
                          tags={TAG_PARENT_VERSION: "1", TAG_LORA_ADAPTER: "adapter", "kubeforge.role": "finetuned"})
    registry.promote(LORA_MODEL, LORA_VERSIONS["stable"], alias=CHAMPION, reason="first release", user="test")
    return LoraRegistry(registry, uri)


def complete(url: str, model: str) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 0}
    response = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response


def served_greedy(url: str, model: str) -> tuple[str, float]:
    """The served greedy answer and the log-probability of its tokens."""
    choice = complete(url, model).json()["choices"][0]
    return choice["text"], sum(choice["logprobs"]["token_logprobs"])


def peft_greedy(base: Path, adapter: Path | None) -> tuple[str, float]:
    """`served_greedy` as transformers and peft compute it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1]:]
    logprob = sum(torch.log_softmax(logits[0], -1)[token].item() for logits, token in zip(out.logits, tokens, strict=True))
    return tokenizer.decode(tokens), logprob
