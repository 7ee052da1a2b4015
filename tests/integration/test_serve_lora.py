"""LoRA adapters as variants (`spec.lora`) on a real Ray Serve and vLLM: one deployment serves the base
model of the tiny LM and three adapters over it (stable, candidate and a further one named `sql`), each
answering as peft computes it; the model's name is split between the adapters by weight; a canary between
two adapter versions is promoted, and one with an injected fault is rolled back, judged by Debian's
Prometheus, with no replica added.

The adapters come from `tests.lora_fixtures`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kubeforge.errors import KubeForgeError
from kubeforge.registry.audit import CHAMPION
from kubeforge.registry.client import Registry
from kubeforge.rollout.controller import TAG_RESULT, RolloutController, RolloutStore, Subject
from kubeforge.rollout.queries import CANDIDATE, STABLE
from kubeforge.serve.app import LORA_DEPLOYMENT, VariantModel, build_app
from kubeforge.serve.local import ServeRouter, lora_base
from kubeforge.serve.resolve import resolve_adapter
from kubeforge.serve.router import VARIANT_HEADER, VERSION_HEADER
from kubeforge.spec.deployment import DeploymentSpec
from tests.helpers import free_port, running_prometheus
from tests.lora_fixtures import LORA_MODEL, LORA_VERSIONS, PROMPT, LoraRegistry, complete, peft_greedy, served_greedy
from tests.rollout_helpers import Traffic, canary, drive, wait_until_the_candidate_is_idle

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

APP = "kubeforge-serve-lora"
MODEL = LORA_MODEL
ADAPTERS = LORA_VERSIONS


@pytest.fixture(scope="module")
def registry(lora_registry: LoraRegistry) -> Registry:
    return lora_registry.registry


@pytest.fixture(scope="module")
def served(ray_local, registry, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The application as `kubeforge serve` resolves it: every adapter downloaded, their common base found."""
    from ray import serve

    spec = DeploymentSpec.model_validate({
        "model": f"models:/{MODEL}/{ADAPTERS[STABLE]}",
        "engine": {"max_model_len": 256, "dtype": "float32"},
        "resources": {"cpus_per_replica": 0.25},
        "lora": {"max_rank": 8, "adapters": {"sql": f"models:/{MODEL}/{ADAPTERS['sql']}"}},
    })
    cache = tmp_path_factory.mktemp("cache")
    adapters = {variant: resolve_adapter(f"models:/{MODEL}/{version}", registry, cache, 8)
                for variant, version in ADAPTERS.items()}
    base = lora_base(adapters, registry, cache, "cpu")
    variants = [VariantModel(v, a.model, a.version, a.path) for v, a in adapters.items()]
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    handle = serve.run(build_app(variants, spec, weight=0, base=base), name=APP, route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "handle": handle, "adapters": adapters, "base": base}
    serve.delete(APP)
    serve.shutdown()


def test_each_adapter_answers_as_peft_computes_it(served):
    base: Path = served["base"].path
    logprobs = {}
    for variant, adapter in [*served["adapters"].items(), ("base", None)]:
        text, logprobs[variant] = served_greedy(served["url"], f"{MODEL}:{variant}")
        expected_text, expected = peft_greedy(base, adapter.path if adapter is not None else None)
        assert text == expected_text, variant
        assert logprobs[variant] == pytest.approx(expected, rel=1e-3, abs=1e-3), variant
    # Each adapter changes the model its own way: no two answers are equally likely.
    assert len({round(v, 2) for v in logprobs.values()}) == len(logprobs), logprobs


def test_the_model_name_is_split_between_the_adapters_by_weight(served):
    url, handle = served["url"], served["handle"]
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    try:
        for weight, variant in ((100, CANDIDATE), (0, STABLE)):
            handle.set_weight.remote(weight).result()
            for _ in range(3):
                response = complete(url, MODEL)
                assert response.headers[VARIANT_HEADER] == variant
                assert response.headers[VERSION_HEADER] == ADAPTERS[variant]
                # The router named the chosen adapter in the request, and vLLM's answer names it.
                assert response.json()["model"] == f"{MODEL}:{variant}"
            pinned, _ = served_greedy(url, f"{MODEL}:{variant}")
            streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
            assert "".join(chunk.choices[0].text for chunk in streamed) == pinned
    finally:
        handle.set_weight.remote(0).result()


def test_models_lists_the_base_and_every_adapter(served):
    cards = {c["id"]: c for c in httpx.get(served["url"] + "/v1/models", timeout=60).json()["data"]}
    assert set(cards) == {MODEL, f"{MODEL}:base", *(f"{MODEL}:{v}" for v in ADAPTERS)}
    assert {cards[f"{MODEL}:{v}"]["parent"] for v in ADAPTERS} == {f"{MODEL}:base"}


