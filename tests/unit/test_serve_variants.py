"""The Serve application without starting Ray: the variant and weight combinations it refuses, the token
the RayService's application leaves in its pods' environment, and the local refusal of a token that only
Kubernetes can provide."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeforge.errors import KubeForgeError
from kubeforge.serve.app import VariantModel, build_app
from kubeforge.serve.auth import TOKEN_SECRET_OFF_CLUSTER, read_token
from kubeforge.serve.cluster import app_builder, serve_config
from kubeforge.serve.local import ServeOptions, serve_deployment
from kubeforge.spec.load import parse_deployment

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
STABLE = VariantModel("stable", "quickstart", "1", "models:/quickstart/1")
CANDIDATE = VariantModel("candidate", "quickstart", "2", "models:/quickstart/2")


def document(**spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / "deployment.yaml").read_text())
    doc["spec"].update(spec)
    return doc


def router_args(app: Any) -> tuple[Any, ...]:
    """What the Router deployment is bound with: (stable, candidate, labels, weight, sticky, auth, lora, capture,
    monitor)."""
    return tuple(app._bound_deployment.init_args)


@pytest.mark.parametrize(("variants", "weight", "message"), [
    ([CANDIDATE], 100, "expected one 'stable' and at most one 'candidate'"),
    ([STABLE], 20, "no candidate variant is served"),
    ([], 0, "expected one 'stable'"),
    ([STABLE, STABLE], 0, "expected one 'stable'"),
])
def test_impossible_variant_and_weight_combinations_are_refused(
        variants: list[VariantModel], weight: int, message: str) -> None:
    with pytest.raises(KubeForgeError, match=message):
        build_app(variants, parse_deployment(document()).spec, weight=weight)


def test_the_rayservice_application_starts_at_0_and_leaves_the_token_in_the_pods(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBEFORGE_SERVE_TOKEN", "s3cret")
    args = {"deployment": document(auth={"token_env": "KUBEFORGE_SERVE_TOKEN"}),
            "variants": [{"variant": "stable", "model": "quickstart", "version": "1"},
                         {"variant": "candidate", "model": "quickstart", "version": "2"}]}
    app = app_builder(args)
    # The router's user_config sets the weight; the token stays in the pods' environment (from the Secret),
    # out of Serve's deployment config.
    assert router_args(app)[3] == 0
    assert app._bound_deployment.ray_actor_options["runtime_env"] == {"env_vars": {}}
    # `kubeforge serve` hands it over to a local Ray runtime started before the variable was set.
    local = build_app([STABLE], parse_deployment(args["deployment"]).spec, weight=0)
    assert local._bound_deployment.ray_actor_options["runtime_env"] == {"env_vars": {"KUBEFORGE_SERVE_TOKEN": "s3cret"}}


def test_a_kubernetes_secret_token_is_refused_locally_before_anything_starts(tmp_path: Path) -> None:
    doc = parse_deployment(document(auth={"token_secret": {"name": "serve-token", "key": "token"}}))
    assert doc.spec.auth is not None
    with pytest.raises(KubeForgeError) as info:
        read_token(doc.spec.auth)
    assert str(info.value) == TOKEN_SECRET_OFF_CLUSTER
    assert str(info.value).startswith("spec.auth.token_secret: ") and "use token_env or token_file" in str(info.value)
    # The refusal comes first: nothing is resolved in this (absent) registry, no Ray runtime starts.
    options = ServeOptions(workdir=None, registry=None)  # type: ignore[arg-type]
    with pytest.raises(KubeForgeError, match=r"^spec\.auth\.token_secret: "):
        serve_deployment(copy.deepcopy(doc), options, say=print)


def test_a_lora_application_serves_its_base_and_takes_the_adapters_from_user_config() -> None:
    lora = {"max_rank": 32, "adapters": {"sql": "models:/quickstart/4"}}
    variants = [{"variant": "stable", "model": "quickstart", "version": "2"},
                {"variant": "candidate", "model": "quickstart", "version": "3"}]
    config = serve_config("quickstart", document(lora=lora), variants, 20, base={"model": "quickstart", "version": "1"})
    app = app_builder(config["applications"][0]["args"])
    stable, candidate, labels, weight, _, _, is_lora, _, monitor = router_args(app)
    assert monitor is None
    assert is_lora and candidate is None and (labels, weight) == ({}, 0)  # both come with the user_config
    path, label, _, limits = stable._bound_deployment.init_args
    assert stable._bound_deployment.name == "model-lora" and path == "models:/quickstart/1"
    assert label == {"model": "quickstart", "version": "1", "variant": "base"}
    assert limits == {"max_rank": 32, "max_loras": 3}  # stable, candidate and sql in one batch
    # Under spec.lora only the base travels in args; a variant there is refused, and vice versa.
    with pytest.raises(KubeForgeError, match=r"args.variants.0: expected \{variant: base"):
        app_builder({"deployment": document(lora=lora), "variants": variants})
    with pytest.raises(KubeForgeError, match=r"args.variants.0: expected \{variant: stable\|candidate"):
        app_builder({**config["applications"][0]["args"], "deployment": document()})


def test_lora_variants_must_be_versions_of_their_base_model() -> None:
    spec = parse_deployment(document(lora={})).spec
    base = VariantModel("base", "quickstart", "1", "models:/quickstart/1")
    with pytest.raises(KubeForgeError, match=r"must be versions of quickstart \(got \['other'\]\)"):
        build_app([VariantModel("stable", "other", "2", "models:/other/2")], spec, weight=0, base=base)
    with pytest.raises(KubeForgeError, match=r"a base model is served exactly when spec\.lora is set"):
        build_app([STABLE], parse_deployment(document()).spec, weight=0, base=base)


@pytest.mark.parametrize(("gpus", "pod_gpus"), [(2, "2"), (0.5, "1"), (1, "1"), (0, None)])
def test_a_vllm_replica_holds_its_gpus_and_its_pod_has_them(gpus: float, pod_gpus: str | None) -> None:
    from kubeforge_operator.rayservice import replica_pods

    engine = {"name": "vllm", "max_model_len": 256}  # kv_cache_gb is for CPU replicas only
    spec = parse_deployment(document(engine=engine, resources={"gpus_per_replica": gpus})).spec
    stable = router_args(build_app([STABLE], spec, weight=0))[0]._bound_deployment
    # The replica itself holds every GPU of its tensor parallel workers (no placement group), and vLLM
    # learns them from the manifest (`engine.vllm_args`).
    assert stable.ray_actor_options["num_gpus"] == gpus
    assert stable.init_kwargs == {"gpus": gpus}
    assert stable._replica_config.placement_group_bundles is None
    # One replica per pod: the pod has whole GPUs for it, as many as its tensor parallel size.
    assert replica_pods(spec, 1).resources.get("nvidia.com/gpu") == pod_gpus


def test_the_transformers_engine_is_not_told_of_gpus() -> None:
    spec = parse_deployment(document(engine={"name": "transformers"}, resources={"gpus_per_replica": 1})).spec
    stable = router_args(build_app([STABLE], spec, weight=0))[0]._bound_deployment
    assert (stable.ray_actor_options["num_gpus"], stable.init_kwargs) == (1, {})


def test_capture_goes_to_the_manifests_path_or_the_local_folder_and_on_a_cluster_only_to_a_store() -> None:
    spec = parse_deployment(document(capture={"sample_rate": 0.5})).spec
    local = router_args(build_app([STABLE], spec, weight=0, capture_dir="/work/traffic/quickstart"))[7]
    assert local["directory"] == "/work/traffic/quickstart" and local["spec"]["sample_rate"] == 0.5
    assert router_args(build_app([STABLE], parse_deployment(document()).spec, weight=0, capture_dir="/x"))[7] is None
    with pytest.raises(KubeForgeError, match=r"^spec\.capture\.path: no folder"):
        build_app([STABLE], spec, weight=0)
    args = {"deployment": document(capture={"path": "/data/traffic"}),
            "variants": [{"variant": "stable", "model": "quickstart", "version": "1"}]}
    with pytest.raises(KubeForgeError, match=r"^spec\.capture\.path: on a cluster the router's pod keeps no files"):
        app_builder(args)
    args["deployment"] = document(capture={"path": "s3://bucket/traffic"})
    assert router_args(app_builder(args))[7]["directory"] == "s3://bucket/traffic"


def test_on_a_cluster_the_monitor_runs_beside_the_router_which_serves_its_metrics() -> None:
    monitor = {"thresholds": {"token_js": 0.2, "error_rate": 0.05}, "prometheus": "http://prometheus:9090"}
    doc = document(capture={"path": "s3://bucket/traffic"}, monitor=monitor)
    doc["metadata"]["name"] = "watched"
    variants = [{"variant": "stable", "model": "quickstart", "version": "1"}]
    config = serve_config("watched", doc, variants, 0, monitored="1")
    (app,) = config["applications"]
    assert {"name": "Monitor", "user_config": {"version": "1"}} in app["deployments"]
    bound = router_args(app_builder(app["args"]))[8]._bound_deployment
    assert bound.name == "Monitor" and bound.ray_actor_options["num_cpus"] == 1
    name, spec, model, capture, prometheus = bound.init_args
    assert (name, model, capture, prometheus) == ("watched", "quickstart", "s3://bucket/traffic",
                                                  "http://prometheus:9090")
    assert spec["thresholds"] == {**spec["thresholds"], "token_js": 0.2, "error_rate": 0.05}
    # Without spec.monitor nothing of it is deployed; with one, the served version is required.
    assert router_args(app_builder({"deployment": document(), "variants": variants}))[8] is None
    with pytest.raises(KubeForgeError, match="monitored: the version the monitor reads"):
        serve_config("watched", doc, variants, 0)


def test_the_monitors_exposition_is_its_metrics_alone() -> None:
    from prometheus_client import generate_latest

    from kubeforge import metrics
    from kubeforge.serve.monitor_server import MonitorMetrics

    metrics.MONITOR_SIGNAL.labels("exposed", "token_js").set(0.31)
    metrics.ROLLOUT_WEIGHT.labels("exposed").set(20)
    text = generate_latest(MonitorMetrics()).decode()
    assert 'kubeforge_monitor_signal{deployment="exposed",signal="token_js"} 0.31' in text
    assert "kubeforge_rollout" not in text and "kubeforge_stage" not in text
