"""A closed-loop load generator for OpenAI-compatible servers (`kubeforge bench load`).

`clients` concurrent clients each send a request, wait for its whole answer, and send the next one, for
`warmup_s + duration_s` seconds. Closed loop on purpose: the offered load adapts to the server, so
the numbers say what the server sustains at that concurrency rather than how a queue grows when it
cannot keep up, and two servers measured with the same clients compare like for like.

What is counted:

* A request is *measured* when it starts after the warm-up; every measured request is awaited to its
  end (none is cut off at the deadline, which would count the load generator's own cancellations as
  errors). `elapsed_s` runs from the end of the warm-up to the end of the last measured request, so
  every measured request's whole work lies inside it.
* A request *failed* when the answer is not a 200 (`http 503`), the transport failed (the httpx
  exception's name: `ConnectError`, `ReadTimeout`, ...), a 200 stream carried an error object
  (`stream error`, how OpenAI-style servers report a failure after the status line) or ended without
  `data: [DONE]` (`stream truncated`), or a 200 body was not the JSON expected (`invalid response`).
* Latency is measured on successful requests only: a failure answered in a millisecond would make
  a failing server look fast. TTFT (streaming only) is the time until the first chunk carrying text;
  OpenAI-style chat streams open with a role-only chunk that holds no token.
* Generated tokens come from the answer's `usage.completion_tokens`; a stream without usage is
  counted one token per chunk carrying text (one engine step each, which can hold more than one token
  when the server falls behind, so streamed counts are a lower bound). Streams ask for usage with
  `stream_options.include_usage`; servers that ignore it (the KubeForge router) fall back to chunks.
* Percentiles interpolate linearly between the closest ranks (numpy's default method).
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import click
import httpx

DEFAULT_PROMPTS = (
    "def main(",
    "import os\nimport sys\n\n",
    "class Config:\n    \"\"\"",
    "for i in range(",
    "    return self.",
    "if __name__ == \"__main__\":\n",
    "with open(path) as f:\n",
    "raise ValueError(",
)
"""Python fragments: the quickstart's model is trained on the standard library's source."""


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q`-th percentile (0..100) of `values`, interpolating linearly between the closest ranks
    (numpy's default); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q: a percentile is within 0..100 (got {q})")
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class LoadReport:
    """What one load run measured (see the module docstring for what counts)."""

    url: str
    model: str
    clients: int
    duration_s: float
    """The measurement window asked for; the run lasts until its last request ends (`elapsed_s`)."""
    stream: bool
    max_tokens: int
    elapsed_s: float = 0.0
    requests: int = 0
    """Measured requests, successful or not."""
    ok: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    """HTTP status code -> responses (transport failures have none)."""
    errors: dict[str, int] = field(default_factory=dict)
    """Failure kind (`http 500`, `ReadTimeout`, `stream error`, ...) -> failed requests."""
    generated_tokens: int = 0
    """Tokens generated for the successful requests."""
    latencies_s: list[float] = field(default_factory=list, repr=False)
    ttfts_s: list[float] = field(default_factory=list, repr=False)

    @property
    def failed(self) -> int:
        return self.requests - self.ok

    @property
    def requests_per_s(self) -> float:
        """Successful requests per second."""
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens of successful requests per second."""
        return self.generated_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def latency(self, q: float) -> float | None:
        return percentile(self.latencies_s, q)

    def ttft(self, q: float) -> float | None:
        return percentile(self.ttfts_s, q)

    def to_dict(self, raw: bool = False) -> dict[str, Any]:
        """JSON-ready numbers; `raw` adds every latency and TTFT sample."""
        data: dict[str, Any] = {
            "url": self.url, "model": self.model, "clients": self.clients, "duration_s": self.duration_s,
            "stream": self.stream, "max_tokens": self.max_tokens, "elapsed_s": self.elapsed_s,
            "requests": self.requests, "ok": self.ok, "failed": self.failed,
            # JSON object keys are strings.
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(sorted(self.errors.items())),
            "generated_tokens": self.generated_tokens,
            "requests_per_s": self.requests_per_s, "tokens_per_s": self.tokens_per_s,
            "latency_p50_s": self.latency(50), "latency_p90_s": self.latency(90), "latency_p99_s": self.latency(99),
            "ttft_p50_s": self.ttft(50), "ttft_p99_s": self.ttft(99),
        }
        if raw:
            data["latencies_s"] = list(self.latencies_s)
            data["ttfts_s"] = list(self.ttfts_s)
        return data

    def summary(self) -> str:
        """One paragraph for people."""
        if self.failed:
            kinds = ", ".join(f"{kind} x{count}" for kind, count in sorted(self.errors.items()))
            outcome = f"{self.ok} ok, {self.failed} failed: {kinds}"
        else:
            outcome = f"{self.ok} ok, 0 failed"
        text = (f"{self.requests} requests ({outcome}) to {self.model} at {self.url} in {self.elapsed_s:.1f} s from "
                f"{self.clients} closed-loop clients, max_tokens {self.max_tokens}, "
                f"{'streaming' if self.stream else 'not streaming'}: {self.requests_per_s:.2f} requests/s, "
                f"{self.tokens_per_s:.1f} generated tokens/s; latency p50 {_seconds(self.latency(50))}, "
                f"p90 {_seconds(self.latency(90))}, p99 {_seconds(self.latency(99))}")
        if self.stream:
            text += f"; time to first token p50 {_seconds(self.ttft(50))}, p99 {_seconds(self.ttft(99))}"
        return text + "."

    @classmethod
    def combine(cls, reports: Sequence[LoadReport]) -> LoadReport:
        """One report over several runs of the same load (interleaved rounds of a benchmark): counts and
        samples pooled, rates over the summed elapsed time."""
        if not reports:
            raise ValueError("reports: nothing to combine")
        first = reports[0]
        combined = cls(first.url, first.model, first.clients, sum(r.duration_s for r in reports), first.stream,
                       first.max_tokens)
        statuses: Counter[int] = Counter()
        errors: Counter[str] = Counter()
        for report in reports:
            combined.elapsed_s += report.elapsed_s
            combined.requests += report.requests
            combined.ok += report.ok
            combined.generated_tokens += report.generated_tokens
            combined.latencies_s.extend(report.latencies_s)
            combined.ttfts_s.extend(report.ttfts_s)
            statuses.update(report.statuses)
            errors.update(report.errors)
        combined.statuses, combined.errors = dict(statuses), dict(errors)
        return combined


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


