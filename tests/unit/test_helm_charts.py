"""The Helm charts, rendered by the real helm binary and validated object by object.

Built-in kinds are checked strictly against Kubernetes' OpenAPI schemas (kubernetes-validate),
KubeForge and kopf kinds against their CRDs, and every workload and RBAC rule against the policy
the charts promise: non-root, read-only root filesystem, no capabilities, requests and limits,
least privilege without wildcards or Secrets access, and NetworkPolicies that isolate every pod and
let through only what each component needs.
"""

from __future__ import annotations

import filecmp
import functools
import ipaddress
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeforge.spec.load import parse_manifest
from kubeforge.spec.pipeline import pipeline_model
from kubeforge_operator.owner import MANAGED_BY
from tests.k8s_schemas import SchemaValidationError, validate_against_crd, validate_builtin

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubeforge"
PIPELINE_CHART = REPO / "charts" / "kubeforge-pipeline"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
CRDS = {
    "ModelPipeline": CHART / "crds" / "modelpipelines.kubeforge.io.yaml",
    "ModelDeployment": CHART / "crds" / "modeldeployments.kubeforge.io.yaml",
    "KopfPeering": CHART / "crds" / "kopf-peerings.yaml",
    "ClusterKopfPeering": CHART / "crds" / "kopf-peerings.yaml",
}
# Chart copies of files whose source lives in infra/ (Helm cannot read outside a chart).
DASHBOARDS_SRC = REPO / "infra" / "grafana" / "dashboards"
RULES_SRC = REPO / "infra" / "prometheus" / "rules" / "kubeforge-alerts.yml"
RULES_COPY = CHART / "files" / "rules" / "kubeforge-alerts.yml"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}


@functools.cache
def helm_binary() -> Path:
    helm = Path(sys.executable).parent / "helm"
    if not helm.exists():
        pytest.fail(f"no helm at {helm}: run make install-test (infra/local/install.sh fetches it)")
    return helm


def run_helm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    # Helm's own config, cache and plugin folders go to a scratch place so tests never read or
    # write the user's ~/.config/helm.
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "kubeforge-helm-tests"
    env = {
        **os.environ,
        "HELM_CONFIG_HOME": str(scratch / "config"),
        "HELM_CACHE_HOME": str(scratch / "cache"),
        "HELM_DATA_HOME": str(scratch / "data"),
    }
    return subprocess.run([str(helm_binary()), *map(str, args)], capture_output=True, text=True, timeout=60, env=env)


def template_args(chart: Path, values: tuple[Path, ...], sets: tuple[str, ...]) -> list[str | Path]:
    args: list[str | Path] = ["template", "kf", chart, "--namespace", "kubeforge-system", "--include-crds"]
    for file in values:
        args += ["--values", file]
    for assignment in sets:
        args += ["--set", assignment]
    return args


@functools.cache
def render(chart: Path, values: tuple[Path, ...] = (), sets: tuple[str, ...] = ()) -> tuple[dict[str, Any], ...]:
    result = run_helm(*template_args(chart, values, sets))
    assert result.returncode == 0, f"helm template {chart.name} {values} {sets} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render_fails(chart: Path, *sets: str, values: tuple[Path, ...] = ()) -> str:
    result = run_helm(*template_args(chart, values, sets))
    assert result.returncode != 0, f"helm template accepted {sets}"
    return result.stderr


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def ci_id(path: Path) -> str:
    return path.stem


# --- lint ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=ci_id)
def test_platform_chart_lints_strictly(values: Path) -> None:
    result = run_helm("lint", "--strict", CHART, "--values", values)
    assert result.returncode == 0, result.stdout + result.stderr


def test_pipeline_chart_lints_strictly() -> None:
    result = run_helm("lint", "--strict", PIPELINE_CHART)
    assert result.returncode == 0, result.stdout + result.stderr


def test_there_are_at_least_three_ci_values_files() -> None:
    assert {p.name for p in CI_VALUES} >= {
        "default-values.yaml",
        "cluster-wide-full-values.yaml",
        "namespaced-two-values.yaml",
    }


# --- every rendered object matches its schema ----------------------------------------------------


