"""The Ray Serve application behind `kubeforge serve`: one deployment per variant, one router.

```
 client --HTTP--> Router (FastAPI ingress, ONE replica) --handle, streaming--> ModelServer "stable"
                  /v1/completions, /v1/chat/completions,                       ModelServer "candidate"
                  /v1/models, /openapi.json, /healthz, /metrics
```

* `ModelServer` (`engine.py`) runs vLLM's own OpenAI server app over vLLM's engine, in the replica's
  process: every field, default, error and stream chunk of a generation request is vLLM's.
  (`TransformersServer`, `hf_engine.py`, is the engine for what vLLM cannot load.)
* `Router` (`router.py`) authenticates, picks a variant from the body's `model` (weighted random, or
  sticky on a header), hands the request over unchanged and relays the response's bytes
  (`relay.py`), and records the metrics that `kubeforge.rollout.queries` reads from what it relays.
  The candidate weight changes live through a handle call, `router_handle(app_name).set_weight.remote(30)`,
  without restarting any replica.

The router runs exactly one replica, on purpose: the metrics live in its process (its own
`prometheus_client` registry, served at `/metrics`), and so does the weight; a second replica would
split both. It only moves bytes, so one replica keeps up with many engines.

A request's `model` is the registered model name (split between the variants by weight), or
`<name>:stable` / `<name>:candidate` to pin one variant (smoke tests, debugging); each variant's vLLM
serves under both names. Any other name goes to the stable variant, which answers vLLM's 404.
Responses carry `x-kubeforge-variant` and `x-kubeforge-version` headers.

With `spec.lora` (LoRA adapters over one base) a single deployment serves every variant: its replicas
run the base with one adapter per variant (`ModelServer.reconfigure`), the router sends each request to
it with the body's `model` set to the chosen adapter (`<name>:<variant>`, which vLLM's answers then
name), and a rollout only moves the weight between adapters: no replica is added.

`/healthz` is readiness: 200 when every variant answers with a live engine, else 503 naming the
others. A variant replica whose engine died fails Ray Serve's health check and is replaced.

Fault injection (`handle.set_faults.remote("candidate", fail_rate, delay_s)`: `fail_rate` answers that
share of the variant's requests with 503, `delay_s` adds latency before the first token) is for tests of
the rollout machinery only; `kubeforge serve` never sets it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubeforge.errors import KubeForgeError
from kubeforge.rollout.queries import CANDIDATE, STABLE
from kubeforge.serve.protocol import check_weight
from kubeforge.spec.deployment import ABRollout, DeploymentSpec

if TYPE_CHECKING:
    from ray.serve import Application

VARIANTS = (STABLE, CANDIDATE)
LORA_DEPLOYMENT = "model-lora"
"""The deployment serving the base and every variant's adapter, under `spec.lora`."""
MONITOR_DEPLOYMENT = "Monitor"
"""The deployment running `spec.monitor` on a cluster (`monitor_server`), whose user_config names the served version."""
MONITOR_CPUS = 1
"""The monitor's replica scores a window of prompts with the served model on CPU: one core, not an engine's."""
LORA_BASE = "base"
"""The variant label of that base: it is served as `<name>:base`."""
ROUTER_CPUS = 0.1
"""The router only moves bytes between sockets and handles; it must not take a CPU from an engine."""
DEFAULT_MAX_ONGOING = 64
"""Requests a replica accepts at once when engine.max_num_seqs is unset: vLLM batches them itself."""
ENGINE_START_S = 300
"""Health-check timeout of a variant replica: vLLM takes tens of seconds to start on a small CPU."""
HEALTH_CHECK_PERIOD_S = 2.0
"""How often Serve checks a variant's engine: a dead one fails every request routed to its replica until
Serve replaces it, so look more often than Serve's default 10 s (the check reads a flag: it costs nothing)."""


@dataclass(frozen=True)
class VariantModel:
    """One variant to serve: a resolved local model folder and its registry labels."""

    variant: str
    """"stable" or "candidate" (or, for a base of LoRA adapters, "base"; for a further adapter, its name)."""
    model: str
    """The registered model name; clients ask for it in the request's `model` field."""
    version: str
    path: Path | str
    """A local model (or adapter) folder, or `models:/<name>/<version>` that each replica downloads
    (`kubeforge.serve.cluster`)."""


def initial_weight(spec: DeploymentSpec) -> int:
    """The candidate's share when the application starts: an A/B test's fixed split, a canary's first
    step (the rollout controller moves it from there), 0 without a rollout."""
    if spec.rollout is None:
        return 0
    if isinstance(spec.rollout, ABRollout):
        return spec.rollout.weight
    return spec.rollout.steps[0].weight


