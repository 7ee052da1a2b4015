"""`kubeforge.serve.relay`: a response relayed byte for byte, with the engine's token counts, coalesced."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from kubeforge.serve.relay import ForwardedRequest, call_asgi, count_tokens, stream_interval

pytestmark = pytest.mark.unit


@dataclass
class Choice:
    index: int
    token_ids: list[int]


@dataclass
class Output:
    outputs: list[Choice]
    prompt_token_ids: list[int] = field(default_factory=lambda: [1, 2, 3])


class Kind:
    def __init__(self, name: str) -> None:
        self.name = name


class Params:
    def __init__(self, kind: str) -> None:
        self.output_kind = Kind(kind)


def engine(steps: list[list[Choice]], gap_s: float = 0.0) -> Any:
    """An engine `generate` yielding one Output per step, `gap_s` apart; records whether it was closed."""
    state = {"closed": False}

    async def generate(prompt: Any, sampling_params: Any, request_id: str) -> Any:
        try:
            for choices in steps:
                await asyncio.sleep(gap_s)
                yield Output(choices)
        finally:
            state["closed"] = True

    generate.state = state  # type: ignore[attr-defined]
    return generate


def app(generate: Any, stream: bool) -> Starlette:
    """An ASGI app that runs `generate` and answers like vLLM's server: SSE per output, or one JSON body."""

    async def completions(request: Request) -> Any:
        body = await request.json()
        kind = "DELTA" if stream else "FINAL_ONLY"
        outputs = generate(body["prompt"], Params(kind), "r")
        if stream:
            async def events() -> Any:
                async for output in outputs:
                    yield f"data: {len(output.outputs[0].token_ids)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        final = [output async for output in outputs][-1]
        return JSONResponse({"tokens": len(final.outputs[0].token_ids)}, status_code=201)

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


def relay(asgi: Any, interval: float = 0.05) -> list[dict[str, Any]]:
    request = ForwardedRequest("POST", "/v1/completions", [("Content-Type", "application/json")], b'{"prompt": "x"}')

    async def collect() -> list[dict[str, Any]]:
        return [event async for event in call_asgi(asgi, request, interval)]

    return asyncio.run(collect())


def test_a_whole_response_comes_after_its_first_token_with_the_engine_counts() -> None:
    steps = [[Choice(0, [7] * n)] for n in (1, 2, 3, 4)]  # FINAL_ONLY-style cumulative outputs
    events = relay(app(count_tokens(engine(steps, 0.01)), stream=False))
    assert events[0] == {"body": b"", "tokens": 1, "prompt_tokens": 3}  # the first token, at once
    # The status and the whole body then come in one event.
    assert len(events) == 2 and events[1]["status"] == 201
    assert ["content-length", "2"] not in events[1]["headers"]  # hop-by-hop headers are the router's
    assert events[1]["body"] == b'{"tokens":4}'
    assert sum(e.get("tokens", 0) for e in events) == 4  # cumulative outputs counted once each
    assert sum(e.get("prompt_tokens", 0) for e in events) == 3


def test_a_stream_is_relayed_byte_for_byte_and_coalesced_after_the_first_token() -> None:
    steps = [[Choice(0, [7])] for _ in range(20)]
    events = relay(app(count_tokens(engine(steps, 0.01)), stream=True), interval=0.08)
    # The status goes with the first token, at once, and nothing else does.
    assert events[0]["status"] == 200 and events[0]["tokens"] == 1 and events[0]["body"] == b"data: 1\n\n"
    assert all("status" not in e for e in events[1:])
    bodies = [e for e in events if "body" in e]
    assert b"".join(e["body"] for e in bodies) == b"data: 1\n\n" * 20 + b"data: [DONE]\n\n"
    assert sum(e["tokens"] for e in bodies) == 20
    # 20 tokens 10 ms apart, sent at most every 80 ms: far fewer messages than tokens.
    assert len(bodies) <= 8, [e["tokens"] for e in bodies]


