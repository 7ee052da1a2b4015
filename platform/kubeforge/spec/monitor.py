"""`spec.monitor` of a ModelDeployment: drift and SLO signals of the served traffic, computed on a schedule
and exported to Prometheus, and the retraining loop they may start (`spec.monitor.retrain`).

A section of the deployment rather than a kind of its own: a monitor reads one deployment's capture and asks
the Prometheus its rollouts ask, and the retraining it is to trigger ends in a canary on that same deployment.
One object keeps them in one place, validated together.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from kubeforge.spec.base import StrictModel
from kubeforge.spec.data import Source

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Share = Annotated[float, Field(gt=0, lt=1)]

TRAFFIC_SIGNALS = ("prompt_length_psi", "prompt_length_ks", "token_js", "loglik_shift", "token_js_training")
"""Computed from the captured prompts: the reference window against the current one (`token_js_training`: the
current window against the training corpus)."""
TRAINING_DOCUMENT_CHARS = 4096
"""Of each sampled training document, only its beginning is tokenized: the token frequencies need no more."""
SLO_SIGNALS = ("error_rate", "p95_latency_s")
"""Asked of Prometheus: the stable variant's share of 5xx answers and its 95th percentile latency."""


class Thresholds(StrictModel):
    """The signals the monitor computes, each with the value above which it counts as crossed. A signal
    without a threshold is not computed."""

    prompt_length_psi: PositiveFloat | None = None
    """Population stability index of prompt lengths in tokens (above 0.25 is usually read as a major shift)."""
    prompt_length_ks: Share | None = None
    """Two-sample Kolmogorov-Smirnov statistic of prompt lengths."""
    token_js: Share | None = None
    """Jensen-Shannon divergence (base 2) of the prompts' token frequencies under the served model's tokenizer."""
    loglik_shift: PositiveFloat | None = None
    """How much higher the current prompts' mean negative log-likelihood per token is under the served model
    than the reference's (nats per token)."""
    token_js_training: Share | None = None
    """Jensen-Shannon divergence (base 2) of the current prompts' token frequencies against those of a sample of
    the served model's training corpus (`training_data`), under its tokenizer."""
    error_rate: Share | None = None
    """Share of the stable variant's requests answered with a 5xx status, from Prometheus."""
    p95_latency_s: PositiveFloat | None = None
    """The stable variant's 95th percentile request latency, from Prometheus."""

    def items(self) -> list[tuple[str, float]]:
        return [(name, value) for name in (*TRAFFIC_SIGNALS, *SLO_SIGNALS)
                if (value := getattr(self, name)) is not None]

    @model_validator(mode="after")
    def _one_at_least(self) -> Thresholds:
        if not self.items():
            raise ValueError(f"set a threshold for at least one signal ({', '.join((*TRAFFIC_SIGNALS, *SLO_SIGNALS))})")
        return self


class AlertmanagerTrigger(StrictModel):
    """Start a turn when Alertmanager notifies a firing alert (its `webhook_configs` pointed at
    `http://<host>:<port>/alertmanager`, where `kubeforge serve` listens)."""

    port: Annotated[int, Field(ge=1, le=65535)] = 9110
    alerts: Annotated[list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]], Field(min_length=1)] = (
        Field(default_factory=lambda: ["KubeForgeTrafficDrift"]))
    """Alert names that start a turn, when their `deployment` label is this deployment or their `model` label
    the model it serves."""


class RetrainSpec(StrictModel):
    """Start a retraining run when a signal crosses its threshold (or on a schedule), and roll its new
    `challenger` out by the deployment's canary (`spec.rollout`)."""

    pipeline: Annotated[str, Field(min_length=1)]
    """The pipeline to run again, with the captured traffic added to its data sources: a ModelPipeline manifest
    file (relative to this manifest's folder) for `kubeforge serve`. It must register the model this deployment
    serves and promote to `challenger`."""
    on_drift: bool = True
    """Start a turn when a signal crosses its threshold."""
    schedule_s: PositiveFloat | None = None
    """Also start a turn this long after the previous one ended (or after the monitor started), drift or not."""
    alertmanager: AlertmanagerTrigger | None = None
    """Also start a turn when Alertmanager posts one of these alerts, firing; null listens for none."""
    traffic_text: Literal["prompt", "completion", "both"] = "both"
    """What of each captured request becomes a document of the retraining corpus (`type: served-traffic`)."""
    cooldown_s: Annotated[float, Field(ge=0)] = 3600.0
    """No turn starts sooner than this after the previous one ended, whatever its outcome."""
    max_turns_per_day: PositiveInt = 4
    """At most this many turns start in any 24 hours."""
    enabled: bool = True
    """The kill switch in the manifest (`kubeforge loop pause` is the one at run time): false computes and
    exports the signals but starts no turn."""

    @model_validator(mode="after")
    def _has_a_trigger(self) -> RetrainSpec:
        if not self.on_drift and self.schedule_s is None and self.alertmanager is None:
            raise ValueError("on_drift is false and neither schedule_s nor alertmanager is set, so no turn would "
                             "ever start (but by hand); set one")
        return self


class MonitorSpec(StrictModel):
    """Drift of the served traffic, on a schedule, as Prometheus metrics; optionally, retraining on it."""

    interval_s: PositiveFloat = 300.0
    """How often the signals are computed."""
    window_requests: PositiveInt = 500
    """Size of each window of answered prompts: the reference is the first this many the served version
    answered, the current window the latest this many after those."""
    min_requests: PositiveInt = 100
    """Fewer answered prompts than this in either window: the traffic signals are not computed (no decision on
    too little data)."""
    thresholds: Thresholds
    prometheus: Annotated[str, Field(pattern=r"^https?://")] | None = None
    """The Prometheus asked for error_rate and p95_latency_s; null: the rollout analysis's (or, on Kubernetes,
    the operator's)."""
    training_data: tuple[Source, ...] = ()
    """The corpus the served model was trained on, as sources of a pipeline's `spec.data.sources` (relative
    paths against this manifest's folder; object-store URIs or python-stdlib on Kubernetes), for
    `token_js_training`: `window_requests` of its documents are sampled evenly across its files, each its first
    4,096 characters, once per served version."""
    slo_window: Annotated[str, Field(pattern=r"^[0-9]+[smh]$")] = "5m"
    """PromQL range of the error-rate and latency signals."""
    retrain: RetrainSpec | None = None
    """Null: the monitor only exports its signals."""

    @model_validator(mode="after")
    def _windows(self) -> MonitorSpec:
        if self.min_requests > self.window_requests:
            raise ValueError(f"min_requests ({self.min_requests}) is above window_requests ({self.window_requests}), "
                             "so no window could ever be full enough")
        if (self.thresholds.token_js_training is None) != (not self.training_data):
            raise ValueError("thresholds.token_js_training compares the traffic with training_data: set both or "
                             "neither")
        return self
