"""Relaying HTTP between the router and a variant replica without re-encoding it: pure asyncio, no Ray.

A variant replica answers a request the router hands it (`ForwardedRequest`) by running an ASGI app
in its own process (vLLM's OpenAI server app, `engine.ModelServer`) and streaming back what the app
sends, as events:

* `{"body": b"...", "tokens": n, "prompt_tokens": m}`: response bytes exactly as the app wrote
  them (possibly none), and the tokens the engine produced since the previous event (`tokens`) and
  the prompt tokens it read (`prompt_tokens`), which the router's metrics count;
* the first of them after the app starts its response also carries `"status": 200, "headers":
  [[name, value], ...]` (a status alone would cost a crossing of its own). A response that is not
  streamed starts only when it is complete, so its first token's event comes before its status.

(A replica that cannot answer at all, its engine dead, sends `{"unavailable": reason}` alone instead,
before any status: the router then sends the request again.)

Events are coalesced: the first event that carries a token goes at once (the router's time to first
token keeps its meaning), later ones at most every `STREAM_INTERVAL_S` for a streamed response and
together at the end otherwise, and the response's last bytes as soon as the app writes them. Every
event crosses two processes (replica -> router -> HAProxy), and sent per token that cost, not the
engine, bounded throughput on a small machine (benchmarks/bench_serve.py). Beyond
`STREAMS_PER_INTERVAL` streams open in a replica the interval grows in proportion, so the events a
replica sends per second stay bounded however large the engine's batch grows (a fast engine at 32
streams spent its CPU on relaying otherwise).

Token counts come from the engine itself, not from parsing the bytes: `count_tokens` wraps the
engine's `generate`, and reports to the request's `Progress` through a context variable, which the
ASGI app's task inherits from `call_asgi`.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

STREAM_INTERVAL_S = 0.05
"""Events go to the router at most this often after the first token: below visible stutter."""
STREAMS_PER_INTERVAL = 16
"""Open streams a replica relays at `STREAM_INTERVAL_S`; with more, each one's interval grows in proportion."""
_open_streams = 0
"""Streamed responses this process relays now (replicas run one event loop: no lock needed)."""


def stream_interval(base: float, open_streams: int) -> float:
    """How long a stream's events are held when `open_streams` streams are open in this process."""
    return base * max(1.0, open_streams / STREAMS_PER_INTERVAL)
HOP_BY_HOP = {b"content-length", b"transfer-encoding", b"connection", b"keep-alive"}
"""Headers that describe one connection, not the response: the router's server sets its own."""


@dataclass(frozen=True)
class ForwardedRequest:
    """What the router passes on: the request as the client sent it, minus its connection."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    query: str = ""


@dataclass
class Progress:
    """The engine's token counts for one request, as they happen; `changed` is set on each."""

    changed: asyncio.Event = field(default_factory=asyncio.Event)
    tokens: int = 0
    prompt_tokens: int = 0

    def add(self, tokens: int, prompt_tokens: int) -> None:
        self.tokens += tokens
        self.prompt_tokens += prompt_tokens
        if tokens or prompt_tokens:
            self.changed.set()

    def pending(self) -> bool:
        return bool(self.tokens or self.prompt_tokens)

    def take(self) -> tuple[int, int]:
        counts = (self.tokens, self.prompt_tokens)
        self.tokens = self.prompt_tokens = 0
        return counts


_PROGRESS: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("kubeforge_progress", default=None)


