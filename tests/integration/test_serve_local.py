"""`kubeforge serve`'s own path end to end, on the `transformers` engine (it starts in seconds): registered
versions resolved through their aliases and downloaded from MLflow, the application started on Ray Serve,
and a canary judged by Debian's Prometheus scraping it and promoted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from mlflow.tracking import MlflowClient

from kubeforge.registry.audit import CHALLENGER, CHAMPION
from kubeforge.registry.client import Registry
from kubeforge.serve.local import ServeOptions, serve_deployment
from kubeforge.spec.load import parse_deployment
from kubeforge.workdir import Workdir
from tests.helpers import alive, free_port, running_prometheus, wait_for

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


def _start(manifest: Path, workdir: Path, registry: Registry, log: Path) -> subprocess.Popen[bytes]:
    # Unbuffered: the test reads its progress lines, and a killed process would lose buffered ones.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kubeforge.cli", "serve", str(manifest), "--workdir", str(workdir),
             "--tracking-uri", registry.tracking_uri, "--num-cpus", "1", "--no-metrics"],
            stdout=out, stderr=out, env=env, start_new_session=True)


def _wait_serving(url: str, process: subprocess.Popen[bytes], log: Path, starts: int) -> None:
    """Until the `starts`-th start says it serves and answers (a crashed one may still answer a moment)."""

    def serving() -> bool:
        assert process.poll() is None, log.read_text()[-3000:]
        if log.read_text().count("serving 'signals'") < starts:
            return False
        with contextlib.suppress(httpx.HTTPError):  # not listening yet
            return httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "def", "max_tokens": 2},
                              timeout=30).status_code == 200
        return False

    wait_for(serving, f"start {starts} of kubeforge serve answering", timeout_s=300, poll_s=1)


def _tree(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    return [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]


def test_serve_starts_after_a_crash_and_leaves_nothing_after_sigterm(tiny_lm, tmp_path: Path) -> None:
    registry = registry_of(tiny_lm.pretrain.directory / "model", tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    manifest = tmp_path / "deployment.yaml"
    manifest.write_text(json.dumps({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "signals"},
        "spec": {"model": f"models:/{MODEL}@champion", "port": port,
                 "engine": {"name": "transformers", "max_model_len": 128}, "resources": {"cpus_per_replica": 0.25}},
    }))
    log = tmp_path / "serve.log"
    crashed = _start(manifest, tmp_path / "work", registry, log)
    running = [crashed]
    first: list[psutil.Process] = []
    tree: list[psutil.Process] = []
    try:
        _wait_serving(url, crashed, log, 1)
        first = _tree(crashed)
        crashed.kill()  # a crash: no handler runs, and Serve's HAProxy outlives its parent actor
        crashed.wait(30)
        second = _start(manifest, tmp_path / "work", registry, log)
        running.append(second)
        _wait_serving(url, second, log, 2)
        # The second start stopped what the crashed runtime left (HAProxy, Ray's agents), before it said it serves.
        assert not [(p.pid, p.name()) for p in first if alive(p)]
        tree = _tree(second)
        assert any(p.name() == "haproxy" for p in tree)  # a runtime of its own, with its own proxy
        second.send_signal(signal.SIGTERM)
        second.wait(120)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and [p for p in tree if alive(p)]:
            time.sleep(1)
        assert not [(p.pid, p.name()) for p in tree if alive(p)]
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/healthz", timeout=5)
    finally:
        for popen in running:
            if popen.poll() is None:
                tree += _tree(popen)
        for process in [*first, *tree]:  # whatever a failed assertion left running
            if alive(process):
                with contextlib.suppress(psutil.Error):
                    process.kill()
