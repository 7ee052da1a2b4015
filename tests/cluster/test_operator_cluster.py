"""The operator against a real cluster (KUBECONFIG) with KubeRay and the KubeForge CRDs installed.

Skipped without KUBECONFIG (tests/conftest.py). It starts `python -m kubeforge_operator` as the chart
does (standalone: no peering), applies a pipeline (the claim need not exist: RayJob creation does not
wait for volumes), checks the data stage's RayJob, the ConfigMap, the status, /healthz and /metrics,
then deletes the pipeline and checks that the finalizer removed the children.
Namespace: KUBEFORGE_TEST_NAMESPACE (default "default").
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeforge.spec.load import parse_manifest
from kubeforge_operator.rayjob import rayjob_name

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = os.environ.get("KUBEFORGE_TEST_NAMESPACE", "default")


def kubectl(*args: str, stdin: str | None = None) -> str:
    result = subprocess.run(["kubectl", "-n", NAMESPACE, *args], input=stdin, capture_output=True, text=True,
                            timeout=90)
    if result.returncode:
        raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def get_json(*args: str) -> Any:
    return json.loads(kubectl("get", *args, "-o", "json"))


def wait_for(probe: Callable[[], Any], what: str, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rayjobs_of(pipeline: str) -> list[str]:
    items = get_json("rayjobs", "-l", f"kubeforge.io/pipeline={pipeline}")["items"]
    return sorted(item["metadata"]["name"] for item in items if not item["metadata"].get("deletionTimestamp"))


def test_a_pipeline_becomes_rayjobs_and_is_cleaned_up(tmp_path: Path) -> None:
    name = f"kf-test-{uuid.uuid4().hex[:6]}"
    doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": NAMESPACE}
    doc["spec"]["cluster"] = {"workdir_claim": "kubeforge-work", "retries": 0}
    metrics_port, health_port = free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "operators"), str(REPO / "platform")]),
        "KUBEFORGE_OPERATOR_STAGE_IMAGE": "ghcr.io/kubeforge/kubeforge-train:0.1.0",
        "KUBEFORGE_OPERATOR_QUANTIZE_IMAGE": "ghcr.io/kubeforge/kubeforge-quantize:0.1.0",
        "KUBEFORGE_OPERATOR_NAMESPACES": NAMESPACE,
        "KUBEFORGE_OPERATOR_PEERING": "",
        "KUBEFORGE_OPERATOR_METRICS_PORT": str(metrics_port),
        "KUBEFORGE_OPERATOR_HEALTH_PORT": str(health_port),
    }
    log = (tmp_path / "operator.log").open("w")
    operator = subprocess.Popen([sys.executable, "-m", "kubeforge_operator"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _ok(f"http://127.0.0.1:{health_port}/healthz"), "the liveness endpoint")
        kubectl("apply", "-f", "-", stdin=yaml.safe_dump(doc))
        try:
            key = parse_manifest(doc).stage_keys()["data"]
            assert wait_for(lambda: rayjobs_of(name), "the data stage's RayJob") == [rayjob_name(name, "data", key, 1)]
            phase = wait_for(lambda: get_json("modelpipeline", name).get("status", {}).get("phase"), "a phase")
            assert phase in ("Pending", "Running")
            assert get_json("configmap", f"{name}-manifest")["metadata"]["ownerReferences"][0]["name"] == name
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            assert 'kubeforge_operator_reconciles_total{kind="ModelPipeline",result="ok"}' in metrics
            # An edit of the data section replaces its unfinished RayJob with one for the new key.
            doc["spec"]["data"]["packing"]["seq_len"] = 64
            kubectl("apply", "-f", "-", stdin=yaml.safe_dump(doc))
            edited = rayjob_name(name, "data", parse_manifest(doc).stage_keys()["data"], 1)
            assert wait_for(lambda: rayjobs_of(name) == [edited] or None, "the edited data stage's RayJob alone")
        finally:
            kubectl("delete", "modelpipeline", name, "--wait=true", "--timeout=90s")
        assert rayjobs_of(name) == []
        assert name not in kubectl("get", "configmaps", "-o", "name")
    finally:
        operator.terminate()
        operator.wait(timeout=30)
        log.close()
    assert operator.returncode in (0, -15), (tmp_path / "operator.log").read_text()


def _ok(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False