def count_tokens(generate: Callable[..., AsyncGenerator[Any]]) -> Callable[..., AsyncGenerator[Any]]:
    """vLLM's `EngineClient.generate`, reporting each output's new tokens to the calling request's Progress.

    A request may run several generations (a batch of prompts, `n` > 1): each reports its own."""

    async def counted(*args: Any, **kwargs: Any) -> AsyncGenerator[Any]:
        progress = _PROGRESS.get()
        params = kwargs.get("sampling_params", args[1] if len(args) > 1 else None)
        # DELTA outputs carry only the new tokens; CUMULATIVE and FINAL_ONLY carry all so far.
        delta = getattr(getattr(params, "output_kind", None), "name", "") == "DELTA"
        seen: dict[int, int] = {}
        first = True
        inner = generate(*args, **kwargs)
        try:
            async for output in inner:
                if progress is not None:
                    new = 0
                    for choice in getattr(output, "outputs", None) or []:
                        count = len(choice.token_ids)
                        if delta:
                            new += count
                        else:
                            new += max(0, count - seen.get(choice.index, 0))
                            seen[choice.index] = count
                    prompt = len(output.prompt_token_ids or ()) if first else 0
                    first = False
                    progress.add(new, prompt)
                yield output
        finally:
            # Closing the wrapper must close the engine's generator too: that is what aborts the request.
            await inner.aclose()

    return counted


async def call_asgi(app: Any, request: ForwardedRequest, stream_interval_s: float = STREAM_INTERVAL_S) -> (
        AsyncIterator[dict[str, Any]]):
    """Run `app` on `request` in this process and yield its response as events (see the module docstring).

    Closing the generator tells the app the client disconnected (vLLM then aborts the generation)."""
    # One event wakes this loop for everything (a message from the app, new tokens, the app's end):
    # waiting costs no task per token, which at dozens of streams was most of a replica's CPU.
    wake = asyncio.Event()
    # What ends a hold early (see below): the response's last body, or the app's end.
    complete = asyncio.Event()
    sent: list[dict[str, Any]] = []
    disconnected = asyncio.Event()
    body_given = False

    async def receive() -> dict[str, Any]:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        wake.set()
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            complete.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
        "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
        "query_string": request.query.encode(), "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80), "state": {},
    }
    progress = Progress(changed=wake)
    token = _PROGRESS.set(progress)
    try:
        task = asyncio.create_task(app(scope, receive, send))  # copies the context: the engine sees `progress`
    finally:
        _PROGRESS.reset(token)

    def ended(_: asyncio.Task[Any]) -> None:
        wake.set()
        complete.set()

    task.add_done_callback(ended)

    global _open_streams
    streamed = finished = False
    head: dict[str, Any] | None = None  # the status and headers, until the event they go with
    body: list[bytes] = []
    last_sent: float | None = None
    try:
        while True:
            wake.clear()
            messages, sent[:] = sent[:], []
            for message in messages:
                if message["type"] == "http.response.start":
                    headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in message.get("headers", [])
                               if k.lower() not in HOP_BY_HOP]
                    streamed = any(k.lower() == "content-type" and v.startswith("text/event-stream")
                                   for k, v in headers)
                    _open_streams += streamed
                    head = {"status": int(message["status"]), "headers": headers}
                elif message["type"] == "http.response.body":
                    body.append(message.get("body", b""))
                    finished = finished or not message.get("more_body", False)
            if task.done() and not sent:
                task.result()  # the app's own exception, if it raised one instead of answering
                finished = True
            now = time.monotonic()
            interval = stream_interval(stream_interval_s, _open_streams)
            if body or progress.pending():
                if last_sent is None and progress.pending():
                    due = True  # the first token, at once
                else:
                    due = finished or (streamed and now - (last_sent or 0.0) >= interval)
                if due:
                    tokens, prompt_tokens = progress.take()
                    event = {"body": b"".join(body), "tokens": tokens, "prompt_tokens": prompt_tokens}
                    if head is not None:
                        event, head = head | event, None
                    yield event
                    body, last_sent = [], now
                elif streamed:
                    # Hold what came for the rest of the interval, but not longer, and not past the response's
                    # end: the client's request is not over until its last bytes go (a closed-loop client sends
                    # its next one only then). Tokens do not end a hold, so holding wakes this loop once.
                    # (Nothing ran since `sent` was taken above: neither the end nor the app's end is missed.)
                    complete.clear()
                    timer = asyncio.get_running_loop().call_later(
                        max(0.0, interval - (now - (last_sent or now))), complete.set)
                    await complete.wait()
                    timer.cancel()
                    continue
            if finished:
                return
            await wake.wait()
    finally:
        _open_streams -= streamed
        disconnected.set()
        if not task.done():
            task.cancel()
