"""The ModelDeployment manifest: what it accepts, and the errors that name the field to fix."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubeforge.errors import SpecError
from kubeforge.spec.deployment import parse_model_uri
from kubeforge.spec.load import parse_deployment

pytestmark = pytest.mark.unit

BASE: dict[str, Any] = {
    "apiVersion": "kubeforge.io/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "demo"},
    "spec": {
        "model": "models:/demo@champion",
        "rollout": {
            "strategy": "canary",
            "candidate": "models:/demo@challenger",
            "steps": [{"weight": 10, "pause_s": 30}, {"weight": 50}],
            "analysis": {"prometheus": "http://127.0.0.1:9090", "max_p95_latency_s": 1.5},
        },
    },
}


def problems(spec: dict[str, Any]) -> list[str]:
    doc = copy.deepcopy(BASE)
    doc["spec"] = spec
    with pytest.raises(SpecError) as info:
        parse_deployment(doc)
    return [str(p) for p in info.value.problems]


def test_defaults_and_model_uris() -> None:
    deployment = parse_deployment(BASE)
    spec = deployment.spec
    assert (spec.engine.name, spec.replicas, spec.port, spec.auth) == ("vllm", 1, 8000, None)
    assert spec.rollout is not None and spec.rollout.strategy == "canary"
    assert spec.rollout.analysis.max_error_rate == 0.01  # the default check stays on
    assert parse_model_uri("models:/demo@champion") == ("demo", "@champion")
    assert parse_model_uri("models:/demo/12") == ("demo", "12")


def test_a_model_that_is_not_a_registry_uri_is_named() -> None:
    found = problems({**BASE["spec"], "model": "/tmp/model"})
    assert len(found) == 1 and found[0].startswith("spec.model: must match ")


def test_rollout_errors_point_inside_the_strategy() -> None:
    rollout = copy.deepcopy(BASE["spec"]["rollout"])
    rollout["steps"] = [{"weight": 50}, {"weight": 20}]
    assert problems({**BASE["spec"], "rollout": rollout}) == [
        "spec.rollout.steps: weights must not decrease (got [50, 20])"
    ]
    rollout["steps"] = [{"weight": 150}]
    assert problems({**BASE["spec"], "rollout": rollout}) == ["spec.rollout.steps[0].weight: must be <= 100 (got 150)"]
    same = {**BASE["spec"]["rollout"], "candidate": "models:/demo@champion"}
    assert problems({**BASE["spec"], "rollout": same}) == [
        "spec.rollout.candidate: is the model already served (models:/demo@champion); name the new version"
    ]
    unknown = {**BASE["spec"]["rollout"], "strategy": "bluegreen"}
    (found,) = problems({**BASE["spec"], "rollout": unknown})
    assert found.startswith("spec.rollout: unknown type 'bluegreen'")


def test_analysis_and_ab_settings_are_checked() -> None:
    rollout = copy.deepcopy(BASE["spec"]["rollout"])
    rollout["analysis"] = {"prometheus": "http://p:9090", "max_error_rate": None}
    assert problems({**BASE["spec"], "rollout": rollout}) == [
        "spec.rollout.analysis: an analysis needs at least one threshold or check"
    ]
    ab = {"strategy": "ab", "candidate": "models:/demo/4", "prometheus": "http://p:9090", "weight": 100}
    assert problems({**BASE["spec"], "rollout": ab}) == ["spec.rollout.weight: must be < 100 (got 100)"]
    both = {**BASE["spec"], "replicas": 2, "autoscaling": {"max_replicas": 3}}
    assert problems(both) == ["spec.replicas: fixed replicas and autoscaling exclude each other; drop one"]
    auth = {**BASE["spec"], "auth": {"token_env": "A", "token_file": "/t"}}
    assert problems(auth) == ["spec.auth: set exactly one of token_env, token_file and token_secret"]


def test_a_token_secret_names_one_key_of_a_secret() -> None:
    doc = copy.deepcopy(BASE)
    doc["spec"]["auth"] = {"token_secret": {"name": "serve-token", "key": "token"}}
    auth = parse_deployment(doc).spec.auth
    assert auth is not None and auth.token_secret is not None
    assert (auth.token_secret.name, auth.token_secret.key, auth.token_env) == ("serve-token", "token", None)
    secret = {"name": "serve-token", "key": "token"}
    assert problems({**BASE["spec"], "auth": {"token_env": "A", "token_secret": secret}}) == [
        "spec.auth: set exactly one of token_env, token_file and token_secret"]
    assert problems({**BASE["spec"], "auth": {}}) == [
        "spec.auth: set exactly one of token_env, token_file and token_secret"]
    (bad_name,) = problems({**BASE["spec"], "auth": {"token_secret": {"name": "Serve_Token", "key": "token"}}})
    assert bad_name.startswith("spec.auth.token_secret.name: ")
    (bad_key,) = problems({**BASE["spec"], "auth": {"token_secret": {"name": "serve-token", "key": "a/b"}}})
    assert bad_key.startswith("spec.auth.token_secret.key: ")
    (missing,) = problems({**BASE["spec"], "auth": {"token_secret": {"name": "serve-token"}}})
    assert missing.startswith("spec.auth.token_secret.key: ")
    (empty,) = problems({**BASE["spec"], "auth": {"token_secret": {"name": "", "key": "token"}}})
    assert empty.startswith("spec.auth.token_secret.name: ")


def test_vllm_only_engine_settings_are_refused_for_transformers() -> None:
    spec = {**BASE["spec"], "engine": {"name": "transformers", "kv_cache_gb": 2}}
    (found,) = problems(spec)
    assert found.startswith("spec.engine.kv_cache_gb: sizes vLLM's KV cache") and "drop kv_cache_gb" in found
    spec = {**BASE["spec"], "engine": {"name": "transformers", "quantization": "compressed-tensors"}}
    (found,) = problems(spec)
    assert found.startswith("spec.engine.quantization: 'compressed-tensors' is a vLLM quantization method")
    # The same settings are vLLM's own, and the transformers engine takes its other settings.
    vllm = parse_deployment({**BASE, "spec": {**BASE["spec"], "engine": {"kv_cache_gb": 2, "quantization": "fp8"}}})
    assert (vllm.spec.engine.kv_cache_gb, vllm.spec.engine.quantization) == (2, "fp8")
    transformers = {"name": "transformers", "max_model_len": 128, "dtype": "bfloat16", "max_num_seqs": 4}
    parsed = parse_deployment({**BASE, "spec": {**BASE["spec"], "engine": transformers}})
    assert parsed.spec.engine.model_dump(exclude_none=True) == transformers


def test_lora_serving_names_its_adapters_and_needs_vllm() -> None:
    lora = {"max_rank": 32, "adapters": {"sql-v2": "models:/demo/4"}}
    parsed = parse_deployment({**BASE, "spec": {**BASE["spec"], "lora": lora}})
    assert parsed.spec.lora is not None and parsed.spec.lora.adapters == {"sql-v2": "models:/demo/4"}
    (reserved,) = problems({**BASE["spec"], "lora": {"adapters": {"candidate": "models:/demo/4"}}})
    assert reserved.startswith("spec.lora.adapters: names ['candidate'] are taken")
    (malformed,) = problems({**BASE["spec"], "lora": {"adapters": {"SQL": "models:/demo/4"}}})
    assert malformed.startswith("spec.lora.adapters: names ['SQL'] are not lower-case")
    (rank,) = problems({**BASE["spec"], "lora": {"max_rank": 12}})
    assert rank.startswith("spec.lora.max_rank: ")
    (engine,) = problems({**BASE["spec"], "lora": {}, "engine": {"name": "transformers"}})
    assert engine == "spec.lora: LoRA adapters are served by vLLM; drop lora or use engine.name: vllm"


def test_gpu_settings_of_vllm_are_checked_against_the_replicas_gpus() -> None:
    def on(gpus: float, **engine: Any) -> dict[str, Any]:
        return {**BASE["spec"], "resources": {"gpus_per_replica": gpus}, "engine": engine}

    (fractional,) = problems(on(1.5))
    assert fractional.startswith("spec.resources.gpus_per_replica: above one GPU vLLM splits the model over whole "
                                 "GPUs") and "(got 1.5)" in fractional
    (eager_on_cpu,) = problems(on(0, enforce_eager=False))
    assert eager_on_cpu.startswith("spec.engine.enforce_eager: false asks for CUDA graphs, and these replicas run on "
                                   "CPU")
    (memory_on_cpu,) = problems(on(0, gpu_memory_utilization=0.5))
    assert memory_on_cpu.startswith("spec.engine.gpu_memory_utilization: caps vLLM's share of GPU memory, and these "
                                    "replicas run on CPU")
    (above_share,) = problems(on(0.5, gpu_memory_utilization=0.6))
    assert above_share == ("spec.engine.gpu_memory_utilization: 0.6 is above the replica's share of its GPU "
                           "(resources.gpus_per_replica: 0.5), so the replicas sharing that GPU could not all start; "
                           "use at most 0.5")
    (above_one,) = problems(on(2, gpu_memory_utilization=1.2))
    assert above_one == "spec.engine.gpu_memory_utilization: must be <= 1 (got 1.2)"
    (tiny,) = problems(on(0.05))
    assert tiny.startswith("spec.resources.gpus_per_replica: a share of 0.05 of a GPU leaves vLLM no memory")
    (hf_gpus,) = problems(on(2, name="transformers"))
    assert hf_gpus.startswith("spec.resources.gpus_per_replica: the transformers engine runs a replica on one GPU")
    (hf_eager,) = problems(on(1, name="transformers", enforce_eager=True))
    assert hf_eager.startswith("spec.engine.enforce_eager: chooses between vLLM's eager mode and CUDA graphs")
    (hf_memory,) = problems(on(1, name="transformers", gpu_memory_utilization=0.5))
    assert hf_memory.startswith("spec.engine.gpu_memory_utilization: caps vLLM's share of GPU memory; the "
                                "transformers engine")
    # What each device can honour is accepted: eager on CPU (as it runs anyway) and on GPU, whole GPUs as
    # tensor parallelism, a share with or without an explicit memory share up to it.
    for spec in (on(0, enforce_eager=True), on(1, enforce_eager=False), on(2, enforce_eager=True), on(4),
                 on(0.5), on(0.5, gpu_memory_utilization=0.5), on(0.25, gpu_memory_utilization=0.2),
                 on(0.05, gpu_memory_utilization=0.04), on(1, gpu_memory_utilization=1), on(1, name="transformers")):
        parse_deployment({**BASE, "spec": spec})
