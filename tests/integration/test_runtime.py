"""The local Ray runtime KubeForge starts: its workers compete for the CPU as the run that started them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kubeforge.runtime import HAPROXY_PORT_ENV, haproxy_ports_of_its_own
from tests.helpers import free_port, stop_process_group, wait_for

pytestmark = pytest.mark.integration

WORKER_NICENESS = """
import os, ray
from kubeforge.runtime import ensure_ray

ensure_ray(None, 1)
print(os.nice(0), ray.get(ray.remote(num_cpus=1)(lambda: os.nice(0)).remote()))
ray.shutdown()
"""


def test_workers_of_a_local_runtime_keep_the_niceness_of_the_run_that_started_it() -> None:
    # Ray's own default would put them 15 above it, where any busy process starves them.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_worker_niceness")}
    started = subprocess.run(["nice", "-n", "3", sys.executable, "-c", WORKER_NICENESS], env=env,
                             capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr[-3000:]
    driver, worker = started.stdout.split()[-2:]
    assert int(driver) == os.nice(0) + 3
    assert worker == driver


SERVE_HELLO = """
import os, sys
import httpx
from ray import serve
from kubeforge.runtime import HAPROXY_PORT_ENV, ensure_ray

ensure_ray(None, 1, join_running=False)

@serve.deployment
class Hello:
    async def __call__(self, request):
        return "hello"

serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[1])})
serve.run(Hello.bind(), name="hello", route_prefix="/")
answer = httpx.get(f"http://127.0.0.1:{sys.argv[1]}/", timeout=30).text
print(answer, *[name in os.environ for name in HAPROXY_PORT_ENV], flush=True)
sys.stdin.read()  # serving until the test closes stdin
serve.shutdown()
"""


def test_two_local_runtimes_serve_side_by_side_each_with_its_own_haproxy(tmp_path: Path) -> None:
    # Serve's HAProxy binds a stats and a metrics port besides the application's; with its fixed defaults
    # the second Serve on a machine failed to start (`HAProxyManager.ready()`).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k not in HAPROXY_PORT_ENV}
    servers: list[tuple[subprocess.Popen[str], Path]] = []
    try:
        for n in range(2):
            log = tmp_path / f"serve-{n}.log"
            with log.open("w") as out:
                process = subprocess.Popen([sys.executable, "-c", SERVE_HELLO, str(free_port())], env=env, text=True,
                                           stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True)
            servers.append((process, log))

            def serving(process: subprocess.Popen[str] = process, log: Path = log) -> bool:
                assert process.poll() is None, log.read_text()[-3000:]
                return "hello" in log.read_text()

            wait_for(serving, f"local runtime {n} serving", timeout_s=300, poll_s=1)
        for process, log in servers:
            assert process.poll() is None, log.read_text()[-3000:]
            # The ports went to the runtime only: a child process starting a runtime of its own picks its own.
            assert "hello False False" in log.read_text()
            assert process.stdin is not None
            process.stdin.close()
        for process, log in servers:
            assert process.wait(120) == 0, log.read_text()[-3000:]
    finally:
        for process, _ in servers:
            if process.poll() is None:
                stop_process_group(process)


def test_a_haproxy_port_the_user_set_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    stats, metrics = HAPROXY_PORT_ENV
    monkeypatch.setenv(stats, "18404")
    monkeypatch.delenv(metrics, raising=False)
    with haproxy_ports_of_its_own():
        assert os.environ[stats] == "18404"
        chosen = int(os.environ[metrics])
        with socket.socket() as probe:
            probe.bind(("", chosen))  # free on every interface, as HAProxy binds it
    assert os.environ[stats] == "18404"
    assert metrics not in os.environ