def build_app(
    variants: list[VariantModel],
    spec: DeploymentSpec,
    *,
    weight: int | None = None,
    hand_over_token: bool = True,
    base: VariantModel | None = None,
    capture_dir: str | None = None,
    monitor: str | None = None,
) -> Application:
    """The application serving `variants` with the engine, resources, replicas, autoscaling and auth of
    `spec`; `weight` overrides `initial_weight(spec)`. With `spec.lora`, `variants` are LoRA adapters
    (stable, candidate and the further adapters of `spec.lora.adapters`) served over `base`; none when
    the deployments' user_config will name them (`kubeforge.serve.cluster`).

    `hand_over_token` copies the value of auth.token_env into the router's runtime_env, for a local Ray
    runtime started before the variable was set. Off on Kubernetes, where every pod has the variable and the
    copy would only put the token into Serve's deployment config.

    With `spec.capture` the router writes its sample under `spec.capture.path`, else under `capture_dir`
    (`kubeforge serve` passes the work directory's traffic folder).

    `monitor`, the deployment's name, runs `spec.monitor` as a deployment of the application
    (`monitor_server`, on a cluster); `kubeforge serve` runs it in its own process instead."""
    from kubeforge.serve import router

    # `@serve.deployment` turns the classes into Deployments, which their static types do not say.
    model_server: Any = engine_deployment(spec.engine.name)
    router_deployment: Any = router.Router

    by_name = {v.variant: v for v in variants}
    further = set(spec.lora.adapters) if spec.lora is not None else set()
    # On a cluster the adapters of a LoRA base come with the user_config (`kubeforge.serve.cluster`).
    later = base is not None and not variants
    if not later and (len(by_name) != len(variants) or set(by_name) - set(VARIANTS) - further or STABLE not in by_name):
        raise KubeForgeError(
            f"variants: expected one 'stable' and at most one 'candidate' (got {[v.variant for v in variants]})"
        )
    if (spec.lora is None) != (base is None):
        raise KubeForgeError("base: a base model is served exactly when spec.lora is set")
    if base is not None and any(v.model != base.model for v in variants):
        raise KubeForgeError(f"variants: LoRA adapters over {base.model} version {base.version} must be versions of "
                             f"{base.model} (got {sorted({v.model for v in variants})})")
    start_weight = check_weight(initial_weight(spec) if weight is None else weight)
    if CANDIDATE not in by_name and start_weight:
        raise KubeForgeError(f"weight: {start_weight}% for a candidate, but no candidate variant is served")

    options, on_gpus = server_options(spec)
    bound: dict[str, Any] = {}
    if base is not None and spec.lora is not None:
        # One deployment serves every variant: the base, with each variant's adapter as its user_config.
        adapters = {f"{v.model}:{v.variant}": str(v.path) for v in by_name.values()}
        lora = {"max_rank": spec.lora.max_rank, "max_loras": spec.lora.slots()}
        label = {"model": base.model, "version": base.version, "variant": LORA_BASE}
        deployment = model_server.options(name=LORA_DEPLOYMENT, user_config={"adapters": adapters}, **options)
        bound[STABLE] = deployment.bind(str(base.path), label, spec.engine.model_dump(), lora, **on_gpus)
    else:
        for variant in by_name.values():
            deployment = model_server.options(name=f"model-{variant.variant}", **options)
            label = {"model": variant.model, "version": variant.version, "variant": variant.variant}
            bound[variant.variant] = deployment.bind(str(variant.path), label, spec.engine.model_dump(), **on_gpus)

    router_env: dict[str, str] = {}
    if hand_over_token and spec.auth is not None and spec.auth.token_env and spec.auth.token_env in os.environ:
        # A local Ray runtime started before the variable was set would not pass it on: hand it over.
        router_env[spec.auth.token_env] = os.environ[spec.auth.token_env]
    front = router_deployment.options(
        num_replicas=1,  # metrics and weight live in this one process (see the module docstring)
        ray_actor_options={"num_cpus": ROUTER_CPUS, "runtime_env": {"env_vars": router_env}},
        max_ongoing_requests=max(1000, 4 * options["max_ongoing_requests"]),
    )
    labels = {v.variant: {"model": v.model, "version": v.version} for v in by_name.values()}
    sticky = spec.rollout.sticky_header if isinstance(spec.rollout, ABRollout) else None
    auth = spec.auth.model_dump() if spec.auth is not None else None
    capture = None
    if spec.capture is not None:
        directory = spec.capture.path or capture_dir
        if directory is None:
            raise KubeForgeError("spec.capture.path: no folder to write the captured traffic to; set an "
                                 "object-store URI (s3://bucket/prefix) the router's pod can write to")
        capture = {"spec": spec.capture.model_dump(mode="json"), "directory": directory}
    monitor_bound = None
    if monitor is not None and spec.monitor is not None:
        from kubeforge.serve.monitor_server import MonitorServer
        from kubeforge.spec.deployment import parse_model_uri

        monitor_server: Any = MonitorServer
        folder = None if capture is None else str(capture["directory"])
        monitor_bound = monitor_server.bind(monitor, spec.monitor.model_dump(mode="json"),
                                            parse_model_uri(spec.model)[0], folder, spec.monitor.prometheus)
    return front.bind(bound[STABLE], bound.get(CANDIDATE), labels, start_weight, sticky, auth, base is not None,
                      capture, monitor_bound)


