"""The OpenAI wire format and the serving metrics: pure helpers the router uses (no Ray, no vLLM)."""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from typing import Any

from kubeforge.rollout.queries import (
    CANDIDATE,
    GENERATED_TOKENS_TOTAL,
    INTER_TOKEN_SECONDS,
    PROMPT_TOKENS_TOTAL,
    REQUEST_SECONDS,
    REQUESTS_IN_FLIGHT,
    REQUESTS_TOTAL,
    STABLE,
    TTFT_SECONDS,
)

DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for /v1/completions; chat uses the same so that a bare request stays cheap."""
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class RequestError(Exception):
    """A client error answered with `status` and a message naming the field."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def check_weight(weight: Any) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
        raise ValueError(f"weight: the candidate's share must be an integer percent within 0..100 (got {weight!r})")
    return weight


def parse_body(raw: bytes, chat: bool, max_model_len: int) -> dict[str, Any]:
    """The generation request in `raw` (an OpenAI request body), checked field by field."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"body: not valid JSON ({exc})", "body") from None
    if not isinstance(body, dict):
        raise RequestError(400, "body: expected a JSON object", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "model: required, a string naming a served model (see /v1/models)", "model")
    request: dict[str, Any] = {"model": model, "prompt": None, "messages": None}
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "messages: required, a non-empty list of {role, content} objects", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise RequestError(400, f"messages.{i}: expected an object with string role and content",
                                   f"messages.{i}")
        request["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]  # some clients send a one-element list
        if not isinstance(prompt, str):
            raise RequestError(400, "prompt: required, a string", "prompt")
        request["prompt"] = prompt
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX_TOKENS))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= max_model_len:
        raise RequestError(400, f"max_tokens: expected an integer within 1..{max_model_len} (got {max_tokens!r})",
                           "max_tokens")
    request["max_tokens"] = max_tokens
    request["temperature"] = _number(body, "temperature", 1.0, 0.0, 2.0)
    request["top_p"] = _number(body, "top_p", 1.0, 0.0, 1.0)
    if request["top_p"] == 0.0:
        raise RequestError(400, "top_p: must be above 0", "top_p")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise RequestError(400, "stop: expected a string or a list of strings", "stop")
    request["stop"] = stop
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, "seed: expected an integer", "seed")
    request["seed"] = seed
    n = body.get("n", 1)
    if n != 1:
        raise RequestError(400, f"n: only 1 completion per request is served (got {n!r})", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "stream: expected true or false", "stream")
    request["stream"] = stream
    return request


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RequestError(400, f"{name}: expected a number within {low}..{high} (got {value!r})", name)
    return float(value)


def pick_variant(weight: int, has_candidate: bool, sticky_value: str | None) -> str:
    """"candidate" for `weight` percent of requests (or of sticky header values), else "stable"."""
    if not has_candidate or weight <= 0:
        return STABLE
    if weight >= 100:
        return CANDIDATE
    if sticky_value is not None:
        # A stable hash (not Python's salted hash()): a client keeps its variant across router restarts,
        # and raising the weight only moves clients from stable to candidate, never back.
        bucket = int.from_bytes(hashlib.sha256(sticky_value.encode()).digest()[:8], "big") % 100
    else:
        bucket = random.randrange(100)
    return CANDIDATE if bucket < weight else STABLE


class Metrics:
    """The serving metrics of `kubeforge.rollout.queries`, in a registry of their own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        labels = ("model", "version", "variant")
        # prometheus_client appends `_total` to counter names itself: give them without it.
        self.requests = Counter(REQUESTS_TOTAL.removesuffix("_total"), "Requests answered, by HTTP status.",
                                [*labels, "status"], registry=self.registry)
        self.latency = Histogram(REQUEST_SECONDS, "Whole-request latency.", labels, buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.ttft = Histogram(TTFT_SECONDS, "Time to first token.", labels, buckets=LATENCY_BUCKETS,
                              registry=self.registry)
        self.inter_token = Histogram(INTER_TOKEN_SECONDS, "Time between generated tokens.", labels,
                                     buckets=INTER_TOKEN_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter(PROMPT_TOKENS_TOTAL.removesuffix("_total"), "Prompt tokens.", labels,
                                     registry=self.registry)
        self.generated_tokens = Counter(GENERATED_TOKENS_TOTAL.removesuffix("_total"), "Generated tokens.",
                                        labels, registry=self.registry)
        self.in_flight = Gauge(REQUESTS_IN_FLIGHT, "Requests being answered.", labels, registry=self.registry)


class Outcome:
    """The metrics of one request to one variant; `finish` records it (once; later calls do nothing)."""

    def __init__(self, metrics: Metrics, labels: dict[str, str]) -> None:
        self.metrics, self.labels = metrics, labels
        self.start = self.last = time.perf_counter()
        self.seen_first = False
        self.done = False
        metrics.in_flight.labels(**labels).inc()

    def prompt(self, tokens: int) -> None:
        self.metrics.prompt_tokens.labels(**self.labels).inc(tokens)

    def tokens(self, count: int) -> None:
        """`count` tokens arrived now (one engine step; usually 1)."""
        if count <= 0:
            return
        now = time.perf_counter()
        gaps = count
        if not self.seen_first:
            self.metrics.ttft.labels(**self.labels).observe(now - self.start)
            self.seen_first = True
            gaps = count - 1  # the first token's wait is the TTFT, not an inter-token gap
        for _ in range(gaps):
            # Tokens that arrive together share the time since the previous step evenly.
            self.metrics.inter_token.labels(**self.labels).observe((now - self.last) / count)
        self.last = now
        self.metrics.generated_tokens.labels(**self.labels).inc(count)

    def finish(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        self.metrics.requests.labels(**self.labels, status=str(status)).inc()
        self.metrics.latency.labels(**self.labels).observe(time.perf_counter() - self.start)
        self.metrics.in_flight.labels(**self.labels).dec()


@dataclass(frozen=True)
class Shape:
    """OpenAI response objects for one request."""

    chat: bool
    model: str
    request_id: str

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.request_id

    def whole(self, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            if self.chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        )
        return {
            "id": self.id, "object": "chat.completion" if self.chat else "text_completion",
            "created": int(time.time()), "model": self.model, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    def chunk(self, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        choice: dict[str, Any]
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {"content": text or ""}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": int(time.time()), "model": self.model, "choices": [choice]}


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def error_body(status: int, message: str, field: str | None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": field, "code": status}}
