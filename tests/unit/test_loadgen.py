"""The load generator against fake servers: what it counts, how it fails, and its percentile math.

Most tests answer through `httpx.MockTransport` with a fake clock that the fake server advances, so
every latency and time to first token is known exactly; the CLI tests use a real socket server and a
clock that ticks at every reading, so how many requests fit in `--duration` does not depend on this
machine's speed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from kubeforge.serve import loadgen
from kubeforge.serve.loadgen import LoadReport, load_command, percentile, run_load

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sse(event: dict[str, Any] | str) -> bytes:
    return f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode()


def chunk(text: str | None = None, role: bool = False) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": text}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def load(handler: Callable[[httpx.Request], Any], clock: FakeClock, **kwargs: Any) -> LoadReport:
    options: dict[str, Any] = {"clients": 1, "duration_s": 1000.0, "prompts": ["p"], "max_tokens": 4,
                               "stream": False} | kwargs
    return asyncio.run(run_load("http://fake:8000", "m", transport=httpx.MockTransport(handler), clock=clock,
                                **options))


@pytest.mark.parametrize("q", [0, 10, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy(q: float) -> None:
    values = [random.Random(q).uniform(0, 5) for _ in range(37)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_edges() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    with pytest.raises(ValueError, match=r"q: a percentile is within 0\.\.100"):
        percentile([1.0], 101)


def test_non_streaming_counts_errors_tokens_and_latency() -> None:
    clock = FakeClock()
    sent: list[dict[str, Any]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append(body)
        n = len(sent)
        clock.now += n  # request n takes n seconds
        if n % 3 == 0:
            return httpx.Response(500, json={"error": {"message": "boom"}})
        if n == 4:
            return httpx.Response(200, content=b"not json")
        return httpx.Response(200, json={"choices": [{"text": "x"}], "usage": {"completion_tokens": n}})

    report = load(handler, clock, max_requests=7, max_tokens=5, prompts=["a", "b"])

    assert report.requests == 7 and report.ok == 4 and report.failed == 3
    assert report.statuses == {200: 5, 500: 2}
    assert report.errors == {"http 500": 2, "invalid response": 1}
    assert report.latencies_s == [1.0, 2.0, 5.0, 7.0]  # requests 1, 2, 5, 7 succeeded
    assert report.generated_tokens == 1 + 2 + 5 + 7
    assert report.elapsed_s == 28.0  # 1 + 2 + ... + 7 seconds, back to back
    assert report.requests_per_s == 4 / 28
    assert report.tokens_per_s == 15 / 28
    assert report.latency(50) == 3.5
    assert report.latency(90) == pytest.approx(5.0 + 0.7 * 2.0, rel=1e-12)
    assert report.latency(99) == pytest.approx(5.0 + 0.97 * 2.0, rel=1e-12)
    assert report.ttfts_s == [] and report.ttft(50) is None
    assert [b["prompt"] for b in sent] == ["a", "b", "a", "b", "a", "b", "a"]
    assert sent[0] == {"model": "m", "max_tokens": 5, "temperature": 0.0, "stream": False, "prompt": "a"}


def test_streaming_measures_ttft_and_counts_stream_failures() -> None:
    clock = FakeClock()
    calls = 0

    def stream(*events: tuple[float, bytes]) -> AsyncIterator[bytes]:
        async def body() -> AsyncIterator[bytes]:
            for delay, data in events:
                clock.now += delay
                yield data
        return body()

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        sse_headers = {"content-type": "text/event-stream"}
        if calls == 1:  # role chunk first (no token), then 3 tokens, no usage: counted by chunk
            return httpx.Response(200, headers=sse_headers, content=stream(
                (0.5, sse(chunk(role=True))), (0.25, sse(chunk("a"))), (0.25, sse(chunk("b"))),
                (0.5, sse(chunk("c"))), (0.0, sse("[DONE]"))))
        if calls == 2:  # usage in the last chunk wins over the chunk count
            return httpx.Response(200, headers=sse_headers, content=stream(
                (2.0, sse(chunk("abc"))), (1.0, sse({"choices": [], "usage": {"completion_tokens": 6}})),
                (0.0, sse("[DONE]"))))
        if calls == 3:
            clock.now += 0.125
            return httpx.Response(503, json={"error": {"message": "injected"}})
        if calls == 4:  # an error object after the status line
            return httpx.Response(200, headers=sse_headers, content=stream(
                (1.0, sse(chunk("a"))), (1.0, sse({"error": {"message": "engine died", "code": 500}})),
                (0.0, sse("[DONE]"))))
        # the connection closes before [DONE]
        return httpx.Response(200, headers=sse_headers, content=stream((1.0, sse(chunk("a")))))

    report = load(handler, clock, max_requests=5, stream=True)

    assert report.requests == 5 and report.ok == 2
    assert report.statuses == {200: 4, 503: 1}
    assert report.errors == {"http 503": 1, "stream error": 1, "stream truncated": 1}
    assert report.ttfts_s == [0.75, 2.0]
    assert report.latencies_s == [1.5, 3.0]
    assert report.generated_tokens == 3 + 6
    assert report.elapsed_s == 1.5 + 3.0 + 0.125 + 2.0 + 1.0
    assert report.ttft(50) == 1.375
    summary = report.summary()
    assert "5 requests (2 ok, 3 failed: http 503 x1, stream error x1, stream truncated x1)" in summary
    assert "time to first token p50 1.38 s, p99 1.99 s." in summary


def test_transport_errors_are_counted_by_kind() -> None:
    clock = FakeClock()
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        clock.now += 1.0
        if calls in (2, 5):
            raise httpx.ReadTimeout("timed out", request=request)
        if calls == 3:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"usage": {"completion_tokens": 4}})

    report = load(handler, clock, max_requests=6)
    assert report.errors == {"ReadTimeout": 2, "ConnectError": 1}
    assert report.statuses == {200: 3}  # a transport failure has no status
    assert report.ok == 3 and report.failed == 3
    data = report.to_dict()
    assert data["errors"] == {"ConnectError": 1, "ReadTimeout": 2} and data["statuses"] == {"200": 3}
    json.dumps(data)


def test_warmup_requests_are_not_measured_and_the_last_request_ends_the_run() -> None:
    clock = FakeClock()

    def handler(request: httpx.Request) -> httpx.Response:
        clock.now += 1.0
        return httpx.Response(200, json={"usage": {"completion_tokens": 2}})

    # starts at 0, 1 (warm-up), then 2, 3, 4, 5; 6 is past the deadline (2 + 3.5); the one started at 5 ends at 6
    report = load(handler, clock, warmup_s=2.0, duration_s=3.5)
    assert report.requests == 4 and report.ok == 4
    assert report.elapsed_s == 4.0
    assert report.requests_per_s == 1.0 and report.tokens_per_s == 2.0


def test_every_client_cycles_through_its_own_prompts() -> None:
    clock = FakeClock()
    seen: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content)["messages"][0]["content"])
        await asyncio.sleep(0)
        return httpx.Response(200, json={"usage": {"completion_tokens": 1}})

    report = load(handler, clock, clients=2, max_requests=8, prompts=["p0", "p1", "p2", "p3"], chat=True)
    assert report.ok == 8
    assert sorted(seen) == ["p0", "p0", "p1", "p1", "p2", "p2", "p3", "p3"]


def test_combine_pools_rounds() -> None:
    a = LoadReport("u", "m", 2, 10.0, False, 4, elapsed_s=10.0, requests=5, ok=4, statuses={200: 4, 500: 1},
                   errors={"http 500": 1}, generated_tokens=16, latencies_s=[1.0, 2.0, 3.0, 4.0])
    b = LoadReport("u", "m", 2, 10.0, False, 4, elapsed_s=6.0, requests=2, ok=2, statuses={200: 2},
                   generated_tokens=8, latencies_s=[5.0, 6.0])
    both = LoadReport.combine([a, b])
    assert (both.requests, both.ok, both.elapsed_s, both.generated_tokens) == (7, 6, 16.0, 24)
    assert both.statuses == {200: 6, 500: 1} and both.errors == {"http 500": 1}
    assert both.latency(50) == 3.5 and both.requests_per_s == 6 / 16
    with pytest.raises(ValueError, match="reports: nothing to combine"):
        LoadReport.combine([])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"clients": 0}, "clients: at least 1"),
    ({"duration_s": 0.0}, "duration_s: a positive number"),
    ({"warmup_s": -1.0}, "warmup_s: zero or more"),
    ({"prompts": []}, "prompts: at least one"),
    ({"max_tokens": 0}, "max_tokens: at least 1"),
    ({"max_requests": 0}, "max_requests: at least 1"),
])
def test_bad_arguments_name_the_parameter(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load(lambda request: httpx.Response(200), FakeClock(), **kwargs)


# -- the CLI, against a real socket server --


class TickingClock:
    """A clock that moves 50 ms at every reading."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.05
        return self.now


