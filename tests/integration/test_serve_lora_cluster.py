"""LoRA adapters on a cluster: what the operator pins for a LoRA deployment, and the serveConfigV2 it
writes, deployed to a real local Ray Serve the way KubeRay deploys it (Serve's controller `deploy_apps`,
which the dashboard's `PUT /api/serve/applications/` calls). The same config with a new candidate adapter
then loads into the running replica: its vLLM engine keeps running, the router labels the new version,
and the stable adapter answers throughout.

The replicas download the base and the adapters from the registry themselves, as RayService pods do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from kubeforge.serve.cluster import serve_config
from kubeforge.serve.resolve import resolve_adapter, resolve_model
from kubeforge.serve.router import VERSION_HEADER
from kubeforge.spec.load import parse_deployment
from kubeforge_operator.deployment import Pinned, Unresolved, resolve
from tests.helpers import free_port, wait_for
from tests.lora_fixtures import (
    LORA_MODEL,
    LORA_VERSIONS,
    PROMPT,
    LoraRegistry,
    complete,
    peft_greedy,
    served_greedy,
)
from tests.rollout_helpers import Traffic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

APP = "lora-cluster"
MODEL = LORA_MODEL
STABLE, FIRST, SECOND = LORA_VERSIONS["stable"], LORA_VERSIONS["candidate"], "5"


def manifest(candidate: str, **lora: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": APP},
        "spec": {
            "model": f"models:/{MODEL}/{STABLE}",
            "engine": {"max_model_len": 256, "dtype": "float32"},
            "resources": {"cpus_per_replica": 0.25},
            "lora": {"max_rank": 8, **lora},
            "rollout": {"strategy": "canary", "candidate": f"models:/{MODEL}/{candidate}", "steps": [{"weight": 10}],
                        "analysis": {"prometheus": "http://127.0.0.1:9", "max_error_rate": 0.1}},
        },
    }


def test_the_operator_pins_the_adapters_and_their_base(lora_registry: LoraRegistry) -> None:
    registry = lora_registry.registry
    pinned = resolve(registry, parse_deployment(manifest(FIRST, adapters={"sql": f"models:/{MODEL}/4"})))
    assert pinned == Pinned((MODEL, STABLE), (MODEL, FIRST), (MODEL, "1"), {"sql": (MODEL, "4")})
    # The base itself has no adapter: it cannot be a variant of a LoRA deployment.
    with pytest.raises(Unresolved) as refused:
        resolve(registry, parse_deployment(manifest("1")))
    assert refused.value.field == "spec.rollout.candidate" and "carries no LoRA adapter" in refused.value.message


@pytest.fixture(scope="module")
def deployed(ray_local, lora_registry: LoraRegistry, tmp_path_factory) -> Iterator[tuple[str, Callable[[str], None]]]:
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    cache = tmp_path_factory.mktemp("replica-cache")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def deploy(candidate: str) -> None:
        variants = [{"variant": "stable", "model": MODEL, "version": STABLE},
                    {"variant": "candidate", "model": MODEL, "version": candidate}]
        config = serve_config(APP, manifest(candidate), variants, 0, base={"model": MODEL, "version": "1"})
        # What the operator sets in every RayService pod's environment.
        config["applications"][0]["runtime_env"] = {"env_vars": {
            "MLFLOW_TRACKING_URI": lora_registry.tracking_uri, "KUBEFORGE_MODEL_CACHE": str(cache)}}
        _get_global_client().deploy_apps(ServeDeploySchema.parse_obj(config))

    deploy(FIRST)
    wait_for(lambda: serve.status().applications.get(APP) and serve.status().applications[APP].status == "RUNNING",
             "the application running", timeout_s=300, poll_s=1)
    yield f"http://127.0.0.1:{port}", deploy
    serve.delete(APP)
    serve.shutdown()


def _engine_core() -> psutil.Process:
    """The vLLM engine core under the application's LoRA replica (`ray::ServeReplica:<app>:model-lora`)."""
    for process in psutil.process_iter():
        try:
            parent = process.parent()
            if parent is not None and f"ServeReplica:{APP}:model-lora" in " ".join(parent.cmdline()) and (
                    "EngineCore" in " ".join(process.cmdline()) + process.name()):
                return process
        except psutil.Error:
            continue
    raise AssertionError("no engine core process under the LoRA replica")


def test_a_new_candidate_adapter_loads_into_the_running_replica(deployed, lora_registry, tmp_path: Path) -> None:
    url, deploy = deployed
    registry = lora_registry.registry
    base = resolve_model(f"models:/{MODEL}/1", registry, tmp_path, "vllm", "cpu").path
    expected = {v: peft_greedy(base, resolve_adapter(f"models:/{MODEL}/{v}", registry, tmp_path, 8).path)
                for v in (STABLE, FIRST, SECOND)}
    assert served_greedy(url, f"{MODEL}:candidate")[1] == pytest.approx(expected[FIRST][1], rel=1e-3, abs=1e-3)
    engine = _engine_core()

    def second_answers() -> bool:
        response = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": f"{MODEL}:candidate", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 0})
        if response.status_code != 200:
            return False  # between the old adapter's unloading and the new one's loading: vLLM's 404
        logprob = sum(response.json()["choices"][0]["logprobs"]["token_logprobs"])
        return response.headers[VERSION_HEADER] == SECOND and logprob == pytest.approx(expected[SECOND][1], rel=1e-3,
                                                                                           abs=1e-3)

    with Traffic(url, f"{MODEL}:stable", {}) as stable_traffic:
        deploy(SECOND)
        wait_for(second_answers, "the new candidate adapter answering", timeout_s=180, poll_s=1)
    seen = stable_traffic.snapshot()
    assert seen and {status for _, status in seen} == {200}, seen  # the stable adapter answered throughout
    assert _engine_core().pid == engine.pid and engine.is_running()  # the same engine: nothing restarted
    stable = complete(url, f"{MODEL}:stable")
    assert stable.headers[VERSION_HEADER] == STABLE
    assert sum(stable.json()["choices"][0]["logprobs"]["token_logprobs"]) == pytest.approx(
        expected[STABLE][1], rel=1e-3, abs=1e-3)
    cards = {c["id"] for c in httpx.get(url + "/v1/models", timeout=60).json()["data"]}
    assert cards == {MODEL, f"{MODEL}:base", f"{MODEL}:stable", f"{MODEL}:candidate"}
