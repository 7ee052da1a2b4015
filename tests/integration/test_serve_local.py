"""`kubeforge serve`'s own path end to end, on the `transformers` engine (it starts in seconds): registered
versions resolved through their aliases and downloaded from MLflow, the application started on Ray Serve,
and a canary judged by Debian's Prometheus scraping it and promoted.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from kubeforge.registry.audit import CHALLENGER, CHAMPION
from kubeforge.registry.client import Registry
from kubeforge.serve.local import ServeOptions, serve_deployment
from kubeforge.spec.load import parse_deployment
from kubeforge.workdir import Workdir
from tests.helpers import free_port, running_prometheus

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODEL = "tiny"


def registry_of(folder: Path, root: Path) -> Registry:
    """`folder` registered twice: version 1 champion, version 2 challenger."""
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("serve-local", artifact_location=(root / "artifacts").as_uri())
    registry = Registry(uri)
    for _ in range(2):
        run = client.create_run(experiment).info.run_id
        client.log_artifacts(run, str(folder), "model")
        registry.register(MODEL, run_id=run, artifact_path="model", tags={})
    registry.promote(MODEL, "1", alias=CHAMPION, reason="first release", user="test")
    registry.promote(MODEL, "2", alias=CHALLENGER, reason="next", user="test")
    return registry


def traffic(url: str, stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.is_set():
            try:
                http.post("/v1/completions", json={"model": MODEL, "prompt": "def", "max_tokens": 2})
            except httpx.TransportError:
                time.sleep(0.2)  # not serving yet


def test_serve_resolves_serves_and_promotes_a_canary(ray_local, tiny_lm, tmp_path: Path) -> None:
    from ray import serve

    registry = registry_of(tiny_lm.pretrain.directory / "model", tmp_path)
    port = free_port()
    options = ServeOptions(workdir=Workdir(tmp_path / "work"), registry=registry, exit_when_done=True)
    lines: list[str] = []
    stop = threading.Event()
    sender = threading.Thread(target=traffic, args=(f"http://127.0.0.1:{port}", stop), daemon=True)
    try:
        (tmp_path / "prometheus").mkdir()
        with running_prometheus(tmp_path / "prometheus", port) as prometheus:
            document = parse_deployment({
                "apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "local"},
                "spec": {
                    "model": f"models:/{MODEL}@champion", "port": port,
                    "engine": {"name": "transformers", "max_model_len": 128},
                    "resources": {"cpus_per_replica": 0.25},
                    "rollout": {"strategy": "canary", "candidate": f"models:/{MODEL}@challenger",
                                "steps": [{"weight": 50, "pause_s": 0}],
                                "analysis": {"prometheus": prometheus, "interval_s": 2, "window": "5s",
                                             "max_error_rate": 0.1, "inconclusive_limit": 20}},
                },
            })
            sender.start()
            record = serve_deployment(document, options, lines.append)
    finally:
        stop.set()
        if sender.is_alive():
            sender.join(timeout=60)
        serve.shutdown()
    assert record is not None and record.phase == "promoted", lines
    assert f"candidate: models:/{MODEL}@challenger -> version 2" in "\n".join(lines)
    assert registry.alias(MODEL, CHAMPION).version == "2"
    for version in ("1", "2"):
        assert (tmp_path / "work" / "serve-models" / MODEL / version / ".kubeforge-complete").is_file()
    assert (tmp_path / "work" / "deployments" / "local" / "rollout.json").is_file()
