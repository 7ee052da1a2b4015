"""The OpenAI wire format of the transformers engine (`hf_engine.TransformersServer`), which vLLM's own
server cannot front: it serves what vLLM cannot load (a `dynamic-int8` folder).

It answers `/v1/completions`, `/v1/chat/completions` and `/v1/models` with the fields it implements:
`model`, `prompt` (one string), `messages` (string contents), `max_tokens` / `max_completion_tokens`,
`temperature`, `top_p`, `stop`, `seed`, `n` (1), `stream` and `user`. Any other field is refused with
a 400 naming it rather than accepted and ignored; the vllm engine serves the whole API.
Responses are relay events (`kubeforge.serve.relay`), like the vllm engine's.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kubeforge.serve.protocol import RequestError, error_body
from kubeforge.serve.relay import ForwardedRequest

DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for /v1/completions; chat uses the same so that a bare request stays cheap."""
FIELDS = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "n", "stream",
          "user"}
"""Fields of either request the transformers engine honours, besides `prompt` or `messages`."""
JSON = [["content-type", "application/json"]]


def parse_body(raw: bytes, chat: bool, max_model_len: int) -> dict[str, Any]:
    """The generation request in `raw` (an OpenAI request body), checked field by field."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"body: not valid JSON ({exc})", "body") from None
    if not isinstance(body, dict):
        raise RequestError(400, "body: expected a JSON object", "body")
    unknown = sorted(set(body) - FIELDS - {"messages" if chat else "prompt"})
    if unknown:
        raise RequestError(400, f"{unknown[0]}: not implemented by the transformers engine (engine.name: "
                                "transformers); serve the model with engine.name: vllm to use it", unknown[0])
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
        raise RequestError(400, f"n: the transformers engine generates 1 completion per request (got {n!r})", "n")
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


def sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _body(data: dict[str, Any], tokens: int = 0, prompt_tokens: int = 0) -> dict[str, Any]:
    return {"body": json.dumps(data).encode(), "tokens": tokens, "prompt_tokens": prompt_tokens}


async def respond(server: Any, request: ForwardedRequest, names: list[str]) -> AsyncIterator[dict[str, Any]]:
    """`server`'s answer to `request` as relay events; `server` has `generate` (the engine's events) and
    `max_model_len`, and serves the model under `names`."""
    if request.path == "/v1/models" and request.method == "GET":
        cards = [{"id": name, "object": "model", "created": 0, "owned_by": "kubeforge",
                  "max_model_len": server.max_model_len} for name in names]
        yield {"status": 200, "headers": JSON}
        yield _body({"object": "list", "data": cards})
        return
    chat = request.path == "/v1/chat/completions"
    if request.method != "POST" or not (chat or request.path == "/v1/completions"):
        yield {"status": 404, "headers": JSON}
        yield _body(error_body(404, f"path: {request.path} is not served by the transformers engine", "path"))
        return
    try:
        body = parse_body(request.body, chat, server.max_model_len)
        if body["model"] not in names:
            raise RequestError(404, f"model: {body['model']!r} is not served here; served: {', '.join(names)}",
                               "model")
        events = server.generate({**body, "request_id": uuid.uuid4().hex})
        first = await events.__anext__()
        if first["type"] == "error":
            raise RequestError(first["status"], first["message"], first["field"])
    except RequestError as exc:
        yield {"status": exc.status, "headers": JSON}
        yield _body(error_body(exc.status, exc.message, exc.field))
        return
    prompt_tokens = int(first["prompt_tokens"])
    shape = Shape(chat, body["model"], uuid.uuid4().hex)
    if body["stream"]:
        yield {"status": 200, "headers": [["content-type", "text/event-stream; charset=utf-8"]]}
        yield {"body": sse(shape.chunk(None, None, first=True)), "tokens": 0, "prompt_tokens": prompt_tokens}
        async for event in events:
            if event["type"] == "delta":
                yield {"body": sse(shape.chunk(event["text"], None)), "tokens": int(event["tokens"]),
                       "prompt_tokens": 0}
            elif event["type"] == "done":
                yield {"body": sse(shape.chunk("", event["finish_reason"])) + b"data: [DONE]\n\n", "tokens": 0,
                       "prompt_tokens": 0}
        return
    parts, finish, completion_tokens, counted = [], "stop", 0, 0
    async for event in events:
        if event["type"] == "delta":
            if not counted:  # the first token goes at once: the router's time to first token
                yield {"body": b"", "tokens": int(event["tokens"]), "prompt_tokens": prompt_tokens}
                counted, prompt_tokens = int(event["tokens"]), 0
            parts.append(event["text"])
        elif event["type"] == "done":
            finish, completion_tokens = event["finish_reason"], int(event["completion_tokens"])
    yield {"status": 200, "headers": JSON}
    yield _body(shape.whole("".join(parts), finish, int(first["prompt_tokens"]), completion_tokens),
                completion_tokens - counted, prompt_tokens)
