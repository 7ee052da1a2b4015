"""`Router`: the OpenAI-compatible ingress in front of the variants (see `kubeforge.serve.app`).

Exactly one replica: the metrics and the candidate weight live in its process.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError

from kubeforge.rollout.queries import CANDIDATE, STABLE
from kubeforge.serve.auth import read_token
from kubeforge.serve.capture import TrafficLog, answer_text, prompt_text
from kubeforge.serve.faults import Faults
from kubeforge.serve.protocol import Metrics, Outcome, RequestError, check_weight, error_body, pick_variant
from kubeforge.serve.relay import ForwardedRequest
from kubeforge.spec.deployment import AuthSpec, CaptureSpec

logger = logging.getLogger("kubeforge.serve")

VARIANT_HEADER = "x-kubeforge-variant"
VERSION_HEADER = "x-kubeforge-version"
REQUEST_ID_HEADER = "x-request-id"

api = FastAPI(title="KubeForge", docs_url=None, redoc_url=None, openapi_url=None)

RETRY_WINDOW_S = 120.0
"""How long a request waits for a working replica of its variant: Serve replaces one whose engine died
in about 40 s on a small CPU (benchmarks.md)."""
RETRY_DELAY_S = 0.5
READY_TIMEOUT_S = 5.0
"""How long /healthz waits for a variant: a replica still loading its engine is not ready."""
RELAYED = ("/v1/completions", "/v1/chat/completions", "/v1/models")
"""The paths of vLLM's OpenAI server that the router relays (and that /openapi.json describes)."""


class EngineUnavailable(Exception):
    """A replica's engine is dead; Serve is replacing the replica."""


