"""On a cluster, every metric a dashboard panel reads is exported by a pod that a monitor of the chart
selects (issue [9/11], fault 4). The chart is rendered by helm; the pods are the operator's own: its
Deployment from the chart, and the stage and serving pods its builders make."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubeforge import metrics as stage_metrics
from kubeforge.serve.protocol import Metrics
from kubeforge.spec.load import parse_deployment
from kubeforge_operator import metrics as operator_metrics
from kubeforge_operator.rayjob import stage_rayjob
from kubeforge_operator.rayservice import rayservice
from tests.dashboards import dashboard_files, family_series, metric_names, panel_queries
from tests.unit.test_helm_charts import CHART, by_kind, render
from tests.unit.test_operator_builders import (
    CONFIG,
    DEPLOYMENT_OWNER,
    OWNER,
    VARIANTS,
    deployment_document,
    gpu_everywhere,
    pod_running,
    quickstart,
)

pytestmark = pytest.mark.unit

MONITORED = [CHART / "ci" / "cluster-wide-full-values.yaml", CHART / "ci" / "namespaced-two-values.yaml"]


@dataclass(frozen=True)
class Exporter:
    """A pod serving metric `families` at `path` on its container port named `port`."""

    what: str
    namespace: str
    labels: dict[str, str]
    ports: dict[str, int]
    port: str
    path: str
    families: frozenset[str]


def families(registry: Any, leave_out: tuple[Any, ...] = ()) -> frozenset[str]:
    """The series names a prometheus_client registry exports, those of the `leave_out` metrics excepted."""
    left_out = {family.name for metric in leave_out for family in metric.collect()}
    return frozenset(series for family in registry.collect() if family.name not in left_out
                     for series in family_series(family.name, family.type))


def pod(template: dict[str, Any]) -> tuple[dict[str, str], dict[str, int]]:
    ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    return dict(template["metadata"].get("labels") or {}), ports


def operator_deployments(docs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [d for d in by_kind(docs, "Deployment")
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"]


def serving(group: str = "headGroupSpec") -> dict[str, Any]:
    """The pod template of a RayService's head (or its replicas' workers) as the operator builds it."""
    document = deployment_document()
    cluster = rayservice(parse_deployment(document), document, VARIANTS, 20, DEPLOYMENT_OWNER, CONFIG)[
        "spec"]["rayClusterConfig"]
    return cluster[group]["template"] if group == "headGroupSpec" else cluster[group][0]["template"]


def exporters(docs: tuple[dict[str, Any], ...]) -> list[Exporter]:
    (operator,) = operator_deployments(docs)
    out = [Exporter("operator", operator["metadata"]["namespace"], *pod(operator["spec"]["template"]),
                    "metrics", "/metrics", families(operator_metrics.REGISTRY))]
    # A stage's driver sets the stage, training, tuning, evaluation and promotion metrics; never the rollout's.
    stage = families(stage_metrics.REGISTRY, leave_out=stage_metrics.ROLLOUT_METRICS)
    for pipeline in (quickstart(), gpu_everywhere()):
        for name in pipeline.stage_names():
            job = stage_rayjob(pipeline, name, OWNER, CONFIG)
            out.append(Exporter(f"stage {name}", OWNER.namespace, *pod(pod_running(job, "driver")),
                                "stage-metrics", "/metrics", stage))
    head = serving()
    out.append(Exporter("router", DEPLOYMENT_OWNER.namespace, *pod(head), "serve", "/metrics",
                        families(Metrics().registry)))
    return out


def in_namespaces(selector: dict[str, Any], own: str, namespace: str) -> bool:
    if selector.get("any"):
        return True
    return namespace in selector.get("matchNames", [own])


def labels_match(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"selector not understood here: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def scrapes(monitor: dict[str, Any], exporter: Exporter, docs: tuple[dict[str, Any], ...]) -> bool:
    """Whether prometheus-operator turns `monitor` into a scrape of `exporter`'s port and path."""
    spec, own = monitor["spec"], monitor["metadata"]["namespace"]
    if not in_namespaces(spec.get("namespaceSelector", {}), own, exporter.namespace):
        return False
    if monitor["kind"] == "PodMonitor":
        return labels_match(spec["selector"], exporter.labels) and any(
            e["port"] == exporter.port and e.get("path", "/metrics") == exporter.path
            for e in spec["podMetricsEndpoints"])
    for service in by_kind(docs, "Service"):
        meta = service["metadata"]
        if (meta["namespace"] != exporter.namespace or not labels_match(spec["selector"], meta.get("labels", {}))
                or not all(exporter.labels.get(k) == v for k, v in service["spec"].get("selector", {}).items())):
            continue
        for endpoint in spec["endpoints"]:
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                if (port.get("name") == endpoint["port"] and endpoint.get("path", "/metrics") == exporter.path
                        and target in (exporter.port, exporter.ports.get(exporter.port))):
                    return True
    return False