def test_every_variant_runs_on_the_same_replica(served):
    from ray import serve

    deployments = serve.status().applications[APP].deployments
    assert set(deployments) == {"Router", LORA_DEPLOYMENT}
    assert sum(deployments[LORA_DEPLOYMENT].replica_states.values()) == 1
    health = httpx.get(served["url"] + "/healthz", timeout=60)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text


# --- refusals, before anything is served -----------------------------------------------------------


def test_versions_without_a_lora_adapter_or_above_max_rank_are_refused(registry, tmp_path):
    with pytest.raises(KubeForgeError, match=r"models:/tinylm-lora/1: version 1 carries no LoRA adapter"):
        resolve_adapter(f"models:/{MODEL}/1", registry, tmp_path, 8)
    with pytest.raises(KubeForgeError, match=r"spec.lora.max_rank: .* has rank 16, above max_rank 8"):
        resolve_adapter(f"models:/{MODEL}/6", registry, tmp_path, 8)
    assert resolve_adapter(f"models:/{MODEL}/6", registry, tmp_path, 16).base_version == "1"


def test_adapters_of_different_bases_are_refused(registry, tmp_path):
    adapters = {v: resolve_adapter(f"models:/{MODEL}/{n}", registry, tmp_path, 8) for v, n in ADAPTERS.items()}
    assert lora_base(adapters, registry, tmp_path, "cpu").version == "1"
    other = dataclasses.replace(adapters[CANDIDATE], base_version="7")
    with pytest.raises(KubeForgeError, match=r"fine-tuned from one base version .*candidate .* from version 7"):
        lora_base({**adapters, CANDIDATE: other}, registry, tmp_path, "cpu")


# --- canaries between adapter versions, against a real Prometheus ------------------------------------


@pytest.fixture(scope="module")
def prometheus(served, tmp_path_factory) -> Iterator[str]:
    port = int(served["url"].rsplit(":", 1)[1])
    with running_prometheus(tmp_path_factory.mktemp("prometheus"), port) as url:
        yield url


def _controller(prometheus: str, registry: Registry, store: Path, steps: list[dict]) -> RolloutController:
    policy = canary(prometheus, f"models:/{MODEL}/{ADAPTERS[CANDIDATE]}", steps)
    subject = Subject(APP, MODEL, ADAPTERS[STABLE], MODEL, ADAPTERS[CANDIDATE])
    return RolloutController(policy, subject, ServeRouter(APP), registry, RolloutStore(store))


def test_a_failing_adapter_canary_is_rolled_back(served, prometheus, registry, tmp_path):
    handle = served["handle"]
    controller = _controller(prometheus, registry, tmp_path, [{"weight": 50, "pause_s": 0}])
    handle.set_faults.remote(CANDIDATE, fail_rate=1.0).result()
    try:
        with Traffic(served["url"], MODEL, {}) as traffic:
            record = drive(controller)
    finally:
        handle.set_faults.remote(CANDIDATE).result()
        handle.set_weight.remote(0).result()
    assert record.phase == "rolled_back" and "error_rate" in record.reason, record.reason
    assert registry.alias(MODEL, CHAMPION).version == ADAPTERS[STABLE]
    assert registry.version(MODEL, ADAPTERS[CANDIDATE]).tags[TAG_RESULT] == "rolled_back"
    seen = traffic.snapshot()
    assert {status for (variant, status) in seen if variant == STABLE} == {200} and seen[CANDIDATE, 503] > 0


def test_a_healthy_adapter_canary_is_promoted_on_the_same_replica(served, prometheus, registry, tmp_path):
    from ray import serve

    # The failures of the canary before must have left the analysis window.
    wait_until_the_candidate_is_idle(prometheus, MODEL, ADAPTERS[CANDIDATE])
    controller = _controller(prometheus, registry, tmp_path, [{"weight": 30, "pause_s": 0}, {"weight": 60, "pause_s": 4}])
    with Traffic(served["url"], MODEL, {}) as traffic:
        record = drive(controller)
    weight = served["handle"].get_weight.remote().result()
    served["handle"].set_weight.remote(0).result()
    assert record.phase == "promoted", record.reason
    assert weight == 100 and [e.weight for e in record.events] == [30, 60, 100]
    assert registry.alias(MODEL, CHAMPION).version == ADAPTERS[CANDIDATE]
    assert {status for _, status in traffic.seen} == {200}
    assert traffic.by_variant(CANDIDATE) > 0 and traffic.by_variant(STABLE) > 0
    assert sum(serve.status().applications[APP].deployments[LORA_DEPLOYMENT].replica_states.values()) == 1