def check_monitoring_object(obj: dict[str, Any]) -> None:
    """monitoring.coreos.com kinds, checked by hand: their CRDs (prometheus-operator) are not
    available offline here, so this checks the fields prometheus-operator needs to act at all."""
    kind, spec = obj["kind"], obj.get("spec") or {}
    assert obj["apiVersion"] == "monitoring.coreos.com/v1", obj["apiVersion"]
    assert obj["metadata"].get("name") and obj["metadata"].get("namespace"), obj["metadata"]
    if kind == "ServiceMonitor":
        assert spec["selector"]["matchLabels"], spec
        assert spec["endpoints"] and all(e.get("port") and e.get("path") for e in spec["endpoints"])
    elif kind == "PodMonitor":
        assert spec["selector"]["matchLabels"], spec
        assert spec["podMetricsEndpoints"] and all(e.get("port") for e in spec["podMetricsEndpoints"])
    elif kind == "PrometheusRule":
        assert spec["groups"], spec
        for group in spec["groups"]:
            assert group["name"] and group["rules"], group
            for rule in group["rules"]:
                assert ("alert" in rule) != ("record" in rule), rule
                assert isinstance(rule["expr"], str) and rule["expr"].strip(), rule
    else:
        pytest.fail(f"unexpected monitoring kind {kind}")


def validate_object(obj: dict[str, Any]) -> None:
    group = obj["apiVersion"].rpartition("/")[0]
    if group in ("kubeforge.io", "kopf.dev"):
        validate_against_crd(obj, CRDS[obj["kind"]])
    elif group == "monitoring.coreos.com":
        check_monitoring_object(obj)
    else:
        validate_builtin(obj)


@pytest.mark.parametrize("values", CI_VALUES, ids=ci_id)
def test_every_rendered_object_validates(values: Path) -> None:
    docs = render(CHART, (values,))
    kinds = {doc["kind"] for doc in docs}
    assert {"Deployment", "ServiceAccount", "Service", "CustomResourceDefinition", "Pod"} <= kinds
    for doc in docs:
        validate_object(doc)


def test_the_chart_ships_the_kubeforge_and_kopf_crds() -> None:
    names = {doc["metadata"]["name"] for doc in by_kind(render(CHART), "CustomResourceDefinition")}
    assert {"kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"} <= names
    for kind in ("ModelPipeline", "ModelDeployment"):
        if CRDS[kind].exists():
            assert f"{kind.lower()}s.kubeforge.io" in names