@pytest.fixture
def ticking_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's load on a TickingClock instead of the wall clock. On the wall clock, a short `--duration`
    can pass before the first request starts (building the HTTP client alone can take that long on a busy
    machine), and the run then reports no request at all. On this clock each client starts its first
    request at once, and a run of 0.2 "seconds" always holds a few requests."""
    monkeypatch.setattr(loadgen, "run_load", functools.partial(loadgen.run_load, clock=TickingClock()))


@pytest.fixture
def server() -> Iterator[tuple[str, dict[str, Any]]]:
    """A threaded HTTP server answering /v1/completions; `state["status"]` picks its answer and
    `state["auth"]` records the last Authorization header."""
    state: dict[str, Any] = {"status": 200, "auth": None}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            state["auth"] = self.headers.get("authorization")
            status = state["status"]
            payload = json.dumps({"usage": {"completion_tokens": 3}} if status == 200 else {"error": {}}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", state
    httpd.shutdown()
    httpd.server_close()


def test_cli_succeeds_with_no_failed_request_and_sends_the_token(server, monkeypatch, ticking_clock) -> None:
    url, state = server
    monkeypatch.setenv("BENCH_TOKEN", "s3cret")
    result = CliRunner().invoke(load_command, [url, "--model", "m", "--clients", "2", "--duration", "0.3",
                                               "--no-stream", "--token-env", "BENCH_TOKEN", "-o", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["failed"] == 0 and data["ok"] > 0 and data["generated_tokens"] == 3 * data["ok"]
    assert state["auth"] == "Bearer s3cret"


def test_cli_exits_1_when_a_request_failed(server, ticking_clock) -> None:
    url, state = server
    state["status"] = 500
    result = CliRunner().invoke(load_command, [url, "--model", "m", "--clients", "1", "--duration", "0.2",
                                               "--no-stream"])
    assert result.exit_code == 1
    assert "failed: http 500 x" in result.stdout
    assert "requests failed" in result.stderr


def test_cli_counts_a_refused_connection(unused_tcp_port_url: str, ticking_clock) -> None:
    result = CliRunner().invoke(load_command, [unused_tcp_port_url, "--model", "m", "--clients", "1",
                                               "--duration", "0.2", "-o", "json"])
    assert result.exit_code == 1
    assert set(json.loads(result.stdout)["errors"]) == {"ConnectError"}


def test_cli_names_a_missing_token_variable(monkeypatch) -> None:
    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    result = CliRunner().invoke(load_command, ["http://127.0.0.1:9", "--model", "m", "--token-env",
                                               "NO_SUCH_TOKEN_VAR"])
    assert result.exit_code == 2
    assert "environment variable NO_SUCH_TOKEN_VAR is not set or empty" in result.output


@pytest.fixture
def unused_tcp_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Closed again: nothing listens there, so connecting is refused at once.
    return f"http://127.0.0.1:{port}"