def server_options(spec: DeploymentSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Serve options of each variant's model-server deployment, and the keyword arguments that hand it
    its GPUs."""
    device = "cuda" if spec.resources.gpus_per_replica > 0 else "cpu"
    env_vars = engine_env(spec, device)
    max_ongoing = spec.engine.max_num_seqs or DEFAULT_MAX_ONGOING
    scaling: dict[str, Any] = (
        {"autoscaling_config": {
            "min_replicas": spec.autoscaling.min_replicas,
            "max_replicas": spec.autoscaling.max_replicas,
            "target_ongoing_requests": spec.autoscaling.target_ongoing_requests,
        }}
        if spec.autoscaling is not None else {"num_replicas": spec.replicas}
    )
    gpus = spec.resources.gpus_per_replica
    # vLLM's replica learns its GPUs from the manifest (`engine.vllm_args`); the transformers engine takes none.
    on_gpus: dict[str, Any] = {"gpus": gpus} if spec.engine.name == "vllm" else {}
    options: dict[str, Any] = {
        "ray_actor_options": {
            "num_cpus": spec.resources.cpus_per_replica,
            # The replica holds all its GPUs, a share of one or the whole ones of its tensor parallel workers
            # (no placement group): Ray then puts them on one node and makes exactly them visible to the
            # replica, whose vLLM starts one worker process per GPU there (`engine.vllm_args`).
            "num_gpus": gpus,
            "runtime_env": {"env_vars": env_vars},
        },
        "max_ongoing_requests": max_ongoing,
        "health_check_timeout_s": ENGINE_START_S,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        **scaling,
    }
    return options, on_gpus


def build_variant_app(variant: VariantModel, spec: DeploymentSpec) -> Application:
    """One variant's model server as an application of its own (`model-<variant>`, no HTTP route): the
    retraining loop serves a new version this way beside the running application, which the router then
    reaches by handle (`Router.attach_candidate`)."""
    options, on_gpus = server_options(spec)
    label = {"model": variant.model, "version": variant.version, "variant": variant.variant}
    deployment = engine_deployment(spec.engine.name).options(name=f"model-{variant.variant}", **options)
    application: Application = deployment.bind(str(variant.path), label, spec.engine.model_dump(), **on_gpus)
    return application


def router_handle(app: str) -> Any:
    """A handle on the router of application `app` for a process that is not a replica (`kubeforge serve`'s
    rollout controller and loop, which call it from plain threads): its requests leave from a loop of its own.
    Serve decides that from RAY_SERVE_THROUGHPUT_OPTIMIZED when it is imported, and with that variable in
    this process's environment (set by the shell, or inherited) it would bind the handle to the caller's
    running event loop, which a plain thread does not have."""
    from ray import serve

    handle = serve.get_app_handle(app)  # cached by Serve: initialised once, here
    if not handle.is_initialized:
        handle._init(_run_router_in_separate_loop=True)
    return handle


def engine_deployment(name: str) -> Any:
    """The variant replica's deployment for `engine.name`: vLLM's `ModelServer` or `TransformersServer`."""
    if name == "transformers":
        from kubeforge.serve import hf_engine

        return hf_engine.TransformersServer
    from kubeforge.serve import engine

    return engine.ModelServer


def engine_env(spec: DeploymentSpec, device: str) -> dict[str, str]:
    """Environment of each variant replica."""
    env: dict[str, str] = {}
    if spec.engine.name == "transformers":
        return env  # the KV-cache setting below is vLLM's; EngineSpec refuses kv_cache_gb for transformers
    kv = spec.engine.kv_cache_gb
    if device == "cpu":
        if kv is not None and not float(kv).is_integer():
            raise KubeForgeError(f"engine.kv_cache_gb: vLLM on CPU sizes its KV cache in whole GiB (got {kv}); "
                                 "use a whole number")
        # vLLM's own CPU default is a share of the machine's memory: too much for two variants on a laptop.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv)) if kv is not None else "1"
    elif kv is not None:
        raise KubeForgeError("engine.kv_cache_gb: sizing the KV cache is supported on CPU only for now; "
                             "drop it for GPU replicas (engine.gpu_memory_utilization sizes vLLM's memory there)")
    return env
