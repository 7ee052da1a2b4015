"""The status the router records for a streamed answer whose client hangs up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kubeforge.serve.router import Router

pytestmark = pytest.mark.unit


async def events(bodies: list[bytes]) -> AsyncIterator[dict[str, Any]]:
    for body in bodies:
        yield {"body": body}


def status_after_reading(bodies: list[bytes], read: int) -> int:
    """The status captured when the client reads `read` chunks and then closes the connection."""
    recorded: dict[str, Any] = {}

    async def scenario() -> None:
        router = Router.func_or_class
        # The first bytes come with the status (`Router._start`), the rest as events.
        relay = router._relay(router, bodies[0], events(bodies[1:]), None, 200, "r1",
                              lambda **row: recorded.update(row))
        for _ in range(read):
            await relay.__anext__()
        await relay.aclose()  # what the HTTP server does when the client has gone

    asyncio.run(scenario())
    return int(recorded["status"])


def test_a_client_that_hangs_up_after_the_terminator_got_the_whole_answer() -> None:
    bodies = [b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n', b"data: [DONE]\n\n"]
    assert status_after_reading(bodies, read=2) == 200
    assert status_after_reading(bodies, read=1) == 499  # gone before the end


class Exposition:
    """A handle method's `.remote()`: the monitor replica's answer, or its failure."""

    def __init__(self, answer: bytes | Exception) -> None:
        self.answer = answer

    def remote(self) -> Any:
        async def call() -> bytes:
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

        return call()


def test_on_a_cluster_the_routers_metrics_carry_the_monitors_and_survive_its_failure() -> None:
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    Counter("kubeforge_router_own", "The router's own.", registry=registry).inc()

    def scraped(answer: bytes | Exception) -> bytes:
        router = SimpleNamespace(metrics=SimpleNamespace(registry=registry), monitor=SimpleNamespace(
            exposition=Exposition(answer)))
        return bytes(asyncio.run(Router.func_or_class.metrics_text(router)).body)

    text = scraped(b'kubeforge_monitor_blind{deployment="d"} 0.0\n')
    assert b"kubeforge_router_own_total 1.0" in text and text.endswith(b'kubeforge_monitor_blind{deployment="d"} 0.0\n')
    text = scraped(RuntimeError("the monitor replica is restarting"))
    assert b"kubeforge_router_own_total 1.0" in text and b"kubeforge_monitor" not in text


class Handle:
    """A deployment handle that remembers the options it was given."""

    def __init__(self, given: dict[str, Any] | None = None) -> None:
        self.given = given or {}

    def options(self, **options: Any) -> Handle:
        return Handle({**self.given, **options})


def test_the_router_reaches_every_variant_over_serves_grpc_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray's actor calls, the other transport, cost the router up to twice the CPU per request.
    import ray.serve

    written = Router.func_or_class.__bases__[0]  # the class as written, without Serve's ingress wrapper
    router = written(Handle(), None, {"stable": {"model": "m", "version": "1"}}, 0, None, None)
    monkeypatch.setattr(ray.serve, "get_deployment_handle", lambda deployment, app: Handle())
    asyncio.run(router.attach_candidate("loop-app", "model-candidate", "m", "2"))
    assert {variant: handle.given for variant, handle in router.handles.items()} == {
        "stable": {"_by_reference": False}, "candidate": {"_by_reference": False}}