@dataclass
class _Outcome:
    """One request as the load generator saw it."""

    start: float
    end: float = 0.0
    status: int | None = None
    error: str | None = None
    tokens: int = 0
    ttft: float | None = None


async def _send(http: httpx.AsyncClient, endpoint: str, body: dict[str, Any], clock: Callable[[], float]) -> _Outcome:
    outcome = _Outcome(start=clock())
    try:
        if body.get("stream"):
            async with http.stream("POST", endpoint, json=body) as response:
                outcome.status = response.status_code
                if response.status_code != 200:
                    await response.aread()
                    outcome.error = f"http {response.status_code}"
                else:
                    await _read_stream(response, outcome, clock)
        else:
            response = await http.post(endpoint, json=body)
            outcome.status = response.status_code
            if response.status_code != 200:
                outcome.error = f"http {response.status_code}"
            else:
                outcome.tokens = _usage_tokens(response.content)
                if outcome.tokens < 0:
                    outcome.error = "invalid response"
    except httpx.HTTPError as exc:
        # Kinds by exception class: a timeout and a refused connection need different fixes.
        outcome.error = type(exc).__name__
    outcome.end = clock()
    return outcome


def _usage_tokens(content: bytes) -> int:
    """`usage.completion_tokens` of a whole answer; -1 when the body is not such an answer."""
    try:
        tokens = json.loads(content)["usage"]["completion_tokens"]
    except (ValueError, KeyError, TypeError):
        return -1
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else -1


async def _read_stream(response: httpx.Response, outcome: _Outcome, clock: Callable[[], float]) -> None:
    chunks, usage, done = 0, None, False
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments (": keep-alive"), event names
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            done = True
            break
        try:
            event = json.loads(payload)
        except ValueError:
            outcome.error = "invalid response"
            return
        if not isinstance(event, dict):
            outcome.error = "invalid response"
            return
        if "error" in event:
            outcome.error = "stream error"
            return
        if isinstance(event.get("usage"), dict) and isinstance(event["usage"].get("completion_tokens"), int):
            usage = event["usage"]["completion_tokens"]
        if _chunk_text(event):
            chunks += 1
            if outcome.ttft is None:
                outcome.ttft = clock() - outcome.start
    if not done:
        outcome.error = "stream truncated"
        return
    outcome.tokens = usage if usage is not None else chunks


def _chunk_text(event: dict[str, Any]) -> str:
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return text if isinstance(text, str) else ""


def _endpoint(url: str, chat: bool) -> str:
    base = url.rstrip("/").removesuffix("/v1")
    return f"{base}/v1/chat/completions" if chat else f"{base}/v1/completions"


