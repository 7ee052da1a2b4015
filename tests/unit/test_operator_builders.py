"""The operator's pure builders: RayJobs valid for KubeRay v1.7.0, pods valid for Kubernetes, the
manifest ConfigMap, names, and the status computed from RayJob statuses."""

from __future__ import annotations

import copy
import functools
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kubeforge import stages
from kubeforge.errors import SpecError
from kubeforge.rollout.controller import RolloutRecord, Subject, begin
from kubeforge.spec.load import parse_deployment, parse_manifest
from kubeforge_operator.conditions import invalid_status
from kubeforge_operator.config import ConfigError, OperatorConfig
from kubeforge_operator.errors import FieldError
from kubeforge_operator.owner import Owner
from kubeforge_operator.pipeline import manifest_document, validate
from kubeforge_operator.pods import LABEL_METRICS
from kubeforge_operator.rayjob import (
    LABEL_PIPELINE,
    LABEL_STAGE,
    LABEL_STAGE_KEY,
    MANIFEST_DIR,
    MAX_RAYJOB_NAME,
    WORKDIR,
    NextStep,
    StageRun,
    manifest_configmap,
    next_step,
    pipeline_status,
    rayjob_name,
    require_cluster,
    runs_to_look_up,
    stage_rayjob,
    stage_views,
)
from kubeforge_operator.rayservice import (
    LABEL_DEPLOYMENT,
    MAX_RAYSERVICE_NAME,
    SERVE_TOKEN_ENV,
    deployment_status,
    pod_token_secret,
    rayservice,
    rayservice_name,
    serve_weight,
)
from tests.k8s_schemas import (
    SchemaValidationError,
    crd_schema_for,
    openapi_to_jsonschema,
    validate_against_crd,
    validate_builtin,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO.parent / "shared" / "fixtures" / "kuberay-v1.7.0"
RAYJOB_CRD = KUBERAY / "ray.io_rayjobs.yaml"
CONFIG = OperatorConfig(stage_image="ghcr.io/kubeforge/kubeforge-train:0.1.0",
                        quantize_image="ghcr.io/kubeforge/kubeforge-quantize:0.1.0",
                        mlflow_tracking_uri="http://mlflow.kubeforge-system:5000")
OWNER = Owner(name="quickstart", namespace="team-a", uid="0b7c5b53-5a8f-4b8e-9f1e-7d1d6f0b8a11")
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
CLUSTER = {
    "workdir_claim": "kubeforge-work",
    "node_selector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "service_account": "kubeforge-stages",
    "active_deadline_s": 7200,
    "retries": 1,
    "retry_delay_s": 30,
}


def quickstart_document(**cluster: Any) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    doc["metadata"]["namespace"] = OWNER.namespace
    doc["spec"]["cluster"] = {**CLUSTER, **cluster}
    return doc


def quickstart(**cluster: Any):
    return parse_manifest(quickstart_document(**cluster))


def name(stage: str, attempt: int) -> str:
    return rayjob_name("quickstart", stage, quickstart().stage_keys()[stage], attempt)


def rayjob(stage: str, attempt: int, job_status: str | None = None, **status: Any) -> dict[str, Any]:
    job = stage_rayjob(quickstart(), stage, OWNER, CONFIG, attempt=attempt)
    if job_status is not None:
        job["status"] = {"jobStatus": job_status, **status}
    return job


# --- RayJobs and pods --------------------------------------------------------------------------------

STAGES = quickstart().stage_names()


@functools.cache
def rayjob_validator() -> jsonschema.Draft202012Validator:
    """validate_against_crd's check, with the 1 MB CRD read and converted once for every stage."""
    probe = {"apiVersion": "ray.io/v1", "kind": "RayJob"}
    return jsonschema.Draft202012Validator(openapi_to_jsonschema(crd_schema_for(probe, RAYJOB_CRD)))


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_rayjob_validates_against_the_kuberay_crd(stage: str) -> None:
    if not RAYJOB_CRD.is_file():
        pytest.skip(f"KubeRay CRD schemas not found in {KUBERAY} (shared/fixtures/kuberay-v1.7.0)")
    job = stage_rayjob(quickstart(), stage, OWNER, CONFIG)
    error = jsonschema.exceptions.best_match(rayjob_validator().iter_errors(job))
    assert error is None, f"{list(error.absolute_path)}: {error.message}"
    assert len(job["metadata"]["name"]) <= 63


def test_the_crd_check_catches_a_misplaced_field() -> None:
    if not RAYJOB_CRD.is_file():
        pytest.skip(f"KubeRay CRD schemas not found in {KUBERAY} (shared/fixtures/kuberay-v1.7.0)")
    job = stage_rayjob(quickstart(), "data", OWNER, CONFIG)
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["replicas"] = 1  # only worker groups have replicas
    error = jsonschema.exceptions.best_match(rayjob_validator().iter_errors(job))
    assert error is not None and "headGroupSpec" in list(error.absolute_path)


@pytest.mark.parametrize("stage", ["data", "pretrain"])
def test_pod_templates_are_valid_hardened_pods(stage: str) -> None:
    job = stage_rayjob(quickstart(), stage, OWNER, CONFIG)
    cluster_spec = job["spec"]["rayClusterSpec"]
    templates = {
        "head": cluster_spec["headGroupSpec"]["template"],
        "worker": cluster_spec["workerGroupSpecs"][0]["template"],
        "submitter": job["spec"]["submitterPodTemplate"],
    }
    for role, template in templates.items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"x-{role}", **template["metadata"]},
               "spec": template["spec"]}
        validate_builtin(pod)
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert spec["serviceAccountName"] == "kubeforge-stages"
        for container in spec["containers"]:
            assert container["image"] == CONFIG.stage_image
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["resources"]["requests"] and container["resources"]["limits"]
            assert {"hostPath"} & {k for v in spec["volumes"] for k in v} == set()
    head_mounts = {m["mountPath"]: m["name"] for m in templates["head"]["spec"]["containers"][0]["volumeMounts"]}
    worker_mounts = {m["mountPath"]: m["name"] for m in templates["worker"]["spec"]["containers"][0]["volumeMounts"]}
    assert head_mounts[MANIFEST_DIR] == "manifest" and head_mounts[WORKDIR] == "work"
    # A driver that takes the GPU runs on a worker, which therefore reads the manifest too.
    assert worker_mounts[WORKDIR] == "work" and worker_mounts[MANIFEST_DIR] == "manifest"
    claims = [v["persistentVolumeClaim"]["claimName"] for t in (templates["head"], templates["worker"])
              for v in t["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["kubeforge-work", "kubeforge-work"]


def test_the_rayjob_runs_the_stage_entrypoint_and_belongs_to_the_pipeline() -> None:
    job = stage_rayjob(quickstart(), "finetune", OWNER, CONFIG, attempt=2)
    key = quickstart().stage_keys()["finetune"]
    assert job["metadata"]["name"] == f"quickstart-finetune-{key[:6]}-2"
    assert job["metadata"]["labels"][LABEL_STAGE_KEY] == key
    assert job["metadata"]["labels"][LABEL_PIPELINE] == "quickstart"
    assert job["metadata"]["labels"][LABEL_STAGE] == "finetune"
    assert job["metadata"]["ownerReferences"] == [{
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelPipeline", "name": "quickstart", "uid": OWNER.uid,
        "controller": True, "blockOwnerDeletion": True,
    }]
    assert job["spec"]["entrypoint"] == (
        "python jobs/stage.py finetune --manifest /etc/kubeforge/manifest.yaml --workdir /kubeforge/work "
        "--base-dir /kubeforge/work --tracking-uri http://mlflow.kubeforge-system:5000 --metrics-port 9108 "
        f"--report-tag kubeforge.rayjob.quickstart-finetune-{key[:6]}-2={OWNER.uid}"
    )
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] == 0
    assert job["spec"]["activeDeadlineSeconds"] == 7200
    assert job["spec"]["backoffLimit"] == 0
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 2  # finetune.resources
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "1", "memory": "8Gi"}
    no_uri = OperatorConfig(stage_image="a", quantize_image="b")
    assert "--tracking-uri" not in stage_rayjob(quickstart(), "data", OWNER, no_uri)["spec"]["entrypoint"]