def by_value(handle: Any) -> Any:
    """`handle` calling its replicas over Serve's gRPC transport: each call and each streamed event goes
    to the replica's own gRPC server instead of through Ray's actor calls and object store, which cost
    the router up to twice the CPU per request, and the variant replica more too (docs/benchmarks.md).
    Serve's throughput mode makes this the default only for handles created in a process that has the
    mode's variable when it imports Serve; a handle handed to the router as an argument keeps the option
    of the process that built the application (`kubeforge serve`'s, or the controller's on a cluster),
    so it is set here."""
    return handle.options(_by_reference=False)


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
                 sticky_header: str | None, auth: dict[str, Any] | None, lora: bool = False,
                 capture: dict[str, Any] | None = None, monitor: Any = None) -> None:
        # Under LoRA one deployment (`stable`) serves every variant in `labels`, each as its own adapter; on a
        # cluster the variants come with the user_config (`reconfigure`).
        stable, candidate = by_value(stable), candidate if candidate is None else by_value(candidate)
        self.lora, self.base = lora, stable
        self.handles = ({variant: stable for variant in labels} if lora else
                        {STABLE: stable} if candidate is None else {STABLE: stable, CANDIDATE: candidate})
        self.labels = labels
        self.weight = check_weight(weight)
        self.sticky_header = sticky_header.lower() if sticky_header else None
        # Read once at start: a replica that cannot find its token must fail to start, not answer 401.
        self.token = read_token(AuthSpec(**auth)) if auth is not None else None
        self.metrics = Metrics()
        self.faults = {variant: Faults() for variant in self.handles}
        # `capture`: {"spec": CaptureSpec fields, "directory": where the files go} (`app.build_app`).
        self.capture: TrafficLog | None = None
        if capture is not None:
            self.capture = TrafficLog(CaptureSpec(**capture["spec"]), capture["directory"], self.metrics.registry)
        self.flusher: asyncio.Task[None] | None = None
        # On a cluster the deployment's monitor runs beside the router (`monitor_server`); its metrics go out here.
        self.monitor = monitor

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

    async def attach_candidate(self, app: str, deployment: str, model: str, version: str) -> None:
        """Serve the candidate variant from `deployment` of the Serve application `app`: the retraining loop
        deploys each new version as an application of its own, so nothing of this one restarts. Its weight
        stays 0 until the rollout moves it. (Async: setting a handle's options binds it to the running event
        loop, which a sync method's thread does not have in Serve's throughput mode.)"""
        from ray import serve as ray_serve

        if self.lora:
            raise ValueError("attach_candidate: under LoRA the variants are adapters of one deployment")
        if self.weight:
            raise ValueError(f"attach_candidate: the current candidate still takes {self.weight}% of the requests")
        self.handles[CANDIDATE] = by_value(ray_serve.get_deployment_handle(deployment, app))
        self.labels[CANDIDATE] = {"model": model, "version": version}
        self.faults[CANDIDATE] = Faults()

    def promote_candidate(self) -> None:
        """The candidate becomes the stable variant, at once and for every new request (weight 0, no candidate):
        what a promoted rollout leaves, made ready for the next one."""
        if CANDIDATE not in self.handles:
            raise ValueError("promote_candidate: no candidate variant is served")
        self.handles[STABLE], self.labels[STABLE] = self.handles.pop(CANDIDATE), self.labels.pop(CANDIDATE)
        self.faults[STABLE] = self.faults.pop(CANDIDATE)
        self.weight = 0

    def detach_candidate(self) -> None:
        """Stop serving the candidate variant (a rolled-back rollout leaves it at weight 0)."""
        if self.weight:
            raise ValueError(f"detach_candidate: the candidate still takes {self.weight}% of the requests")
        self.handles.pop(CANDIDATE, None)
        self.labels.pop(CANDIDATE, None)
        self.faults.pop(CANDIDATE, None)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Ray Serve's in-place update: a RayService's `user_config` on this deployment reaches the running
        replica here, without a restart. `weight` is how the operator moves a canary; under LoRA the
        variants themselves (`variants: {variant: {model, version}}`) and the A/B test's `sticky_header`
        come this way too, so a new adapter version is served without restarting anything."""
        known = {"weight", "variants", "sticky_header"} if self.lora else {"weight"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"user_config: unknown keys {unknown}; only {sorted(known)} are read")
        if "variants" in config:
            labels = {str(v): {"model": str(label["model"]), "version": str(label["version"])}
                      for v, label in config["variants"].items()}
            if STABLE not in labels:
                raise ValueError(f"user_config.variants: no '{STABLE}' variant (got {sorted(labels)})")
            self.labels, self.handles = labels, {variant: self.base for variant in labels}
            self.faults = {variant: self.faults.get(variant, Faults()) for variant in labels}
        if "sticky_header" in config:
            self.sticky_header = str(config["sticky_header"]).lower() if config["sticky_header"] else None
        if "weight" in config:
            self.set_weight(config["weight"])

    async def flush_capture(self) -> str | None:
        """Write the captured rows waiting now (the router also does when a file is full or old, and when it
        stops); the file's path, or None."""
        return await asyncio.to_thread(self.capture.flush) if self.capture is not None else None

    def __del__(self) -> None:
        # Serve deletes the replica on shutdown: what the sample holds still goes out.
        capture = getattr(self, "capture", None)
        if capture is not None:
            capture.flush()

    async def _flush_when_due(self) -> None:
        assert self.capture is not None
        period = min(self.capture.spec.max_file_age_s / 4, 5.0)
        while True:
            await asyncio.sleep(period)
            if self.capture.due():
                await asyncio.to_thread(self.capture.flush)

    def _capture(self, request_id: str, path: str, document: Any, variant: str, label: dict[str, str], status: int,
                 started: float, answer: bytes, streamed: bool) -> None:
        """Add a drawn request's row; a full file is written off the event loop."""
        assert self.capture is not None
        prompt = prompt_text(path, document)
        if prompt is None:
            return
        full = self.capture.record({
            "time": time.time(), "request_id": request_id, "endpoint": path, "model": label["model"],
            "variant": variant, "version": label["version"], "status": status,
            "latency_s": time.monotonic() - started, "prompt": prompt, "completion": answer_text(answer, streamed),
        })
        if self.flusher is None:
            self.flusher = asyncio.get_running_loop().create_task(self._flush_when_due())
        if full:
            asyncio.get_running_loop().run_in_executor(None, self.capture.flush)

    def set_faults(self, variant: str, fail_rate: float = 0.0, delay_s: float = 0.0) -> None:
        """TEST-ONLY (see kubeforge.serve.faults): make `variant` fail or slow down from now on."""
        if variant not in self.handles:
            raise ValueError(f"variant: {variant!r} is not served (served: {', '.join(self.handles)})")
        self.faults[variant] = Faults(fail_rate, delay_s)
        logger.warning("TEST-ONLY fault injection on %s: fail_rate=%s delay_s=%s", variant, fail_rate, delay_s)

    # -- HTTP --

    @api.get("/healthz")
    async def healthz(self) -> Response:
        """Ready when every served variant answers with a live engine; 503 naming the others until then."""

        async def ready(variant: str) -> str | None:
            try:
                info = await asyncio.wait_for(self.handles[variant].ready.remote(), READY_TIMEOUT_S)
            except Exception as exc:  # not started yet, engine dead, replica gone: not ready, whatever the cause
                return f"{variant}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no answer'}"
            missing = [v for v in self.handles if self.lora and self._adapter(v) not in info["adapters"]]
            return f"adapters of {', '.join(missing)} not loaded" if missing else None

        # Under LoRA one deployment answers for every variant: ask it once.
        asked = [STABLE] if self.lora else list(self.handles)
        problems = [p for p in await asyncio.gather(*(ready(v) for v in asked)) if p is not None]
        body: dict[str, Any] = {"status": "ok" if not problems else "unavailable", "weight": self.weight,
                                "variants": self.labels}
        if problems:
            body["not_ready"] = problems
        return JSONResponse(body, status_code=200 if not problems else 503)

    @api.get("/metrics")
    async def metrics_text(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        text = generate_latest(self.metrics.registry)
        if self.monitor is not None:
            try:
                text += await asyncio.wait_for(self.monitor.exposition.remote(), READY_TIMEOUT_S)
            except Exception as exc:  # a monitor replica restarting must not cost the router's own metrics
                logger.warning("metrics: the monitor's are left out: %s: %s", type(exc).__name__, exc)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        """vLLM's model list of every variant, merged (each lists `<name>` and `<name>:<variant>`)."""
        if (denied := self._deny(request)) is not None:
            return denied
        cards: dict[str, Any] = {}
        for variant in [STABLE] if self.lora else self.handles:
            status, _, body = await self._whole(variant, self._forwarded(request, "/v1/models", b""))
            if status != 200:
                return Response(body, status_code=status, media_type="application/json")
            for card in json.loads(body)["data"]:
                cards.setdefault(card["id"], card)
        name = self.labels[STABLE]["model"]
        if self.lora and self._adapter(STABLE) in cards:
            # The name the router splits between the adapters, which vLLM does not know.
            cards.setdefault(name, {**cards[self._adapter(STABLE)], "id": name})
        return JSONResponse({"object": "list", "data": list(cards.values())})

    @api.get("/openapi.json")
    async def openapi(self) -> Response:
        """vLLM's own OpenAPI document, cut to the paths this router serves."""
        status, _, body = await self._whole(STABLE, ForwardedRequest("GET", "/openapi.json", [], b""))
        if status != 200:
            return Response(body, status_code=status, media_type="application/json")
        document = json.loads(body)
        document["paths"] = {path: item for path, item in document.get("paths", {}).items() if path in RELAYED}
        document["info"] = {**document.get("info", {}), "title": "KubeForge (vLLM OpenAI-compatible API)"}
        return JSONResponse(document)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, "/v1/completions")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, "/v1/chat/completions")

    # -- internals --

    def _deny(self, request: Request) -> JSONResponse | None:
        if self.token is None:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return json_error(401, "authorization: missing or wrong bearer token", "authorization",
                              headers={"WWW-Authenticate": "Bearer"})
        return None

    def _adapter(self, variant: str) -> str:
        """The name a variant's LoRA adapter is served under."""
        return f"{self.labels[variant]['model']}:{variant}"

    def _choose(self, model: Any, request: Request) -> str | None:
        """The variant the request's `model` names; None when it names none (or the body is not JSON):
        the stable variant then answers with vLLM's own 400 or 404, counted under no variant."""
        if not isinstance(model, str):
            return None
        name, colon, pinned = model.partition(":")
        if colon:
            if pinned in self.handles and self.labels[pinned]["model"] == name:
                return pinned
        elif name == self.labels[STABLE]["model"]:
            sticky = request.headers.get(self.sticky_header) if self.sticky_header else None
            return pick_variant(self.weight, CANDIDATE in self.handles, sticky)
        elif CANDIDATE in self.handles and name == self.labels[CANDIDATE]["model"]:
            return CANDIDATE
        return None

    @staticmethod
    def _forwarded(request: Request, path: str, body: bytes) -> ForwardedRequest:
        """`request` for the variant's app at `path` (the application may be served under a route prefix)."""
        # The bearer token stays here: a replica has no use for it, and it must not reach vLLM's logs. The
        # length is the forwarded body's (under LoRA the router may have named the adapter in it).
        headers = [(k, v) for k, v in request.headers.items()
                   if k.lower() not in ("authorization", "host", "content-length")]
        if body:
            headers.append(("content-length", str(len(body))))
        return ForwardedRequest(request.method, path, headers, body, request.url.query)

    async def _whole(self, variant: str, forwarded: ForwardedRequest) -> tuple[int, list[list[str]], bytes]:
        """A variant's whole answer to `forwarded`: status, headers and body; a 503 when none can answer."""
        try:
            events, status, headers, early = await self._start(variant, forwarded)
        except (RayActorError, EngineUnavailable) as exc:
            reason = exc if isinstance(exc, EngineUnavailable) else "its replica stopped"
            return 503, [], json.dumps(error_body(503, f"variant {variant}: {reason}; retry", None)).encode()
        return status, headers, b"".join([event.get("body", b"") for event in early]
                                         + [event["body"] async for event in events])

    async def _serve(self, request: Request, path: str) -> Response:
        started = time.monotonic()
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        if (denied := self._deny(request)) is not None:
            return denied
        body = await request.body()
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):  # not JSON (or not UTF-8, or nested too deep): vLLM's own 400 follows
            document = None
        variant = self._choose(document.get("model") if isinstance(document, dict) else None, request)
        if self.lora and variant is not None and document["model"] != self._adapter(variant):
            # vLLM picks the adapter by the body's model: name the chosen variant's (its answer then does too).
            body = json.dumps({**document, "model": self._adapter(variant)}).encode()
        outcome = None
        headers = {REQUEST_ID_HEADER: request_id}
        # The variant's labels as the request found them: the loop may promote or detach its variant before the
        # answer is complete, and the request is counted and captured as what answered it.
        label = self.labels[variant] if variant is not None else None
        if variant is not None and label is not None:
            outcome = Outcome(self.metrics, {**label, "variant": variant})
            headers |= {VARIANT_HEADER: variant, VERSION_HEADER: label["version"]}
        try:
            faults = self.faults[variant] if variant is not None else None
            if faults is not None and faults.injects():
                if random.random() < faults.fail_rate:
                    raise RequestError(503, "injected fault (test-only fault injection)")
                await asyncio.sleep(faults.delay_s)
            events, status, relayed, early = await self._start(variant or STABLE, self._forwarded(request, path, body))
            for event in early:
                self._count(outcome, event)
            response_headers = {**{k: v for k, v in relayed}, **headers}
            media_type = response_headers.pop("content-type", None)
            # Drawn for the capture now, written once the answer is complete (only what reached a variant).
            captured = None
            if self.capture is not None and variant is not None and label is not None and self.capture.sampled():
                captured = functools.partial(self._capture, request_id, path, document, variant, label,
                                             started=started)
            head = b"".join(event.get("body", b"") for event in early)
            if media_type is not None and media_type.startswith("text/event-stream"):
                return StreamingResponse(self._relay(head, events, outcome, status, request_id, captured),
                                         status_code=status, media_type=media_type, headers=response_headers)
            parts = [head]
            async for event in events:
                self._count(outcome, event)
                parts.append(event["body"])
            if outcome is not None:
                outcome.finish(status)
            if captured is not None:
                captured(status=status, answer=b"".join(parts), streamed=False)
            return Response(b"".join(parts), status_code=status, media_type=media_type, headers=response_headers)
        except RequestError as exc:
            if outcome is not None:
                outcome.finish(exc.status)
            return json_error(exc.status, exc.message, exc.field, request_id, headers)
        except (RayActorError, EngineUnavailable) as exc:
            # No replica could take the request within RETRY_WINDOW_S (its engine died, or its node went away).
            if outcome is not None:
                outcome.finish(503)
            reason = exc if isinstance(exc, EngineUnavailable) else "its replica stopped"
            return json_error(503, f"variant {variant or STABLE}: {reason}; retry", None, request_id, headers)
        except Exception:
            # Never a stack trace to the client: the log keeps it, under the id the client is given.
            logger.exception("request %s failed", request_id)
            if outcome is not None:
                outcome.finish(500)
            return json_error(500, f"internal error; quote request id {request_id} to the operator", None, request_id,
                              headers)

    async def _start(self, variant: str, forwarded: ForwardedRequest) -> tuple[Any, int, list[list[str]],
                                                                                list[dict[str, Any]]]:
        """Hand `forwarded` to the variant until a replica answers with a status: the events still to
        come, the status, its headers, and the events so far, the status's own included (it may carry the
        first bytes; tokens may come before it: a response that is not streamed starts when it is complete).

        A replica whose engine died, or that died itself, before the status came has sent the client
        nothing, so the request goes again (Serve routes it to another replica, or waits for the one
        replacing it) for up to RETRY_WINDOW_S: only requests already answering are lost."""
        deadline = time.monotonic() + RETRY_WINDOW_S
        # Taken once: a retry must reach the same version even if the loop promoted or detached it meanwhile.
        handle = self.handles[variant]
        while True:
            events = handle.options(stream=True).forward.remote(forwarded)
            early: list[dict[str, Any]] = []
            try:
                async for event in events:
                    if "unavailable" in event:
                        raise EngineUnavailable(event["unavailable"])
                    early.append(event)
                    if "status" in event:
                        return events, int(event["status"]), event["headers"], early
            except (RayActorError, EngineUnavailable):
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            raise RequestError(502, f"variant {variant} ended the response before its status")

    @staticmethod
    def _count(outcome: Outcome | None, event: dict[str, Any]) -> None:
        if outcome is not None:
            outcome.prompt(int(event.get("prompt_tokens", 0)))
            outcome.tokens(int(event.get("tokens", 0)))

    @classmethod
    async def _bodies(cls, head: bytes, events: Any, outcome: Outcome | None) -> AsyncIterator[bytes]:
        """`head`, then the bytes of each of `events`, counting the tokens they report."""
        if head:
            yield head
        async for event in events:
            cls._count(outcome, event)
            if event["body"]:
                yield event["body"]

    async def _relay(self, head: bytes, events: Any, outcome: Outcome | None, status: int, request_id: str,
                     captured: Callable[..., None] | None = None) -> AsyncIterator[bytes]:
        """A streamed response from its first bytes (`head`, counted already) on, byte for byte as the
        variant wrote it."""
        sent: list[bytes] = []
        done = False
        try:
            async for body in self._bodies(head, events, outcome):
                if captured is not None:
                    sent.append(body)
                # Once the terminator is handed over the answer is whole, even when the client, having read
                # it, hangs up before this generator is resumed (which closes it at this yield).
                done = done or body.rstrip().endswith(b"data: [DONE]")
                yield body
        except (GeneratorExit, asyncio.CancelledError):
            if not done:
                status = 499  # the client went away (nginx's code): neither a success nor the server's fault
            raise
        except Exception:
            # The status line is already sent: report the failure in the stream, as vLLM's server does.
            logger.exception("stream %s failed", request_id)
            status = 500
            error = error_body(500, f"internal error; quote request id {request_id} to the operator", None)
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
        finally:
            # Also reached when the client disconnects (the generator is closed): count it then too.
            if outcome is not None:
                outcome.finish(status)
            if captured is not None:
                captured(status=status, answer=b"".join(sent), streamed=True)
