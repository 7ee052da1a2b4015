"""`Router`: the OpenAI-compatible ingress in front of the variants (see `kubeforge.serve.app`).

Exactly one replica: the metrics and the candidate weight live in its process.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from kubeforge.rollout.queries import CANDIDATE, STABLE
from kubeforge.serve.auth import read_token
from kubeforge.serve.faults import Faults
from kubeforge.serve.protocol import (
    Metrics,
    Outcome,
    RequestError,
    Shape,
    check_weight,
    error_body,
    parse_body,
    pick_variant,
    sse,
)
from kubeforge.spec.deployment import AuthSpec

logger = logging.getLogger("kubeforge.serve")

VARIANT_HEADER = "x-kubeforge-variant"
VERSION_HEADER = "x-kubeforge-version"
REQUEST_ID_HEADER = "x-request-id"

api = FastAPI(title="KubeForge", docs_url=None, redoc_url=None, openapi_url=None)


def json_error(status: int, message: str, field: str | None, request_id: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    all_headers = dict(headers or {})
    if request_id is not None:
        all_headers[REQUEST_ID_HEADER] = request_id
    return JSONResponse(error_body(status, message, field), status_code=status, headers=all_headers)


@serve.deployment
@serve.ingress(api)
class Router:
    def __init__(self, stable: Any, candidate: Any, labels: dict[str, dict[str, str]], weight: int,
                 sticky_header: str | None, auth: dict[str, Any] | None) -> None:
        self.handles = {STABLE: stable} if candidate is None else {STABLE: stable, CANDIDATE: candidate}
        self.labels = labels
        self.weight = check_weight(weight)
        self.sticky_header = sticky_header.lower() if sticky_header else None
        # Read once at start: a replica that cannot find its token must fail to start, not answer 401.
        self.token = read_token(AuthSpec(**auth)) if auth is not None else None
        self.metrics = Metrics()
        self.max_model_len: dict[str, int] = {}
        self.faults = {variant: Faults() for variant in self.handles}

    # -- live control (handle calls, not HTTP) --

    def set_weight(self, weight: int) -> int:
        """Send `weight` percent of new requests to the candidate from now on; returns the previous weight."""
        check_weight(weight)
        if weight and CANDIDATE not in self.handles:
            raise ValueError("weight: no candidate variant is served; only 0 is possible")
        old, self.weight = self.weight, weight
        logger.info("candidate weight %d -> %d", old, weight)
        return old

    def get_weight(self) -> int:
        return self.weight

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Ray Serve's in-place update: a RayService's `user_config: {weight: N}` on this deployment
        reaches the running replica here, without a restart (how the operator moves a canary)."""
        unknown = sorted(set(config) - {"weight"})
        if unknown:
            raise ValueError(f"user_config: unknown keys {unknown}; only 'weight' is read")
        if "weight" in config:
            self.set_weight(config["weight"])

    def set_faults(self, variant: str, fail_rate: float = 0.0, delay_s: float = 0.0) -> None:
        """TEST-ONLY (see kubeforge.serve.faults): make `variant` fail or slow down from now on."""
        if variant not in self.handles:
            raise ValueError(f"variant: {variant!r} is not served (served: {', '.join(self.handles)})")
        self.faults[variant] = Faults(fail_rate, delay_s)
        logger.warning("TEST-ONLY fault injection on %s: fail_rate=%s delay_s=%s", variant, fail_rate, delay_s)

    # -- HTTP --

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "weight": self.weight, "variants": self.labels}

    @api.get("/metrics")
    async def metrics_text(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        if (denied := self._deny(request)) is not None:
            return denied
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "kubeforge"} for name in self.served_names()]
        return JSONResponse({"object": "list", "data": data})

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    # -- internals --

    def served_names(self) -> list[str]:
        """The registered model name (split by weight) and `<name>:<variant>` (pinned to one variant)."""
        names = [self.labels[STABLE]["model"]]
        if CANDIDATE in self.handles and self.labels[CANDIDATE]["model"] not in names:
            names.append(self.labels[CANDIDATE]["model"])  # a candidate registered under another name
        names += [f"{self.labels[v]['model']}:{v}" for v in self.handles]
        return names

    def _deny(self, request: Request) -> JSONResponse | None:
        if self.token is None:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return json_error(401, "authorization: missing or wrong bearer token", "authorization",
                              headers={"WWW-Authenticate": "Bearer"})
        return None

    def _choose(self, model: str, request: Request) -> str:
        name, colon, pinned = model.partition(":")
        if colon:
            if pinned in self.handles and self.labels[pinned]["model"] == name:
                return pinned
        elif name == self.labels[STABLE]["model"]:
            sticky = request.headers.get(self.sticky_header) if self.sticky_header else None
            return pick_variant(self.weight, CANDIDATE in self.handles, sticky)
        elif CANDIDATE in self.handles and name == self.labels[CANDIDATE]["model"]:
            return CANDIDATE
        raise RequestError(404, f"model: {model!r} is not served here; served: {', '.join(self.served_names())}",
                           "model")

    async def _context(self, variant: str) -> int:
        if variant not in self.max_model_len:
            info = await self.handles[variant].info.remote()
            self.max_model_len[variant] = int(info["max_model_len"])
        return self.max_model_len[variant]

    async def _serve(self, request: Request, chat: bool) -> Response:
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        outcome: Outcome | None = None
        headers: dict[str, str] = {}
        try:
            if (denied := self._deny(request)) is not None:
                return denied
            raw = await request.body()
            # The model name picks the variant, whose context then bounds max_tokens: peek at it first;
            # parse_body reports a malformed body or a missing name.
            try:
                peeked = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                peeked = None
            model = peeked.get("model") if isinstance(peeked, dict) else None
            variant = self._choose(model, request) if isinstance(model, str) and model else STABLE
            max_model_len = await self._context(variant)
            if isinstance(model, str) and model:
                outcome = Outcome(self.metrics, {**self.labels[variant], "variant": variant})
                # Errors from here on are the variant's: say which one answered, as successes do.
                headers = {VARIANT_HEADER: variant, VERSION_HEADER: self.labels[variant]["version"]}
            body = parse_body(raw, chat, max_model_len)
            assert outcome is not None  # parse_body requires a model name
            faults = self.faults[variant]
            if faults.injects():
                if random.random() < faults.fail_rate:
                    raise RequestError(503, "injected fault (test-only fault injection)")
                await asyncio.sleep(faults.delay_s)
            stream = self.handles[variant].options(stream=True).generate.remote(
                {**body, "request_id": f"{request_id}-{variant}"})
            first = await stream.__anext__()
            if first["type"] == "error":
                raise RequestError(first["status"], first["message"], first["field"])
            prompt_tokens = int(first["prompt_tokens"])
            outcome.prompt(prompt_tokens)
            headers[REQUEST_ID_HEADER] = request_id
            shape = Shape(chat, body["model"], request_id)
            if body["stream"]:
                return StreamingResponse(self._stream(stream, shape, outcome), media_type="text/event-stream",
                                         headers=headers)
            parts, finish, completion_tokens = [], "stop", 0
            async for event in stream:
                if event["type"] == "delta":
                    outcome.tokens(int(event["tokens"]))
                    parts.append(event["text"])
                elif event["type"] == "done":
                    finish, completion_tokens = event["finish_reason"], int(event["completion_tokens"])
            outcome.finish(200)
            return JSONResponse(shape.whole("".join(parts), finish, prompt_tokens, completion_tokens), headers=headers)
        except RequestError as exc:
            if outcome is not None:
                outcome.finish(exc.status)
            return json_error(exc.status, exc.message, exc.field, request_id, headers)
        except Exception:
            # Never a stack trace to the client: the log keeps it, under the id the client is given.
            logger.exception("request %s failed", request_id)
            if outcome is not None:
                outcome.finish(500)
            return json_error(500, f"internal error; quote request id {request_id} to the operator", None, request_id,
                              headers)

    async def _stream(self, stream: Any, shape: Shape, outcome: Outcome) -> AsyncIterator[str]:
        status = 500
        try:
            yield sse(shape.chunk(None, None, first=True))
            async for event in stream:
                if event["type"] == "delta":
                    outcome.tokens(int(event["tokens"]))
                    yield sse(shape.chunk(event["text"], None))
                elif event["type"] == "done":
                    yield sse(shape.chunk("", event["finish_reason"]))
            status = 200
        except (GeneratorExit, asyncio.CancelledError):
            status = 499  # the client went away (nginx's code): neither a success nor the server's fault
            raise
        except Exception:
            # The status line is already sent: report the failure in the stream, as OpenAI's API does.
            logger.exception("stream %s failed", shape.request_id)
            yield sse(error_body(500, f"internal error; quote request id {shape.request_id} to the operator", None))
        finally:
            # Also reached when the client disconnects (the generator is closed): count it then too.
            outcome.finish(status)
        yield "data: [DONE]\n\n"