def test_a_crd_violation_names_the_field() -> None:
    # The validator itself must catch what the API server would refuse, naming the path.
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "x"}, "status": []}
    with pytest.raises(SchemaValidationError, match=r"status: \[\] is not of type 'object'"):
        validate_against_crd(peering, CRDS["KopfPeering"])
    deployment = next(d for d in render(CHART) if d["kind"] == "Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(SchemaValidationError, match="spec"):
        validate_builtin(broken)


# --- policy --------------------------------------------------------------------------------------


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "Pod":
        return obj["spec"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


@pytest.mark.parametrize("values", CI_VALUES, ids=ci_id)
def test_every_workload_is_hardened(values: Path) -> None:
    workloads = [doc for doc in render(CHART, (values,)) if doc["kind"] in WORKLOAD_KINDS]
    assert workloads
    for workload in workloads:
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        spec = pod_spec(workload)
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        assert all("hostPath" not in volume for volume in spec.get("volumes", [])), name
        pod_context = spec.get("securityContext", {})
        assert pod_context.get("runAsNonRoot") is True, name
        assert pod_context.get("runAsUser", 0) > 0, name
        assert pod_context.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        mounts_tmp = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for container in spec["containers"] + spec.get("initContainers", []):
            where = f"{name} container {container['name']}"
            context = container.get("securityContext", {})
            assert context.get("privileged") is False, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context.get("runAsNonRoot") is True, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not context.get("capabilities", {}).get("add"), where
            resources = container.get("resources", {})
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(section, {})), f"{where}: {section}"
            # A read-only root filesystem needs a writable /tmp for Python and its libraries.
            assert any(
                m["mountPath"] == "/tmp" and m["name"] in mounts_tmp for m in container.get("volumeMounts", [])
            ), where


@pytest.mark.parametrize("values", CI_VALUES, ids=ci_id)
def test_rbac_is_least_privilege(values: Path) -> None:
    docs = render(CHART, (values,))
    roles = by_kind(docs, "Role") + by_kind(docs, "ClusterRole")
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(field, []), f"{role['kind']}/{role['metadata']['name']}: {rule}"
            assert "secrets" not in rule["resources"], rule
            assert not rule.get("nonResourceURLs"), rule
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule


def granted(roles: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for role in roles:
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


NAMESPACED_GRANTS = {
    ("kubeforge.io", "modelpipelines"): {"get", "list", "watch", "patch", "update"},
    ("kubeforge.io", "modeldeployments"): {"get", "list", "watch", "patch", "update"},
    ("kubeforge.io", "modelpipelines/status"): {"patch", "update"},
    ("kubeforge.io", "modeldeployments/status"): {"patch", "update"},
    ("kubeforge.io", "modelpipelines/finalizers"): {"patch", "update"},
    ("kubeforge.io", "modeldeployments/finalizers"): {"patch", "update"},
    ("ray.io", "rayjobs"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("ray.io", "rayservices"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("ray.io", "rayjobs/status"): {"get"},
    ("ray.io", "rayservices/status"): {"get"},
    ("", "events"): {"create", "patch"},
    ("", "configmaps"): {"get", "create", "patch", "delete"},
}
CRD_GRANT = {("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"}}


def test_cluster_wide_rbac_is_exactly_the_operator_contract() -> None:
    docs = render(CHART, (CHART / "ci" / "cluster-wide-full-values.yaml",))
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    assert granted(by_kind(docs, "ClusterRole")) == {
        **NAMESPACED_GRANTS,
        **CRD_GRANT,
        ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch"},
        ("", "namespaces"): {"get", "list", "watch"},
    }
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    (account,) = by_kind(docs, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "kubeforge-system"}
    ]
    (peering,) = by_kind(docs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "kubeforge-prod"


def test_namespaced_rbac_is_a_role_per_watched_namespace() -> None:
    docs = render(CHART, (CHART / "ci" / "namespaced-two-values.yaml",))
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert granted([role]) == {**NAMESPACED_GRANTS, ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch"}}
    assert sorted(b["metadata"]["namespace"] for b in by_kind(docs, "RoleBinding")) == ["team-a", "team-b"]
    # CRDs are cluster-scoped: kopf's discovery is the only cluster-level grant in namespaced mode.
    assert granted(by_kind(docs, "ClusterRole")) == CRD_GRANT
    assert sorted(p["metadata"]["namespace"] for p in by_kind(docs, "KopfPeering")) == ["team-a", "team-b"]
    assert not by_kind(docs, "ClusterKopfPeering")


# --- the operator's contract: image, command, environment ----------------------------------------


def operator_container(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    (deployment,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "kf-kubeforge"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_operator_defaults_follow_the_contract() -> None:
    container = operator_container(render(CHART))
    assert container["image"] == "ghcr.io/kubeforge/kubeforge-operator:0.1.0"
    assert container["command"] == ["python", "-m", "kubeforge_operator"]
    assert env_of(container) == {
        "KUBEFORGE_OPERATOR_NAMESPACES": "kubeforge-system",
        "KUBEFORGE_OPERATOR_PEERING": "kubeforge",
        "KUBEFORGE_OPERATOR_STAGE_IMAGE": "ghcr.io/kubeforge/kubeforge-train:0.1.0",
        "KUBEFORGE_OPERATOR_QUANTIZE_IMAGE": "ghcr.io/kubeforge/kubeforge-quantize:0.1.0",
        "KUBEFORGE_OPERATOR_METRICS_PORT": "9090",
        "KUBEFORGE_OPERATOR_HEALTH_PORT": "8080",
        "KUBEFORGE_OPERATOR_LOG_FORMAT": "plain",
    }
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 9090, "health": 8080}


def test_operator_environment_per_mode() -> None:
    full = env_of(operator_container(render(CHART, (CHART / "ci" / "cluster-wide-full-values.yaml",))))
    assert full["KUBEFORGE_OPERATOR_NAMESPACES"] == ""  # empty: cluster-wide
    assert full["KUBEFORGE_OPERATOR_PEERING"] == "kubeforge-prod"
    assert full["KUBEFORGE_OPERATOR_LOG_FORMAT"] == "json"
    assert full["KUBEFORGE_OPERATOR_STAGE_ENV_SECRET"] == "object-store"
    assert full["KUBEFORGE_OPERATOR_MLFLOW_TRACKING_URI"] == "http://kf-kubeforge-mlflow.kubeforge-system.svc:5000"
    assert full["TZ"] == "UTC"
    two = env_of(operator_container(render(CHART, (CHART / "ci" / "namespaced-two-values.yaml",))))
    assert two["KUBEFORGE_OPERATOR_NAMESPACES"] == "team-a,team-b"
    explicit = env_of(
        operator_container(render(CHART, sets=("operator.mlflowTrackingUri=https://mlflow.example.com",)))
    )
    assert explicit["KUBEFORGE_OPERATOR_MLFLOW_TRACKING_URI"] == "https://mlflow.example.com"


def test_metrics_service_and_test_hook_reach_the_operator() -> None:
    docs = render(CHART)
    (service,) = by_kind(docs, "Service")
    deployment = by_kind(docs, "Deployment")[0]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"metrics": "metrics", "health": "health"}
    (test_pod,) = by_kind(docs, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = test_pod["spec"]["containers"][0]["command"][-1]
    assert "http://kf-kubeforge.kubeforge-system.svc:8080/healthz" in script
    assert "http://kf-kubeforge.kubeforge-system.svc:9090/metrics" in script


# --- MLflow --------------------------------------------------------------------------------------


def test_mlflow_takes_database_credentials_only_from_the_secret() -> None:
    docs = render(CHART, (CHART / "ci" / "cluster-wide-full-values.yaml",))
    (mlflow,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "kf-kubeforge-mlflow"]
    spec = mlflow["spec"]["template"]["spec"]
    for container in spec["containers"] + spec["initContainers"]:
        env = env_of(container)
        assert env["MLFLOW_DB_USER"] == {"secretKeyRef": {"name": "mlflow-db", "key": "username"}}
        assert env["MLFLOW_DB_PASSWORD"] == {"secretKeyRef": {"name": "mlflow-db", "key": "password"}}
        assert env["MLFLOW_BACKEND_STORE_URI"] == (
            "postgresql+psycopg://$(MLFLOW_DB_USER):$(MLFLOW_DB_PASSWORD)"
            "@postgres.databases.svc:5432/mlflow?sslmode=require"
        )
    server = spec["containers"][0]
    assert env_of(server)["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://kubeforge-mlflow/artifacts"
    assert server["envFrom"] == [{"secretRef": {"name": "mlflow-s3"}}]
    allowed = env_of(server)["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert {"kf-kubeforge-mlflow.kubeforge-system.svc*", "mlflow.example.com", "localhost:*"} <= set(allowed)
    assert not by_kind(docs, "Secret")


def test_mlflow_artifacts_on_a_claim() -> None:
    docs = render(CHART, (CHART / "ci" / "namespaced-two-values.yaml",))
    (mlflow,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "kf-kubeforge-mlflow"]
    spec = mlflow["spec"]["template"]["spec"]
    assert {"name": "artifacts", "persistentVolumeClaim": {"claimName": "mlflow-artifacts"}} in spec["volumes"]
    assert {"name": "artifacts", "mountPath": "/mlflow/artifacts"} in spec["containers"][0]["volumeMounts"]
    assert env_of(spec["containers"][0])["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")


# --- NetworkPolicies -----------------------------------------------------------------------------
# A connection is checked as a network plugin decides it: the source's egress and the destination's
# ingress must both allow it, and a pod no policy selects for a direction is not isolated in it.
# An end is a pod ({"namespace", "labels"}) or an address outside the pods ({"ip"}).

NAMESPACE = "kubeforge-system"
KUBE_DNS = {"namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}}
PROMETHEUS = {"namespace": "monitoring", "labels": {"app.kubernetes.io/name": "prometheus", "prometheus": "kps"}}
STRANGER = {"namespace": NAMESPACE, "labels": {"app": "curl"}}
API_SERVER = {"ip": "10.0.0.1"}
ELSEWHERE = {"ip": "203.0.113.7"}


def stage_pod(namespace: str) -> dict[str, Any]:
    return {"namespace": namespace, "labels": {**MANAGED_BY, "kubeforge.io/pipeline": "quickstart"}}


def workload_end(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    (workload,) = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    labels = workload["metadata"]["labels"] if kind == "Pod" else workload["spec"]["template"]["metadata"]["labels"]
    return {"namespace": workload["metadata"]["namespace"], "labels": labels}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a LabelSelector matches `labels`; the empty selector matches everything."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if (operator == "In" and labels.get(key) not in values) or (operator == "NotIn" and labels.get(key) in values):
            return False
        if (operator == "Exists" and key not in labels) or (operator == "DoesNotExist" and key in labels):
            return False
    return True


def peer_matches(peer: dict[str, Any], policy_namespace: str, end: dict[str, Any]) -> bool:
    if "ipBlock" in peer:
        # Whether an ipBlock covers pod addresses is the plugin's business; no test relies on it.
        if "ip" not in end:
            return False
        address = ipaddress.ip_address(end["ip"])
        block = peer["ipBlock"]
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(cidr) for cidr in block.get("except", [])
        )
    if "ip" in end:
        return False
    if "namespaceSelector" in peer:
        namespace_labels = {"kubernetes.io/metadata.name": end["namespace"]}
        if not selects(peer["namespaceSelector"], namespace_labels):
            return False
    elif end["namespace"] != policy_namespace:
        return False
    return selects(peer.get("podSelector", {}), end["labels"])


def direction_allows(
    policies: list[dict[str, Any]],
    direction: str,
    this: dict[str, Any],
    other: dict[str, Any],
    port: int,
    protocol: str,
) -> bool:
    """Whether the policies selecting `this` pod let a connection with `other` through in `direction`."""
    rules_key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == this["namespace"]
        and direction in p["spec"]["policyTypes"]
        and selects(p["spec"]["podSelector"], this["labels"])
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get(rules_key, []):
            ports = rule.get("ports") or [{}]
            if not any(p.get("port", port) == port and p.get("protocol", "TCP") == protocol for p in ports):
                continue
            peers = rule.get(peers_key) or [None]
            if any(peer is None or peer_matches(peer, policy["metadata"]["namespace"], other) for peer in peers):
                return True
    return False


def connects(
    docs: tuple[dict[str, Any], ...],
    source: dict[str, Any],
    destination: dict[str, Any],
    port: int,
    protocol: str = "TCP",
) -> bool:
    policies = by_kind(docs, "NetworkPolicy")
    out = "ip" in source or direction_allows(policies, "Egress", source, destination, port, protocol)
    return out and ("ip" in destination or direction_allows(policies, "Ingress", destination, source, port, protocol))


def network_policy_enabled(values: Path) -> bool:
    return (yaml.safe_load(values.read_text()) or {}).get("networkPolicy", {}).get("enabled", True)


@pytest.mark.parametrize("values", CI_VALUES, ids=ci_id)
def test_every_pod_is_isolated_by_a_network_policy(values: Path) -> None:
    # The policy scanner's rule: each pod a workload creates is selected by a NetworkPolicy that
    # restricts both directions.
    docs = render(CHART, (values,))
    policies = by_kind(docs, "NetworkPolicy")
    if not network_policy_enabled(values):
        assert not policies
        return
    workloads = [doc for doc in docs if doc["kind"] in WORKLOAD_KINDS]
    assert workloads
    for workload in workloads:
        pod = workload_end(docs, workload["kind"], workload["metadata"]["name"])
        assert any(
            p["metadata"]["namespace"] == pod["namespace"]
            and {"Ingress", "Egress"} <= set(p["spec"]["policyTypes"])
            and selects(p["spec"]["podSelector"], pod["labels"])
            for p in policies
        ), f"{workload['kind']}/{workload['metadata']['name']} has no NetworkPolicy for Ingress and Egress"


@pytest.mark.parametrize("values", CI_VALUES, ids=ci_id)
def test_no_network_policy_when_disabled(values: Path) -> None:
    docs = render(CHART, (values,), ("networkPolicy.enabled=false",))
    assert not by_kind(docs, "NetworkPolicy")
    operator = workload_end(docs, "Deployment", "kf-kubeforge")
    assert connects(docs, STRANGER, operator, 8080) and connects(docs, operator, ELSEWHERE, 22)


def test_operator_network_policy_allows_only_what_it_needs() -> None:
    docs = render(CHART)
    operator = workload_end(docs, "Deployment", "kf-kubeforge")
    test_pod = workload_end(docs, "Pod", "kf-kubeforge-test-endpoints")
    # Out: the API server (kopf), DNS, Prometheus' API (rollout analyses); nothing else.
    assert connects(docs, operator, API_SERVER, 443) and connects(docs, operator, API_SERVER, 6443)
    assert connects(docs, operator, KUBE_DNS, 53, "UDP") and connects(docs, operator, KUBE_DNS, 53, "TCP")
    assert not connects(docs, operator, {**KUBE_DNS, "labels": {"app": "other"}}, 53, "UDP")
    assert connects(docs, operator, PROMETHEUS, 9090)
    assert not connects(docs, operator, API_SERVER, 8443) and not connects(docs, operator, ELSEWHERE, 80)
    assert not connects(docs, operator, STRANGER, 9090)
    # In: Prometheus' scrapes on the metrics port only; the health port only from `helm test`.
    assert connects(docs, PROMETHEUS, operator, 9090) and not connects(docs, PROMETHEUS, operator, 8080)
    assert not connects(docs, STRANGER, operator, 9090) and not connects(docs, STRANGER, operator, 8080)
    assert not connects(docs, {**PROMETHEUS, "labels": {"app": "grafana"}}, operator, 9090)
    assert connects(docs, test_pod, operator, 8080) and connects(docs, test_pod, operator, 9090)
    assert not connects(docs, test_pod, ELSEWHERE, 80) and not connects(docs, STRANGER, test_pod, 80)


def test_operator_network_policy_follows_the_values() -> None:
    docs = render(CHART, (CHART / "ci" / "cluster-wide-full-values.yaml",))
    operator = workload_end(docs, "Deployment", "kf-kubeforge")
    mlflow = workload_end(docs, "Deployment", "kf-kubeforge-mlflow")
    # The API server narrowed to its CIDR and port; Prometheus to the monitoring namespace.
    assert connects(docs, operator, API_SERVER, 6443)
    assert not connects(docs, operator, API_SERVER, 443) and not connects(docs, operator, ELSEWHERE, 6443)
    assert connects(docs, PROMETHEUS, operator, 9090)
    assert not connects(docs, {**PROMETHEUS, "namespace": "team-a"}, operator, 9090)
    # The chart's MLflow server on its port, as the tracking URI says.
    assert connects(docs, operator, mlflow, 5000) and not connects(docs, operator, mlflow, 5432)
    # An external tracking URI: its port to any address (a policy cannot name a host).
    for uri, port in (("https://mlflow.example.com", 443), ("http://mlflow.mlflow.svc:5001", 5001)):
        docs = render(CHART, sets=(f"operator.mlflowTrackingUri={uri}", "networkPolicy.apiServer.cidrs[0]=10.0.0.0/28"))
        operator = workload_end(docs, "Deployment", "kf-kubeforge")
        assert connects(docs, operator, ELSEWHERE, port), uri
        assert not connects(docs, operator, ELSEWHERE, 8080), uri


def test_mlflow_network_policy_admits_only_its_clients() -> None:
    docs = render(CHART, (CHART / "ci" / "namespaced-two-values.yaml",))
    mlflow = workload_end(docs, "Deployment", "kf-kubeforge-mlflow")
    operator = workload_end(docs, "Deployment", "kf-kubeforge")
    # In: the operator and the pods it creates in the namespaces it watches, on MLflow's port only.
    assert connects(docs, operator, mlflow, 5000)
    assert connects(docs, stage_pod("team-a"), mlflow, 5000) and connects(docs, stage_pod("team-b"), mlflow, 5000)
    assert not connects(docs, stage_pod("team-c"), mlflow, 5000)
    assert not connects(docs, {**STRANGER, "namespace": "team-a"}, mlflow, 5000)
    assert not connects(docs, STRANGER, mlflow, 5000) and not connects(docs, PROMETHEUS, mlflow, 5000)
    assert not connects(docs, stage_pod("team-a"), mlflow, 5432)
    # Out: DNS and PostgreSQL; the artifacts are on a claim, so no object store.
    assert connects(docs, mlflow, KUBE_DNS, 53, "UDP") and connects(docs, mlflow, ELSEWHERE, 5432)
    assert not connects(docs, mlflow, ELSEWHERE, 443) and not connects(docs, mlflow, API_SERVER, 6443)
    # Cluster-wide: stage pods in any namespace, the extra clients, and the object store.
    docs = render(CHART, (CHART / "ci" / "cluster-wide-full-values.yaml",))
    mlflow = workload_end(docs, "Deployment", "kf-kubeforge-mlflow")
    assert connects(docs, stage_pod("team-c"), mlflow, 5000)
    assert not connects(docs, {**STRANGER, "namespace": "team-c"}, mlflow, 5000)
    assert connects(docs, {"namespace": "ingress-nginx", "labels": {"app": "nginx"}}, mlflow, 5000)
    assert connects(docs, mlflow, {"namespace": "databases", "labels": {"app": "postgres"}}, 5432)
    assert not connects(docs, mlflow, ELSEWHERE, 5432)
    assert connects(docs, mlflow, ELSEWHERE, 443) and connects(docs, mlflow, ELSEWHERE, 9000)
    assert not connects(docs, mlflow, {"ip": "169.254.169.254"}, 443)


def test_an_empty_prometheus_peer_list_is_refused(tmp_path: Path) -> None:
    # An ingress rule without peers admits every source: the schema must not let one through.
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"networkPolicy": {"prometheus": {"peers": []}}}))
    stderr = render_fails(CHART, values=(values,))
    assert "values don't meet the specifications of the schema" in stderr and "peers" in stderr, stderr


# --- values.schema.json and the template's own checks --------------------------------------------


@pytest.mark.parametrize(
    ("assignment", "field"),
    [
        ("replicaCount=two", "replicaCount"),
        ("replicaCount=0", "replicaCount"),
        ("replicas=2", "replicas"),
        ("operator.logFormat=xml", "logFormat"),
        ("operator.stageEnvSecret=Object_Store", "stageEnvSecret"),
        ("operator.watchNamespace[0]=a", "watchNamespace"),
        ("operator.resources.limits=null", "limits"),
        ("podSecurity.runAsUser=0", "runAsUser"),
        ("mlflow.postgresql.sslMode=maybe", "sslMode"),
        ("monitoring.serviceMonitor.labels.release=null", "release"),
        ("networkPolicy.enable=false", "enable"),
        ("networkPolicy.apiServer.cidrs[0]=kubernetes.default", "cidrs"),
        ("networkPolicy.dns.ports[0]=0", "ports"),
    ],
)
def test_values_schema_rejects_bad_values(assignment: str, field: str) -> None:
    stderr = render_fails(CHART, assignment)
    assert "values don't meet the specifications of the schema" in stderr, stderr
    assert field in stderr, stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("monitoring.serviceMonitor.enabled=true", "monitoring.podMonitor.enabled=true"), "not both"),
        (("operator.clusterWide=true", "operator.watchNamespaces[0]=a"), "operator.watchNamespaces must be empty"),
        (("mlflow.enabled=true", "mlflow.postgresql.host=db"), "mlflow.postgresql.existingSecret"),
        (("mlflow.enabled=true", "mlflow.postgresql.existingSecret=s"), "mlflow.postgresql.host"),
        (
            (
                "mlflow.enabled=true",
                "mlflow.postgresql.host=db",
                "mlflow.postgresql.existingSecret=s",
                "mlflow.artifacts.destination=/data",
            ),
            "mlflow.artifacts.existingClaim is required",
        ),
        (
            (
                "mlflow.enabled=true",
                "mlflow.postgresql.host=db",
                "mlflow.postgresql.existingSecret=s",
                "mlflow.artifacts.existingClaim=pvc",
            ),
            "only used with a local",
        ),
        (("serviceAccount.create=false",), "serviceAccount.name"),
    ],
)
def test_contradictory_values_fail_with_a_clear_message(sets: tuple[str, ...], message: str) -> None:
    assert message in render_fails(CHART, *sets)


# --- dashboards and alert rules: chart copies of infra/ ------------------------------------------


def copy_pairs() -> list[tuple[Path, Path]]:
    pairs = [(src, CHART / "files" / "dashboards" / src.name) for src in sorted(DASHBOARDS_SRC.glob("*.json"))]
    return [*pairs, (RULES_SRC, RULES_COPY)]


@pytest.mark.parametrize("source, copy", copy_pairs(), ids=lambda p: p.name)
def test_chart_copy_equals_its_source(source: Path, copy: Path) -> None:
    assert source.exists(), f"{source.relative_to(REPO)} is missing"
    assert copy.exists(), f"{copy.relative_to(REPO)} is missing: run charts/sync-files.sh"
    assert filecmp.cmp(source, copy, shallow=False), f"{copy.relative_to(REPO)} differs: run charts/sync-files.sh"


def test_chart_has_no_copy_without_a_source() -> None:
    stale = [p.name for p in (CHART / "files" / "dashboards").glob("*.json") if not (DASHBOARDS_SRC / p.name).exists()]
    assert not stale, f"dashboards no longer in infra/grafana/dashboards: {stale}; run charts/sync-files.sh"


def test_dashboards_become_labelled_configmaps() -> None:
    copies = sorted((CHART / "files" / "dashboards").glob("*.json"))
    assert copies, "no dashboards in charts/kubeforge/files/dashboards: run charts/sync-files.sh"
    default = by_kind(render(CHART), "ConfigMap")
    assert len(default) == len(copies)
    for configmap in default:
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((key, text),) = configmap["data"].items()
        assert text == (CHART / "files" / "dashboards" / key).read_text().rstrip("\n")
    custom = by_kind(render(CHART, (CHART / "ci" / "cluster-wide-full-values.yaml",)), "ConfigMap")
    assert all(c["metadata"]["namespace"] == "monitoring" for c in custom)
    assert all(c["metadata"]["annotations"] == {"grafana_folder": "KubeForge"} for c in custom)
    assert not by_kind(render(CHART, sets=("grafana.dashboards.enabled=false",)), "ConfigMap")


def test_prometheus_rule_carries_the_alert_rules_verbatim() -> None:
    assert RULES_COPY.exists(), f"{RULES_COPY.relative_to(REPO)} is missing: run charts/sync-files.sh"
    (rule,) = by_kind(render(CHART, (CHART / "ci" / "cluster-wide-full-values.yaml",)), "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES_COPY.read_text())["groups"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


# --- the pipeline chart --------------------------------------------------------------------------


def test_pipeline_chart_renders_the_quickstart_manifest() -> None:
    (pipeline,) = render(PIPELINE_CHART)
    assert (pipeline["apiVersion"], pipeline["kind"]) == ("kubeforge.io/v1alpha1", "ModelPipeline")
    parsed = parse_manifest(pipeline, source="charts/kubeforge-pipeline")
    quickstart = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    assert pipeline["spec"] == quickstart["spec"]
    assert parsed.metadata.name == "quickstart" and parsed.metadata.namespace == "kubeforge-system"
    validate_against_crd(pipeline, CRDS["ModelPipeline"])


def test_pipeline_chart_takes_name_labels_and_sections_from_values(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "name": "small",
                "labels": {"team": "nlp"},
                "annotations": {"kubeforge.io/owner": "ana"},
                "spec": {"quantize": None, "promotion": None, "pretrain": {"train": {"max_steps": 1000000}}},
            }
        )
    )
    (pipeline,) = render(PIPELINE_CHART, (values,))
    parsed = parse_manifest(pipeline)
    assert parsed.metadata.name == "small"
    assert parsed.metadata.labels["team"] == "nlp"
    assert parsed.metadata.annotations == {"kubeforge.io/owner": "ana"}
    assert parsed.spec.quantize is None and parsed.spec.promotion is None
    # Helm keeps big integers integers (no 1e+06), which the strict spec needs.
    assert parsed.spec.pretrain is not None and parsed.spec.pretrain.train.max_steps == 1000000
    assert parsed.stage_names() == ["data", "pretrain", "finetune", "evaluate"]


def test_pipeline_values_schema_knows_every_spec_section() -> None:
    import json

    schema = json.loads((PIPELINE_CHART / "values.schema.json").read_text())
    sections = pipeline_model().model_fields["spec"].annotation.model_fields  # type: ignore[union-attr]
    assert set(schema["properties"]["spec"]["properties"]) == set(sections)


@pytest.mark.parametrize(
    ("assignment", "field"),
    [("name=Bad_Name", "name"), ("spec.pretrian.model.hidden_size=64", "pretrian"), ("nmae=x", "nmae")],
)
def test_pipeline_values_schema_rejects_bad_values(assignment: str, field: str) -> None:
    stderr = render_fails(PIPELINE_CHART, assignment)
    assert "values don't meet the specifications of the schema" in stderr and field in stderr, stderr