async def run_load(
    url: str,
    model: str,
    *,
    clients: int,
    duration_s: float,
    prompts: Sequence[str],
    max_tokens: int,
    stream: bool,
    headers: dict[str, str] | None = None,
    warmup_s: float = 0.0,
    chat: bool = False,
    temperature: float = 0.0,
    timeout_s: float = 300.0,
    max_requests: int | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> LoadReport:
    """Load `url` (the server's base URL, with or without `/v1`) with `clients` closed-loop clients for
    `warmup_s` unmeasured then `duration_s` measured seconds.

    Client `i` sends prompts `i, i + clients, ...` of `prompts` (cycling), so every prompt is used and
    two runs with the same arguments send the same requests. `temperature` 0 (greedy) makes the answers,
    and so the work, identical between two servers of the same model. `max_requests` ends the run
    after that many measured requests (or at the deadline, whichever comes first). `transport` and
    `clock` replace httpx's network transport and the monotonic clock (tests).
    """
    if clients < 1:
        raise ValueError(f"clients: at least 1 (got {clients})")
    if not duration_s > 0:
        raise ValueError(f"duration_s: a positive number of seconds (got {duration_s})")
    if warmup_s < 0:
        raise ValueError(f"warmup_s: zero or more seconds (got {warmup_s})")
    if not prompts:
        raise ValueError("prompts: at least one prompt")
    if max_tokens < 1:
        raise ValueError(f"max_tokens: at least 1 (got {max_tokens})")
    if max_requests is not None and max_requests < 1:
        raise ValueError(f"max_requests: at least 1 when set (got {max_requests})")

    endpoint = _endpoint(url, chat)
    report = LoadReport(url, model, clients, duration_s, stream, max_tokens)
    measured: list[_Outcome] = []
    tickets = 0
    begin = clock()
    window_start, deadline = begin + warmup_s, begin + warmup_s + duration_s

    def body(prompt: str) -> dict[str, Any]:
        request: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature,
                                   "stream": stream}
        if chat:
            request["messages"] = [{"role": "user", "content": prompt}]
        else:
            request["prompt"] = prompt
        if stream:
            request["stream_options"] = {"include_usage": True}
        return request

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal tickets
        turn = index
        while True:
            now = clock()
            if now >= deadline:
                return
            counted = now >= window_start
            if counted:
                if max_requests is not None and tickets >= max_requests:
                    return
                tickets += 1
            outcome = await _send(http, endpoint, body(prompts[turn % len(prompts)]), clock)
            turn += clients
            if counted:
                measured.append(outcome)

    # One connection per client: a smaller pool would queue requests inside the load generator and
    # count that wait as server latency.
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(headers=headers, timeout=timeout_s, limits=limits, transport=transport) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))

    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    for outcome in measured:
        if outcome.status is not None:
            statuses[outcome.status] += 1
        if outcome.error is not None:
            errors[outcome.error] += 1
            continue
        report.ok += 1
        report.generated_tokens += outcome.tokens
        report.latencies_s.append(outcome.end - outcome.start)
        if outcome.ttft is not None:
            report.ttfts_s.append(outcome.ttft)
    report.requests = len(measured)
    report.statuses, report.errors = dict(statuses), dict(errors)
    report.elapsed_s = max((o.end for o in measured), default=window_start) - window_start
    return report


def read_prompts(lines: Iterable[str]) -> list[str]:
    """Prompts from a file, one per line; `\\n` in a line stands for a newline inside the prompt."""
    return [line.rstrip("\n").replace("\\n", "\n") for line in lines if line.strip()]


@click.command("load")
@click.argument("url")
@click.option("--model", required=True, help="The `model` of every request (see the server's /v1/models).")
@click.option("--clients", type=click.IntRange(min=1), default=64, show_default=True,
              help="Concurrent closed-loop clients.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Measured seconds.")
@click.option("--warmup", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Unmeasured seconds of the same load first.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="Stream answers (SSE; measures time to first token).")
@click.option("--chat", is_flag=True, help="Use /v1/chat/completions instead of /v1/completions.")
@click.option("--prompts-file", type=click.File("r"),
              help="Prompts, one per line (\\n for a newline); built-in Python fragments otherwise.")
@click.option("--token-env", metavar="VAR", help="Send the bearer token held by environment variable VAR.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Seconds one request may take before it counts as a ReadTimeout failure.")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
def load_command(url: str, model: str, clients: int, duration: float, warmup: float, max_tokens: int, stream: bool,
                 chat: bool, prompts_file: Any, token_env: str | None, timeout: float, output: str) -> None:
    """Closed-loop load on an OpenAI-compatible server at URL; exits 1 when any request failed."""
    headers: dict[str, str] = {}
    if token_env is not None:
        import os

        token = os.environ.get(token_env, "").strip()
        if not token:
            raise click.BadParameter(f"environment variable {token_env} is not set or empty", param_hint="--token-env")
        headers["Authorization"] = f"Bearer {token}"
    prompts = read_prompts(prompts_file) if prompts_file is not None else list(DEFAULT_PROMPTS)
    if not prompts:
        raise click.BadParameter(f"{prompts_file.name} holds no prompt", param_hint="--prompts-file")
    report = asyncio.run(run_load(url, model, clients=clients, duration_s=duration, prompts=prompts,
                                  max_tokens=max_tokens, stream=stream, headers=headers, warmup_s=warmup,
                                  chat=chat, timeout_s=timeout))
    click.echo(json.dumps(report.to_dict(), indent=2) if output == "json" else report.summary())
    if report.requests == 0:
        click.echo(f"error: no request finished within {duration:g} s; is {url} serving?", err=True)
        sys.exit(1)
    if report.failed:
        click.echo(f"error: {report.failed} of {report.requests} requests failed", err=True)
        sys.exit(1)