def test_delta_outputs_of_several_choices_are_summed() -> None:
    generate = count_tokens(engine([[Choice(0, [1]), Choice(1, [2])], [Choice(0, [3])], [Choice(1, [4, 5])]]))

    async def run() -> Any:
        from kubeforge.serve.relay import _PROGRESS, Progress

        progress = Progress()
        token = _PROGRESS.set(progress)
        try:
            [o async for o in generate("x", Params("DELTA"), "r")]
        finally:
            _PROGRESS.reset(token)
        return progress.take()

    assert asyncio.run(run()) == (5, 3)


def test_closing_the_relay_closes_the_engine_generation() -> None:
    generate = engine([[Choice(0, [7])] for _ in range(1000)], 0.01)

    async def first_two() -> None:
        request = ForwardedRequest("POST", "/v1/completions", [], b'{"prompt": "x"}')
        events = call_asgi(app(count_tokens(generate), stream=True), request, 0.0)
        await events.__anext__()
        await events.__anext__()
        await events.aclose()  # the client went away
        await asyncio.sleep(0.1)
        assert generate.state["closed"]  # before the loop ends (which would close it anyway)

    asyncio.run(first_two())


def test_the_more_streams_a_replica_relays_the_longer_each_is_coalesced() -> None:
    from kubeforge.serve import relay as relay_module

    assert [stream_interval(0.05, n) for n in (0, 1, 16, 32, 64)] == [0.05, 0.05, 0.05, 0.1, 0.2]
    seen: list[int] = []

    def watched(stream: bool) -> Starlette:
        async def completions(request: Request) -> Any:
            async def events() -> Any:
                for _ in range(3):
                    await asyncio.sleep(0.01)
                    seen.append(relay_module._open_streams)
                    yield "data: 1\n\n"
            if stream:
                return StreamingResponse(events(), media_type="text/event-stream")
            seen.append(relay_module._open_streams)
            return JSONResponse({})

        return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])

    request = ForwardedRequest("POST", "/v1/completions", [], b"{}")

    async def run(stream: bool, count: int) -> None:
        async def one() -> None:
            async for _ in call_asgi(watched(stream), request, 0.01):
                pass

        await asyncio.gather(*(one() for _ in range(count)))

    asyncio.run(run(True, 3))
    assert max(seen) == 3 and relay_module._open_streams == 0  # counted while open, released after
    seen.clear()
    asyncio.run(run(False, 3))
    assert seen == [0, 0, 0]  # whole answers are not streams


def test_a_stream_is_held_longer_while_many_others_are_open(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubeforge.serve import relay as relay_module

    # With 159 others open, this stream's 40 ms interval becomes 0.4 s: its 20 tokens, 10 ms apart, go
    # as the first token, then at most a few events (at 40 ms they took five or more).
    monkeypatch.setattr(relay_module, "_open_streams", 159)
    steps = [[Choice(0, [7])] for _ in range(20)]
    bodies = [e for e in relay(app(count_tokens(engine(steps, 0.01)), stream=True), interval=0.04) if "body" in e]
    assert sum(e["tokens"] for e in bodies) == 20 and bodies[0]["tokens"] == 1
    assert len(bodies) <= 4, [e["tokens"] for e in bodies]
    assert relay_module._open_streams == 159


def test_a_streams_end_is_not_held_for_the_rest_of_the_interval() -> None:
    # A closed-loop client sends its next request only when this one's last bytes arrive: once the app has
    # written them, they go at once, even in the middle of a (here 30 s) interval.
    steps = [[Choice(0, [7])] for _ in range(3)]

    async def run() -> tuple[list[dict[str, Any]], float]:
        request = ForwardedRequest("POST", "/v1/completions", [], b'{"prompt": "x"}')
        loop = asyncio.get_running_loop()
        started = loop.time()
        events = [event async for event in call_asgi(app(count_tokens(engine(steps, 0.01)), stream=True), request,
                                                      30.0)]
        return events, loop.time() - started

    events, took = asyncio.run(run())
    bodies = [e for e in events if "body" in e]
    assert [e["tokens"] for e in bodies] == [1, 2]  # the first token at once, the rest with the end
    assert bodies[-1]["body"].endswith(b"data: [DONE]\n\n")
    assert took < 30.0