def test_the_stage_env_secret_reaches_the_head_and_workers_of_every_stage() -> None:
    config = replace(CONFIG, stage_env_secret="object-store")
    expected = [{"secretRef": {"name": "object-store", "optional": True}}]
    for stage in STAGES:
        job = stage_rayjob(quickstart(), stage, OWNER, config)
        if RAYJOB_CRD.is_file():
            error = jsonschema.exceptions.best_match(rayjob_validator().iter_errors(job))
            assert error is None, f"{list(error.absolute_path)}: {error.message}"
        cluster = job["spec"]["rayClusterSpec"]
        for template in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
            validate_builtin({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **template["metadata"]},
                              "spec": template["spec"]})
            assert template["spec"]["containers"][0]["envFrom"] == expected, stage
        # The submitter only runs `ray job submit`.
        assert "envFrom" not in job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    plain = stage_rayjob(quickstart(), "data", OWNER, CONFIG)["spec"]["rayClusterSpec"]
    assert "envFrom" not in plain["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "envFrom" not in plain["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    env = {"KUBEFORGE_OPERATOR_STAGE_IMAGE": "s:1", "KUBEFORGE_OPERATOR_QUANTIZE_IMAGE": "q:1"}
    assert OperatorConfig.from_env(env).stage_env_secret is None
    assert OperatorConfig.from_env({**env, "KUBEFORGE_OPERATOR_STAGE_ENV_SECRET": "object-store"}).stage_env_secret == (
        "object-store")
    with pytest.raises(ConfigError, match="KUBEFORGE_OPERATOR_STAGE_ENV_SECRET: 'Object_Store' is not a Secret name"):
        OperatorConfig.from_env({**env, "KUBEFORGE_OPERATOR_STAGE_ENV_SECRET": "Object_Store"})


def test_gpu_stages_request_gpus_and_quantize_uses_its_image() -> None:
    doc = quickstart_document()
    doc["spec"]["pretrain"]["resources"] = {"workers": 4, "cpus_per_worker": 2.5, "use_gpu": True}
    doc["spec"]["quantize"]["use_gpu"] = True
    pipeline = parse_manifest(doc)
    pretrain = stage_rayjob(pipeline, "pretrain", OWNER, CONFIG)
    group = pretrain["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == 4
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "cpu": "2500m", "memory": "8Gi", "nvidia.com/gpu": "1"}
    quantize = stage_rayjob(pipeline, "quantize", OWNER, CONFIG)
    q_container = quantize["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert q_container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert q_container["image"] == CONFIG.quantize_image
    data = stage_rayjob(pipeline, "data", OWNER, CONFIG)
    d_container = data["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in d_container["resources"]["limits"]
    own_image = stage_rayjob(quickstart(image="registry.local/kf:dev"), "quantize", OWNER, CONFIG)
    assert own_image["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == (
        "registry.local/kf:dev")


def gpus(template: dict[str, Any]) -> int:
    return int(template["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))


def pod_running(job: dict[str, Any], code: str) -> dict[str, Any]:
    """The pod template of the pod where a stage's `code` ("driver" or "workers") runs, as KubeRay and Ray place
    it: Ray Train workers and Tune trials on the worker pods (the head offers no CPUs), and the driver on the head
    unless the entrypoint reserves GPUs, which Ray then finds only on a worker pod."""
    cluster = job["spec"]["rayClusterSpec"]
    workers = cluster["workerGroupSpecs"][0]["template"]
    if code == "workers":
        return workers
    wanted = job["spec"].get("entrypointNumGpus", 0)
    if not wanted:
        return cluster["headGroupSpec"]["template"]
    assert gpus(workers) >= wanted, "no pod has the GPUs the entrypoint reserves"
    return workers


def gpu_everywhere() -> Any:
    """The hyper-parameter search example and the quickstart's later stages, each asking for a GPU."""
    doc = yaml.safe_load((REPO / "examples" / "hpo.yaml").read_text())
    quick = quickstart_document()
    doc["metadata"]["namespace"] = OWNER.namespace
    doc["spec"].update(cluster=CLUSTER, finetune=quick["spec"]["finetune"], quantize=quick["spec"]["quantize"])
    doc["spec"]["tune"]["gpus_per_trial"] = 1
    for section in ("pretrain", "finetune"):
        doc["spec"][section]["resources"] = {"use_gpu": True}
    doc["spec"]["evaluate"]["use_gpu"] = doc["spec"]["quantize"]["use_gpu"] = True
    return parse_manifest(doc)


def test_every_stage_gpu_code_runs_on_a_pod_with_the_gpu() -> None:
    pipeline = gpu_everywhere()
    assert {s for s in pipeline.stage_names() if s not in ("data", "promote")} == {
        "tune", "pretrain", "finetune", "evaluate", "quantize"}
    for stage in pipeline.stage_names():
        job = stage_rayjob(pipeline, stage, OWNER, CONFIG)
        if RAYJOB_CRD.is_file():
            error = jsonschema.exceptions.best_match(rayjob_validator().iter_errors(job))
            assert error is None, f"{stage}: {list(error.absolute_path)}: {error.message}"
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
        assert gpus(head) == 0, stage  # the head only coordinates
        if stage in ("data", "promote"):
            assert gpus(pod_running(job, "workers")) == 0 and "entrypointNumGpus" not in job["spec"], stage
            continue
        assert gpus(pod_running(job, stages.get(stage).gpu_runs_in)) == 1, stage
        # Whichever pod runs the driver serves its metrics, and only that one is labelled for scraping.
        driver = pod_running(job, "driver")
        assert driver["metadata"]["labels"][LABEL_METRICS] == "stage", stage
        assert [p["name"] for p in driver["spec"]["containers"][0]["ports"]] == ["stage-metrics"], stage
        others = [t for t in (head, job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]) if t is not driver]
        assert [LABEL_METRICS not in t["metadata"]["labels"] and "ports" not in t["spec"]["containers"][0]
                for t in others] == [True], stage
        if stages.get(stage).gpu_runs_in == "workers":
            # A driver that reserved the GPU would starve the Ray workers that need it.
            assert "entrypointNumGpus" not in job["spec"], stage
    assert stages.get("evaluate").gpu_runs_in == stages.get("quantize").gpu_runs_in == "driver"
    # Without use_gpu, the driver stays on the head.
    assert "entrypointNumGpus" not in stage_rayjob(quickstart(), "evaluate", OWNER, CONFIG)["spec"]


def test_a_finished_stage_releases_its_pods_at_once_by_default() -> None:
    job = stage_rayjob(quickstart(), "pretrain", OWNER, CONFIG)
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] == 0
    kept = stage_rayjob(quickstart(ttl_s=600), "pretrain", OWNER, CONFIG)
    assert kept["spec"]["ttlSecondsAfterFinished"] == 600


def test_names_fit_kuberay_and_stay_distinct() -> None:
    long_a, long_b = "a" * 60 + "-one", "a" * 60 + "-two"
    names = {rayjob_name(p, "promote", "0123456789abcdef", 3) for p in (long_a, long_b)}
    assert len(names) == 2
    assert all(len(n) <= MAX_RAYJOB_NAME and n.endswith("-promote-012345-3") for n in names)
    # RayJob names start with a letter.
    assert rayjob_name("7b-run", "data", "0123456789abcdef", 1) == "kf-7b-run-data-012345-1"
    assert rayjob_name("quickstart", "data", "fedcba9876543210", 1) == "quickstart-data-fedcba-1"


def test_the_configmap_carries_the_exact_manifest() -> None:
    body = quickstart_document()
    body["metadata"].update(uid=OWNER.uid, resourceVersion="42", generation=3,
                            annotations={"team": "nlp", "kopf.kubeforge.io/last-handled-configuration": "{}"})
    body["status"] = {"phase": "Running"}
    document = manifest_document(body)
    assert document["metadata"] == {"name": "quickstart", "namespace": "team-a", "annotations": {"team": "nlp"}}
    configmap = manifest_configmap(document, OWNER)
    validate_builtin(configmap)
    assert configmap["metadata"]["name"] == "quickstart-manifest"
    assert configmap["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    carried = yaml.safe_load(configmap["data"]["manifest.yaml"])
    assert carried == document
    assert parse_manifest(carried) == validate(document)


# --- spec.cluster and the operator's configuration ----------------------------------------------------

def test_a_pipeline_without_a_cluster_section_is_invalid_for_the_operator() -> None:
    doc = quickstart_document()
    del doc["spec"]["cluster"]
    with pytest.raises(SpecError) as info:
        validate(doc)
    assert [p.where for p in info.value.problems] == ["spec.cluster"]


def test_a_refusal_reaches_the_invalid_status_as_field_and_message() -> None:
    """The builders' FieldError keeps the field apart from the message (which may hold ": " itself), and
    the Invalid status reads exactly as it did when the field was cut back out of the text."""
    from kubeforge_operator.deployment import validate as validate_deployment

    doc = quickstart_document()
    del doc["spec"]["cluster"]
    with pytest.raises(FieldError) as refused:
        require_cluster(parse_manifest(doc))
    assert (refused.value.field, refused.value.message) == (
        "spec.cluster", "required to run on Kubernetes (at least spec.cluster.workdir_claim)")
    auth = parse_deployment(deployment_document(auth={"token_env": "TOKEN"})).spec.auth
    with pytest.raises(FieldError) as refused:
        pod_token_secret(auth)
    assert (refused.value.field, refused.value.message) == (
        "spec.auth.token_env",
        "the RayService pods have no variable TOKEN; use spec.auth.token_secret: {name, key} of a Secret in the "
        "deployment's namespace")

    def invalid_message(check: Any, document: dict[str, Any]) -> str:
        with pytest.raises(SpecError) as invalid:
            check(document)
        status = invalid_status([str(p) for p in invalid.value.problems], previous={}, now=NOW, generation=1)
        (valid,) = status["conditions"]
        return str(valid["message"])

    assert invalid_message(validate, doc) == (
        "spec.cluster: required to run on Kubernetes (at least spec.cluster.workdir_claim)")
    assert invalid_message(validate_deployment, deployment_document(auth={"token_env": "TOKEN"})) == (
        "spec.auth.token_env: the RayService pods have no variable TOKEN; use spec.auth.token_secret: {name, key} of "
        "a Secret in the deployment's namespace")


def test_serving_needs_the_tracking_uri_variable() -> None:
    with pytest.raises(FieldError) as refused:
        OperatorConfig(stage_image="a", quantize_image="b").serving_tracking_uri()
    assert refused.value.field == "KUBEFORGE_OPERATOR_MLFLOW_TRACKING_URI"
    assert str(refused.value) == ("KUBEFORGE_OPERATOR_MLFLOW_TRACKING_URI: required to serve ModelDeployments "
                                  "(versions are resolved in, and replicas download them from, that MLflow)")
    assert CONFIG.serving_tracking_uri() == "http://mlflow.kubeforge-system:5000"


@pytest.mark.parametrize(("cluster", "where"), [
    ({"tolerations": [{"operator": "Exists", "value": "x"}]}, "spec.cluster.tolerations[0].value"),
    ({"tolerations": [{"operator": "Equal", "value": "x"}]}, "spec.cluster.tolerations[0].key"),
    ({"tolerations": [{"key": "a", "value": "b", "toleration_seconds": 5}]},
     "spec.cluster.tolerations[0].toleration_seconds"),
    ({"head_memory": "lots"}, "spec.cluster.head_memory"),
    ({"node_selector": {"bad key!": "x"}}, "spec.cluster.node_selector"),
    ({"workdir_claim": "Not_A_Claim"}, "spec.cluster.workdir_claim"),
    ({"retries": -1}, "spec.cluster.retries"),
])
def test_bad_cluster_settings_name_their_field(cluster: dict[str, Any], where: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_manifest(quickstart_document(**cluster))
    assert [p.where for p in info.value.problems] == [where]


def test_config_is_read_once_from_prefixed_variables() -> None:
    env = {"KUBEFORGE_OPERATOR_STAGE_IMAGE": "s:1", "KUBEFORGE_OPERATOR_QUANTIZE_IMAGE": "q:1",
           "KUBEFORGE_OPERATOR_NAMESPACES": "team-a, team-b", "KUBEFORGE_OPERATOR_PEERING": "kubeforge",
           "KUBEFORGE_OPERATOR_LOG_FORMAT": "json", "KUBEFORGE_OPERATOR_METRICS_PORT": "9191"}
    config = OperatorConfig.from_env(env)
    assert config.namespaces == ("team-a", "team-b") and not config.clusterwide
    assert (config.peering, config.log_format, config.metrics_port, config.health_port) == ("kubeforge", "json", 9191,
                                                                                            8080)
    assert OperatorConfig.from_env({**env, "KUBEFORGE_OPERATOR_NAMESPACES": ""}).clusterwide
    for name, value, message in [
        ("STAGE_IMAGE", "", "KUBEFORGE_OPERATOR_STAGE_IMAGE: required"),
        ("METRICS_PORT", "http", "KUBEFORGE_OPERATOR_METRICS_PORT: must be a port number"),
        ("HEALTH_PORT", "9191", "KUBEFORGE_OPERATOR_HEALTH_PORT: must differ"),
        ("LOG_FORMAT", "xml", "KUBEFORGE_OPERATOR_LOG_FORMAT: must be plain or json"),
        ("NAMESPACES", "Team_A", "KUBEFORGE_OPERATOR_NAMESPACES: 'Team_A'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            OperatorConfig.from_env({**env, f"KUBEFORGE_OPERATOR_{name}": value})


def test_replicas_draw_different_peering_priorities() -> None:
    """kopf freezes every operator sharing the highest priority: two replicas must not tie."""
    import kopf

    from kubeforge_operator.config import configure_kopf

    priorities = {configure_kopf(kopf.OperatorSettings()).peering.priority for _ in range(20)}
    assert len(priorities) == 20 and min(priorities) > 0


# --- status from RayJob statuses ----------------------------------------------------------------------

def status_of(jobs: list[dict[str, Any]], previous: dict[str, Any] | None = None, **cluster: Any) -> dict[str, Any]:
    return pipeline_status(quickstart(**cluster), jobs, previous=previous or {}, now=NOW, generation=2)


def conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status["conditions"]}


def test_a_running_stage() -> None:
    status = status_of([rayjob("data", 1, "RUNNING", startTime="2026-01-01T11:59:00Z")])
    assert status["phase"] == "Running" and status["currentStage"] == "data"
    assert status["stages"]["data"] == {"phase": "Running", "attempts": 1, "rayJob": name("data", 1),
                                        "startTime": "2026-01-01T11:59:00Z",
                                        "stageKey": quickstart().stage_keys()["data"]}
    assert status["stages"]["pretrain"] == {"phase": "Pending", "attempts": 0}
    assert status["observedGeneration"] == 2
    assert conditions(status)["DataSucceeded"] == "Unknown" and conditions(status)["Complete"] == "False"
    views = stage_views(quickstart(), [rayjob("data", 1, "RUNNING")], {}, NOW)
    assert next_step(views, NOW) == NextStep()


def test_a_succeeded_stage_starts_the_next_and_carries_run_ids() -> None:
    data = rayjob("data", 1, "SUCCEEDED", endTime="2026-01-01T11:58:00Z", jobDeploymentStatus="Complete")
    views = stage_views(quickstart(), [data], {}, NOW)
    assert runs_to_look_up(views, {}) == {"data": name("data", 1)}
    status = pipeline_status(quickstart(), [data], previous={}, now=NOW, generation=2,
                             found={"data": StageRun("abc123")})
    assert status["stages"]["data"]["phase"] == "Succeeded"
    assert status["stages"]["data"]["mlflowRunId"] == "abc123"
    assert status["stages"]["data"]["completionTime"] == "2026-01-01T11:58:00Z"
    assert conditions(status)["DataSucceeded"] == "True"
    assert next_step(views, NOW) == NextStep("pretrain", 1)
    # Once in the status, the run is kept and not looked up again.
    assert runs_to_look_up(views, status) == {}
    assert status_of([data], previous=status)["stages"]["data"]["mlflowRunId"] == "abc123"
    # A new attempt of the stage is a new RayJob: what the status holds is of the old one.
    again = rayjob("data", 2, "SUCCEEDED", endTime="2026-01-01T11:59:00Z")
    later = stage_views(quickstart(), [data, again], status, NOW)
    assert runs_to_look_up(later, status) == {"data": name("data", 2)}
    assert "mlflowRunId" not in status_of([data, again], previous=status)["stages"]["data"]


def test_a_failed_stage_with_attempts_left_waits_then_retries() -> None:
    failed = rayjob("data", 1, "FAILED", endTime="2026-01-01T11:59:50Z", message="OOMKilled")
    status = status_of([failed])
    assert status["phase"] == "Running"
    assert status["stages"]["data"]["phase"] == "Pending"
    assert "attempt 1 failed: OOMKilled; attempt 2 of 2 starts at 2026-01-01T12:00:20Z" in (
        status["stages"]["data"]["message"])
    views = stage_views(quickstart(), [failed], {}, NOW)
    assert next_step(views, NOW) == NextStep(wait_s=20.0)
    later = NOW + timedelta(seconds=21)
    assert next_step(stage_views(quickstart(), [failed], {}, later), later) == (
        NextStep("data", 2))


def test_a_failed_stage_without_an_end_time_waits_from_when_it_was_first_seen() -> None:
    failed = rayjob("data", 1, "FAILED")
    first = status_of([failed])
    assert first["stages"]["data"]["completionTime"] == "2026-01-01T12:00:00Z"
    later = NOW + timedelta(seconds=10)
    views = stage_views(quickstart(), [failed], first, later)
    assert next_step(views, later) == NextStep(wait_s=20.0)


def test_a_failed_stage_without_attempts_left_fails_the_pipeline() -> None:
    jobs = [rayjob("data", 1, "FAILED", endTime="2026-01-01T11:00:00Z"),
            rayjob("data", 2, "RUNNING")]
    jobs[1]["status"] = {"jobDeploymentStatus": "Failed", "message": "DeadlineExceeded"}
    status = status_of(jobs)
    assert status["phase"] == "Failed"
    assert status["stages"]["data"]["phase"] == "Failed" and status["stages"]["data"]["attempts"] == 2
    assert status["stages"]["finetune"] == {"phase": "Skipped", "attempts": 0, "message": "not run: stage data failed"}
    assert conditions(status)["Failed"] == "True" and conditions(status)["DataSucceeded"] == "False"
    views = stage_views(quickstart(), jobs, {}, NOW)
    assert next_step(views, NOW) == NextStep()


def test_every_stage_succeeded() -> None:
    jobs = [rayjob(stage, 1, "SUCCEEDED", endTime="2026-01-01T11:00:00Z") for stage in STAGES]
    # Every model stage registers a version; the pipeline's is the last one's (promote registers none).
    found = {stage: StageRun(f"run-{stage}", str(i) if stage in ("pretrain", "finetune", "quantize")
                             else None) for i, stage in enumerate(STAGES)}
    status = pipeline_status(quickstart(), jobs, previous={}, now=NOW, generation=2, found=found)
    quantize = STAGES.index("quantize")
    assert status["stages"]["quantize"] == {
        **status["stages"]["quantize"], "mlflowRunId": "run-quantize", "modelVersion": str(quantize)}
    assert "modelVersion" not in status["stages"]["promote"]
    assert status["phase"] == "Succeeded" and status["currentStage"] == "promote"
    assert status["modelVersion"] == str(quantize)
    assert conditions(status)["Complete"] == "True"


def test_transition_times_move_only_with_the_status() -> None:
    running = status_of([rayjob("data", 1, "RUNNING")])
    stamped = copy.deepcopy(running)
    for condition in stamped["conditions"]:
        condition["lastTransitionTime"] = "2025-12-31T00:00:00Z"
    done = status_of([rayjob("data", 1, "SUCCEEDED", endTime="2026-01-01T11:00:00Z")], previous=stamped)
    times = {c["type"]: c["lastTransitionTime"] for c in done["conditions"]}
    assert times["DataSucceeded"] == "2026-01-01T12:00:00Z"  # Unknown -> True
    assert times["Valid"] == "2025-12-31T00:00:00Z"  # unchanged


def test_the_status_validates_against_the_modelpipeline_crd() -> None:
    crd = REPO / "charts" / "kubeforge" / "crds" / "modelpipelines.kubeforge.io.yaml"
    jobs = [rayjob("data", 1, "FAILED", endTime="2026-01-01T11:00:00Z"), rayjob("data", 2, "RUNNING")]
    for status in (status_of(jobs, retries=0),
                   invalid_status(["spec.cluster: required"], previous={}, now=NOW, generation=1)):
        stored = {k: v for k, v in status.items() if v is not None}  # the merge patch drops the nulls
        validate_against_crd({**quickstart_document(), "status": stored}, crd)


# --- the RayService of a ModelDeployment --------------------------------------------------------------

RAYSERVICE_CRD = KUBERAY / "ray.io_rayservices.yaml"
DEPLOYMENT_OWNER = Owner(name="quickstart", namespace="team-a", uid="5d0c2f8e-1b7a-4c53-9a0e-2f4b6c8d1e22",
                         kind="ModelDeployment")
VARIANTS = [{"variant": "stable", "model": "quickstart", "version": "1"},
            {"variant": "candidate", "model": "quickstart", "version": "2"}]


def deployment_document(**spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / "deployment.yaml").read_text())
    doc["metadata"]["namespace"] = DEPLOYMENT_OWNER.namespace
    doc["spec"].update(spec)
    return doc


def build_rayservice(document: dict[str, Any], weight: int, config: OperatorConfig = CONFIG) -> dict[str, Any]:
    """The RayService of `document`, given the deployment parsed from it as the reconciler gives it."""
    return rayservice(parse_deployment(document), document, VARIANTS, weight, DEPLOYMENT_OWNER, config)


def test_the_rayservice_validates_against_the_kuberay_crd() -> None:
    if not RAYSERVICE_CRD.is_file():
        pytest.skip(f"KubeRay CRD schemas not found in {KUBERAY} (shared/fixtures/kuberay-v1.7.0)")
    service = build_rayservice(deployment_document(), 20)
    validate_against_crd(service, RAYSERVICE_CRD)
    broken = copy.deepcopy(service)
    broken["spec"]["serveConfigV2"] = yaml.safe_load(broken["spec"]["serveConfigV2"])  # a string, not a map
    with pytest.raises(SchemaValidationError, match="serveConfigV2"):
        validate_against_crd(broken, RAYSERVICE_CRD)


def test_the_rayservice_carries_the_router_weight_and_variants() -> None:
    document = deployment_document()
    service = build_rayservice(document, 20)
    assert service["metadata"]["name"] == "quickstart"
    assert service["metadata"]["labels"][LABEL_DEPLOYMENT] == "quickstart"
    assert service["metadata"]["ownerReferences"] == [{
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelDeployment", "name": "quickstart",
        "uid": DEPLOYMENT_OWNER.uid, "controller": True, "blockOwnerDeletion": True,
    }]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    (app,) = config["applications"]
    assert app["import_path"] == "kubeforge.serve.cluster:app_builder"
    assert app["args"]["variants"] == VARIANTS
    assert app["args"]["deployment"]["spec"] == document["spec"]
    assert app["deployments"] == [{"name": "Router", "user_config": {"weight": 20}}]
    assert serve_weight(service) == 20
    # Only serveConfigV2 depends on the weight: KubeRay applies a new one to the running cluster.
    moved = build_rayservice(document, 50)
    assert serve_weight(moved) == 50
    assert moved["spec"]["rayClusterConfig"] == service["spec"]["rayClusterConfig"]
    assert moved["metadata"]["annotations"] != service["metadata"]["annotations"]  # the spec hash


def test_rayservice_pods_are_hardened_sized_and_reach_mlflow() -> None:
    service = build_rayservice(deployment_document(), 20)
    cluster_config = service["spec"]["rayClusterConfig"]
    group = cluster_config["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2  # 1 replica x 2 variants
    templates = {"head": cluster_config["headGroupSpec"]["template"], "worker": group["template"]}
    for role, template in templates.items():
        validate_builtin({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"x-{role}", **template["metadata"]},
                          "spec": template["spec"]})
        (container,) = template["spec"]["containers"]
        assert container["image"] == CONFIG.stage_image
        assert {"name": "MLFLOW_TRACKING_URI", "value": CONFIG.mlflow_tracking_uri} in container["env"]
        # Ray on every pod starts with HAProxy in front of the router, as `kubeforge serve` does.
        assert {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"} in container["env"]
        assert {"name": "RAY_SERVE_ENABLE_DIRECT_INGRESS", "value": "1"} in container["env"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        assert {"name": "serve", "containerPort": 8000, "protocol": "TCP"} in container["ports"]
        assert container["resources"]["requests"] == container["resources"]["limits"]
    worker = templates["worker"]["spec"]["containers"][0]["resources"]["limits"]
    assert worker == {"cpu": "500m", "memory": "9Gi"}  # 8Gi + the 1 GB CPU KV cache
    assert "enableInTreeAutoscaling" not in cluster_config


def test_gpu_replicas_request_gpus_and_autoscaling_bounds_the_pods() -> None:
    document = deployment_document(resources={"cpus_per_replica": 4, "gpus_per_replica": 0.5},
                                   autoscaling={"min_replicas": 1, "max_replicas": 3}, port=8080)
    del document["spec"]["replicas"]
    service = build_rayservice(document, 20)
    if RAYSERVICE_CRD.is_file():
        validate_against_crd(service, RAYSERVICE_CRD)
    cluster_config = service["spec"]["rayClusterConfig"]
    group = cluster_config["workerGroupSpecs"][0]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 6)
    assert cluster_config["enableInTreeAutoscaling"] is True
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "1"}  # a GPU's KV cache is not host memory
    head = cluster_config["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    assert yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]["port"] == 8080
    assert {"name": "serve", "containerPort": 8080, "protocol": "TCP"} in head["ports"]


def test_a_rayservice_needs_the_tracking_uri_and_a_kuberay_name() -> None:
    with pytest.raises(ValueError, match="KUBEFORGE_OPERATOR_MLFLOW_TRACKING_URI"):
        build_rayservice(deployment_document(), 0, OperatorConfig(stage_image="a", quantize_image="b"))
    long_a, long_b = "a" * 60 + "-one", "a" * 60 + "-two"
    names = {rayservice_name(n) for n in (long_a, long_b)}
    assert len(names) == 2 and all(len(n) <= MAX_RAYSERVICE_NAME for n in names)
    assert rayservice_name("7b-chat") == "kf-7b-chat"
    assert rayservice_name("quickstart") == "quickstart"


def test_the_deployment_status_follows_kuberay_and_the_rollout() -> None:
    policy = parse_deployment(deployment_document()).spec.rollout
    assert policy is not None
    record = begin(policy, Subject("quickstart", "quickstart", "1", "quickstart", "2"), None, NOW.timestamp())
    service = build_rayservice(deployment_document(), record.weight)

    def status(body: dict[str, Any] | None, rec: RolloutRecord | None) -> dict[str, Any]:
        return deployment_status(owner=DEPLOYMENT_OWNER, port=8000, stable_version="1",
                                 candidate_version="2" if rec else None, record=rec, rayservice_body=body,
                                 previous={}, now=NOW, generation=3)

    starting = status(service, record)
    assert starting["phase"] == "Deploying" and starting["weight"] == 20
    assert conditions(starting) == {"Valid": "True", "Ready": "False", "Progressing": "True"}
    ready = {**service, "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "RayServiceReady",
                                                   "message": "", "lastTransitionTime": "2026-01-01T12:00:00Z"}]}}
    running = status(ready, record)
    assert running["phase"] == "RollingOut" and running["rollout"]["subject"]["candidate_version"] == "2"
    assert running["url"] == "http://quickstart-serve-svc.team-a.svc:8000/v1"
    assert status(ready, None)["phase"] == "Serving" and status(ready, None)["candidateVersion"] is None
    promoted = replace(record, phase="promoted", weight=100)
    assert status(ready, promoted)["phase"] == "Promoted"
    assert conditions(status(ready, promoted))["Progressing"] == "False"
    crd = REPO / "charts" / "kubeforge" / "crds" / "modeldeployments.kubeforge.io.yaml"
    for candidate in (running, status(ready, promoted)):
        body = {**deployment_document(), "status": {k: v for k, v in candidate.items() if v is not None}}
        validate_against_crd(body, crd)


def test_a_token_secret_reaches_every_rayservice_pod_and_the_router_reads_it_as_token_env() -> None:
    document = deployment_document(auth={"token_secret": {"name": "serve-token", "key": "token"}})
    service = build_rayservice(document, 20)
    if RAYSERVICE_CRD.is_file():
        validate_against_crd(service, RAYSERVICE_CRD)
    cluster_config = service["spec"]["rayClusterConfig"]
    reference = {"name": SERVE_TOKEN_ENV,
                 "valueFrom": {"secretKeyRef": {"name": "serve-token", "key": "token"}}}
    for template in (cluster_config["headGroupSpec"]["template"], cluster_config["workerGroupSpecs"][0]["template"]):
        validate_builtin({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **template["metadata"]},
                          "spec": template["spec"]})
        assert reference in template["spec"]["containers"][0]["env"]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["deployment"]["spec"]["auth"] == {"token_env": SERVE_TOKEN_ENV}
    assert "serve-token" not in service["spec"]["serveConfigV2"]
    # Without auth no pod gets the variable.
    plain = build_rayservice(deployment_document(), 20)
    head_env = plain["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert all(e["name"] != SERVE_TOKEN_ENV for e in head_env)
    # The builder refuses a source the pods lack with the words of the Invalid status (pod_token_secret).
    with pytest.raises(ValueError, match=r"use spec\.auth\.token_secret"):
        build_rayservice(deployment_document(auth={"token_env": "TOKEN"}), 20)


@pytest.mark.parametrize("source", ["token_env", "token_file"])
def test_the_operator_refuses_token_sources_its_pods_do_not_have(source: str) -> None:
    from kubeforge_operator.deployment import validate as validate_deployment

    with pytest.raises(SpecError) as info:
        validate_deployment(deployment_document(auth={source: "/run/token" if source == "token_file" else "TOKEN"}))
    (problem,) = info.value.problems
    assert problem.where == f"spec.auth.{source}" and "use spec.auth.token_secret" in problem.message
    validate_deployment(deployment_document(auth={"token_secret": {"name": "serve-token", "key": "token"}}))


def test_the_served_version_is_the_candidate_once_promoted() -> None:
    policy = parse_deployment(deployment_document()).spec.rollout
    assert policy is not None
    record = begin(policy, Subject("quickstart", "quickstart", "1", "quickstart", "2"), None, NOW.timestamp())

    def status(rec: RolloutRecord) -> dict[str, Any]:
        return deployment_status(owner=DEPLOYMENT_OWNER, port=8000, stable_version="1", candidate_version="2",
                                 record=rec, rayservice_body=None, previous={}, now=NOW, generation=3)

    # The pinned versions stay (the next reconciliation reads them back); the promoted candidate takes every
    # request (weight 100), so it is the served version, while both variants keep running.
    after = status(replace(record, phase="promoted", weight=100))
    assert (after["modelVersion"], after["candidateVersion"], after["servedVersion"]) == ("1", "2", "2")
    assert status(replace(record, phase="rolled_back", weight=0))["servedVersion"] == "1"
    assert status(record)["servedVersion"] == "1"
    # Both variants' replicas stay after a rollout: the worker group is sized for the two variants.
    service = build_rayservice(deployment_document(), 100)
    assert service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 2


def test_a_lora_rayservice_serves_every_adapter_from_one_deployment_configured_in_place() -> None:
    document = deployment_document(lora={"adapters": {"sql": "models:/quickstart/4"}})
    base = {"model": "quickstart", "version": "1"}

    def build(candidate: str, weight: int) -> dict[str, Any]:
        variants = [{"variant": "stable", "model": "quickstart", "version": "2"},
                    {"variant": "candidate", "model": "quickstart", "version": candidate},
                    {"variant": "sql", "model": "quickstart", "version": "4"}]
        return rayservice(parse_deployment(document), document, variants, weight, DEPLOYMENT_OWNER, CONFIG, base)

    first, second = build("3", 20), build("5", 0)
    if RAYSERVICE_CRD.is_file():
        validate_against_crd(first, RAYSERVICE_CRD)
    (app,) = yaml.safe_load(first["spec"]["serveConfigV2"])["applications"]
    (after,) = yaml.safe_load(second["spec"]["serveConfigV2"])["applications"]
    # Ray Serve restarts every replica when the application's args change: a new candidate changes none.
    assert app["args"] == after["args"]
    assert app["args"]["variants"] == [{"model": "quickstart", "version": "1", "variant": "base"}]
    spec = app["args"]["deployment"]["spec"]
    assert spec["model"] == "models:/quickstart/1" and "rollout" not in spec
    assert spec["lora"] == {"adapters": {}, "max_loras": 3}  # the adapters' URIs are user_config, their slots stay
    configs = {d["name"]: d["user_config"] for d in app["deployments"]}
    assert configs["Router"] == {"weight": 20, "sticky_header": None, "variants": {
        "stable": {"model": "quickstart", "version": "2"}, "candidate": {"model": "quickstart", "version": "3"},
        "sql": {"model": "quickstart", "version": "4"}}}
    assert configs["model-lora"] == {"adapters": {"quickstart:stable": "models:/quickstart/2",
                                                  "quickstart:candidate": "models:/quickstart/3",
                                                  "quickstart:sql": "models:/quickstart/4"}}
    assert {d["name"]: d["user_config"] for d in after["deployments"]}["model-lora"]["adapters"][
        "quickstart:candidate"] == "models:/quickstart/5"
    assert serve_weight(first) == 20 and serve_weight(second) == 0
    # One deployment serves all variants: one replica's pod, not one per variant.
    assert first["spec"]["rayClusterConfig"] == second["spec"]["rayClusterConfig"]
    assert first["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 1


def test_the_operator_runs_monitors_with_a_store_for_the_capture_and_a_prometheus_to_ask() -> None:
    from kubeforge_operator.deployment import validate as validate_deployment

    capture = {"sample_rate": 1.0, "path": "s3://bucket/traffic"}
    retrain = {"pipeline": "quickstart"}

    def problem(**spec: Any) -> Any:
        with pytest.raises(SpecError) as info:
            validate_deployment(deployment_document(**spec), prometheus=None)
        (found,) = info.value.problems
        return found

    # The monitor asks the rollout's Prometheus, as `kubeforge serve` does; without any, the operator's.
    model = validate_deployment(deployment_document(capture=capture, monitor={"thresholds": {"token_js": 0.2}}))
    assert model.spec.monitor is not None and model.spec.monitor.prometheus == "http://127.0.0.1:9090"
    document = deployment_document(capture=capture, monitor={"thresholds": {"error_rate": 0.1}}, rollout=None)
    assert validate_deployment(document, "http://ops:9090").spec.monitor.prometheus == "http://ops:9090"
    found = problem(capture=capture, monitor={"thresholds": {"error_rate": 0.1}}, rollout=None)
    assert found.where == "spec.monitor.prometheus" and "monitoring.prometheusUrl" in found.message
    # A capture the router's pod would keep on its own disk, and a webhook the operator does not serve, are refused.
    found = problem(capture={"path": "/data/traffic"}, monitor={"thresholds": {"token_js": 0.2}})
    assert found.where == "spec.capture.path" and "s3://bucket/prefix" in found.message
    training = {"thresholds": {"token_js_training": 0.2},
                "training_data": [{"type": "python-stdlib"}, {"type": "files", "paths": ["s3://b/c/*.jsonl"]}]}
    assert validate_deployment(deployment_document(capture=capture, monitor=training)).spec.monitor is not None
    training["training_data"].append({"type": "files", "paths": ["corpus/*.txt"]})
    found = problem(capture=capture, monitor=training)
    assert found.where == "spec.monitor.training_data[2].paths" and "corpus/*.txt" in found.message
    found = problem(capture=capture, monitor={"thresholds": {"token_js": 0.2},
                                              "retrain": {**retrain, "alertmanager": {}}},
                    rollout={**deployment_document()["spec"]["rollout"], "candidate": "models:/quickstart@challenger"})
    assert found.where == "spec.monitor.retrain.alertmanager" and "on_drift" in found.message
