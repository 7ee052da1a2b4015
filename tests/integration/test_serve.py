"""The serving application on a real Ray Serve and vLLM: two variants of the tiny model behind the router.

One application per module (vLLM takes tens of seconds to start on two cores): `stable` and `candidate`
load the same model folder, labelled versions 1 and 2, so the variant that answered is read from the
`x-kubeforge-variant` header.
"""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import openai
import pytest

from kubeforge.serve.app import VariantModel, build_app
from kubeforge.serve.router import VARIANT_HEADER
from kubeforge.spec.deployment import DeploymentSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

APP = "kubeforge-serve-test"
MODEL = "tinylm"
MAX_MODEL_LEN = 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(ray_local, tiny_lm):
    from ray import serve

    folder = tiny_lm.pretrain.directory / "model"
    spec = DeploymentSpec.model_validate({
        "model": f"models:/{MODEL}/1",
        "engine": {"max_model_len": MAX_MODEL_LEN, "dtype": "float32"},
        # Both engines and the router fit in the session's 2-CPU Ray runtime next to nothing else.
        "resources": {"cpus_per_replica": 0.25},
    })
    variants = [VariantModel("stable", MODEL, "1", folder), VariantModel("candidate", MODEL, "2", folder)]
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    handle = serve.run(build_app(variants, spec, weight=0), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}", handle
    serve.delete(APP)
    serve.shutdown()


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


def _set_weight(handle, weight: int) -> None:
    handle.set_weight.remote(weight).result()


def _variants(url: str, n: int) -> list[str]:
    with httpx.Client(base_url=url, timeout=60) as http:
        body = {"model": MODEL, "prompt": "def", "max_tokens": 1}
        responses = [http.post("/v1/completions", json=body) for _ in range(n)]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    return [r.headers[VARIANT_HEADER] for r in responses]


def test_completion_chat_and_models(client):
    completion = client.completions.create(model=MODEL, prompt="def main(", max_tokens=4, temperature=0)
    assert completion.choices[0].finish_reason in ("length", "stop")
    assert completion.usage is not None and completion.usage.completion_tokens >= 1
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "import os"}],
                                          max_tokens=3)
    assert chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str)
    assert {m.id for m in client.models.list()} == {MODEL, f"{MODEL}:stable", f"{MODEL}:candidate"}


def test_streaming_sends_chunks_then_done(client, served):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "class"}], max_tokens=5, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "class"}],
                                           max_tokens=5, temperature=0)
    assert text == whole.choices[0].message.content  # greedy: same text streamed or not
    with httpx.Client(base_url=served[0], timeout=60) as http:
        raw = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2, "stream": True})
    lines = [line for line in raw.text.splitlines() if line]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


@pytest.mark.parametrize(("body", "field"), [
    ({"model": MODEL}, "prompt"),
    ({"model": MODEL, "prompt": 3}, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": MAX_MODEL_LEN + 1}, "max_tokens"),
    ({"model": MODEL, "prompt": "def " * 400, "max_tokens": 1}, "prompt"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),
])
def test_a_bad_request_is_a_400_naming_the_field(served, body, field):
    with httpx.Client(base_url=served[0], timeout=60) as http:
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == field and error["message"].startswith(field)
        chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": "hi"})
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
        broken = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert broken.status_code == 400 and broken.json()["error"]["param"] == "body"
        assert "Traceback" not in response.text + broken.text


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.completions.create(model="nope", prompt="x", max_tokens=1)


def test_weights_split_traffic(served):
    url, handle = served
    _set_weight(handle, 0)
    assert set(_variants(url, 8)) == {"stable"}
    _set_weight(handle, 100)
    assert set(_variants(url, 8)) == {"candidate"}
    _set_weight(handle, 50)
    n = 40
    hits = _variants(url, n).count("candidate")
    # Binomial(40, 0.5): mean 20, sd 3.2; 8..32 is beyond 3.7 sd (fails about once in 5000 runs).
    assert 8 <= hits <= 32, hits
    _set_weight(handle, 0)


def test_weight_changes_live_without_failures(served):
    url, handle = served

    async def traffic() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            body = {"model": MODEL, "prompt": "for i in", "max_tokens": 2}

            async def one() -> httpx.Response:
                return await http.post("/v1/completions", json=body)

            first = [asyncio.create_task(one()) for _ in range(12)]
            await asyncio.sleep(0.2)
            await asyncio.to_thread(_set_weight, handle, 100)
            second = [asyncio.create_task(one()) for _ in range(12)]
            return list(await asyncio.gather(*first, *second))

    responses = asyncio.run(traffic())
    assert [r.status_code for r in responses] == [200] * len(responses)
    assert {r.headers[VARIANT_HEADER] for r in responses[12:]} == {"candidate"}
    _set_weight(handle, 0)


def test_metrics_carry_variant_labels(served):
    url, _ = served
    _variants(url, 2)
    with httpx.Client(base_url=url, timeout=60) as http:
        text = http.get("/metrics").text
        health = http.get("/healthz").json()
    assert health["status"] == "ok"
    assert f'kubeforge_serve_requests_total{{model="{MODEL}",status="200",variant="stable",version="1"}}' in text
    assert 'variant="candidate",version="2"' in text
    for name in ("kubeforge_serve_time_to_first_token_seconds_bucket", "kubeforge_serve_request_seconds_bucket",
                 "kubeforge_serve_inter_token_seconds_bucket", "kubeforge_serve_prompt_tokens_total",
                 "kubeforge_serve_generated_tokens_total", "kubeforge_serve_requests_in_flight"):
        assert name in text, name
    assert json.dumps(health["variants"]["candidate"]) == json.dumps({"model": MODEL, "version": "2"})