def dashboard_series() -> dict[str, set[str]]:
    """{series name: the panels that read it} over every dashboard."""
    read: dict[str, set[str]] = {}
    for path in dashboard_files():
        for title, expr in panel_queries(path):
            for name in metric_names(expr):
                read.setdefault(name, set()).add(f"{path.name} / {title}")
    return read


@pytest.mark.parametrize("values", MONITORED, ids=lambda p: Path(p).stem)
def test_every_dashboard_metric_is_scraped_from_a_pod_that_exports_it(values: Path) -> None:
    docs = render(CHART, (values,))
    monitors = by_kind(docs, "PodMonitor") + by_kind(docs, "ServiceMonitor")
    scraped = [e for e in exporters(docs) if any(scrapes(m, e, docs) for m in monitors)]
    assert {e.what for e in scraped} >= {"operator", "router", "stage data", "stage evaluate"}
    covered = set().union(*(e.families for e in scraped))
    missing = {name: sorted(panels) for name, panels in dashboard_series().items() if name not in covered}
    assert not missing, f"dashboard metrics no monitored pod exports: {missing}"


def test_only_one_pod_per_ray_cluster_is_scraped() -> None:
    """Any pod's Serve proxy reaches the one router replica: scraping every pod would count its series twice."""
    docs = render(CHART, (MONITORED[0],))
    worker = serving("workerGroupSpecs")
    as_exporter = Exporter("router worker", DEPLOYMENT_OWNER.namespace, *pod(worker), "serve", "/metrics",
                           frozenset())
    assert not any(scrapes(m, as_exporter, docs) for m in by_kind(docs, "PodMonitor"))


def test_the_operator_gets_the_charts_prometheus_address() -> None:
    docs = render(CHART, (MONITORED[0],))
    (deployment,) = operator_deployments(docs)
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBEFORGE_OPERATOR_PROMETHEUS_URL"] == "http://kube-prometheus-stack-prometheus.monitoring:9090"
    defaults = render(CHART)
    (plain,) = operator_deployments(defaults)
    assert "KUBEFORGE_OPERATOR_PROMETHEUS_URL" not in {e["name"] for e in plain["spec"]["template"]["spec"]
                                                       ["containers"][0]["env"]}


def test_a_rollout_without_a_prometheus_address_takes_the_operators() -> None:
    from kubeforge.errors import KubeForgeError, SpecError
    from kubeforge.spec.deployment import prometheus_url
    from kubeforge_operator.deployment import validate

    document = deployment_document()
    del document["spec"]["rollout"]["analysis"]["prometheus"]
    model = validate(document, "http://prometheus.monitoring:9090")
    assert model.spec.rollout is not None and prometheus_url(model.spec.rollout) == "http://prometheus.monitoring:9090"
    named = validate(deployment_document(), "http://prometheus.monitoring:9090")
    assert named.spec.rollout is not None and prometheus_url(named.spec.rollout) == (
        deployment_document()["spec"]["rollout"]["analysis"]["prometheus"])
    with pytest.raises(SpecError, match=r"spec.rollout.analysis.prometheus: required: the operator has no Prometheus"):
        validate(document, None)
    # `kubeforge serve` has no operator to ask.
    local = parse_deployment(document)
    assert local.spec.rollout is not None
    with pytest.raises(KubeForgeError, match=r"spec.rollout.analysis.prometheus: required here"):
        prometheus_url(local.spec.rollout)
