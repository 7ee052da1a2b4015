"""The serving application on a real Ray Serve and vLLM: two variants of the tiny model behind the router.

One application per module (vLLM takes tens of seconds to start on two cores): `stable` and `candidate`
load the same model folder, labelled versions 1 and 2, so the variant that answered is read from the
`x-kubeforge-variant` header. The application requires a bearer token and keeps A/B clients sticky on
the `x-user` header. The rollout tests at the end run the rollout controller against Debian's Prometheus
scraping this application, with a registry holding versions 1 and 2 of the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import openai
import psutil
import pytest

from kubeforge.registry.audit import CHAMPION
from kubeforge.registry.client import Registry
from kubeforge.rollout.controller import (
    TAG_RESULT,
    RolloutController,
    RolloutStore,
    Subject,
    measure_ab,
)
from kubeforge.serve.app import VariantModel, build_app
from kubeforge.serve.engine import vllm_args
from kubeforge.serve.local import ServeRouter
from kubeforge.serve.router import VARIANT_HEADER
from kubeforge.spec.deployment import ABRollout, DeploymentSpec
from tests.dashboards import MONITOR_ROW, OPERATOR_ROW, dashboard_files, panel_queries, wait_for_panel_data
from tests.helpers import free_port, running_prometheus, two_version_registry, wait_for
from tests.rollout_helpers import Traffic, canary, drive, wait_until_the_candidate_is_idle

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

APP = "kubeforge-serve-test"
MODEL = "tinylm"
MAX_MODEL_LEN = 256
TOKEN = "test-token-8d1f"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served(ray_local, tiny_lm, tmp_path_factory):
    from ray import serve

    folder = tiny_lm.pretrain.directory / "model"
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN + "\n")
    spec = DeploymentSpec.model_validate({
        "model": f"models:/{MODEL}/1",
        "engine": {"max_model_len": MAX_MODEL_LEN, "dtype": "float32"},
        # Both engines and the router fit in the session's 2-CPU Ray runtime next to nothing else.
        "resources": {"cpus_per_replica": 0.25},
        "auth": {"token_file": str(token_file)},
        "rollout": {"strategy": "ab", "candidate": f"models:/{MODEL}/2", "sticky_header": "x-user",
                    "prometheus": "http://127.0.0.1:9"},
        # Every answered request is captured (files by test_captured_traffic...).
        "capture": {"sample_rate": 1.0, "max_rows_per_file": 1000},
    })
    variants = [VariantModel("stable", MODEL, "1", folder), VariantModel("candidate", MODEL, "2", folder)]
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    capture_dir = str(tmp_path_factory.mktemp("traffic"))
    handle = serve.run(build_app(variants, spec, weight=0, capture_dir=capture_dir), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}", handle
    serve.delete(APP)
    serve.shutdown()


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=TOKEN, max_retries=0)


def _set_weight(handle, weight: int) -> None:
    handle.set_weight.remote(weight).result()


def _http(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60, headers=AUTH)


def _variants(url: str, n: int) -> list[str]:
    with _http(url) as http:
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
    with _http(served[0]) as http:
        raw = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2, "stream": True})
    lines = [line for line in raw.text.splitlines() if line]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_the_harness_scores_the_served_model_as_it_scores_the_loaded_one(served, tiny_lm, monkeypatch, tmp_path):
    """`kubeforge harness` through the router (vLLM's completions with echo and logprobs) agrees with the
    evaluate stage's harness run on the same model loaded in this process."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubeforge.cli import main
    from kubeforge.evaluate.harness import loaded_model, prepare, run_tasks
    from kubeforge.spec.evaluate import HarnessSpec

    folder = tiny_lm.pretrain.directory / "model"
    monkeypatch.setenv("SERVE_TOKEN", TOKEN)
    args = ["harness", served[0], "--model", MODEL, "--tokenizer", str(folder), "--task", "stdlib_funcname",
            "--limit", "12", "--api-key-env", "SERVE_TOKEN", "-o", "json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    text = result.stdout
    remote, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
    prepared = prepare(HarnessSpec(tasks=["stdlib_funcname"], limit=12), tmp_path, tmp_path, [])
    model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype="float32")
    local = run_tasks(loaded_model(model, AutoTokenizer.from_pretrained(str(folder)), 4), prepared, log=print)
    print(f"served {remote} loaded {local}")
    assert set(remote) == set(local) and "harness_stdlib_funcname_acc" in remote
    assert remote["harness_stdlib_funcname_acc"] == pytest.approx(local["harness_stdlib_funcname_acc"])
    # Refused before any question: a model the server does not serve.
    refused = CliRunner().invoke(main, [*args[:3], "nope", *args[4:]])
    assert refused.exit_code != 0 and f"--model: {served[0]} serves no model 'nope'" in refused.output


def test_captured_traffic_is_redacted_and_holds_whole_and_streamed_answers(client, served):
    import pyarrow.parquet as pq

    url, handle = served
    handle.flush_capture.remote().result()  # what earlier tests sent
    whole = client.completions.create(model=MODEL, prompt="# mail ada@example.com\ndef", max_tokens=4, temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "call +44 20 7946 0958"}], max_tokens=4, temperature=0,
        stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    path = handle.flush_capture.remote().result()
    assert path is not None
    rows = pq.read_table(path).to_pylist()
    by_endpoint = {row["endpoint"]: row for row in rows}
    assert set(by_endpoint) == {"/v1/completions", "/v1/chat/completions"}
    completion, chat = by_endpoint["/v1/completions"], by_endpoint["/v1/chat/completions"]
    assert completion["prompt"] == "# mail <EMAIL>\ndef" and completion["completion"] == whole.choices[0].text
    assert chat["prompt"] == "user: call <PHONE>" and chat["completion"] == streamed
    assert {completion["status"], chat["status"]} == {200} and completion["model"] == MODEL
    assert completion["variant"] == "stable" and completion["latency_s"] > 0
    with _http(url) as http:
        metrics = http.get("/metrics").text
    assert 'kubeforge_traffic_captured_rows_total{variant="stable"}' in metrics
    assert 'kubeforge_traffic_redactions_total{kind="phone_numbers"} 1.0' in metrics


def test_the_monitor_sees_a_shift_in_the_captured_traffic_under_the_served_model(client, served, tiny_lm,
                                                                                  tmp_path):
    """Prompts like the model's training code, then prose it never saw, through the router: the monitor over
    what the router captured finds the second window less familiar to the model, and longer."""
    import shutil

    from kubeforge.monitor.check import Monitor
    from kubeforge.spec.monitor import MonitorSpec

    _, handle = served
    handle.flush_capture.remote().result()  # earlier tests' requests stay out of the monitored folder
    rng = random.Random(0)
    code = ["def main(", "import os\n", "return self.", "for i in range(", "class Base(object):", "if x is None:"]
    prose = ["the weather in the valley was mild", "she walked slowly along the quiet river", "once upon a time",
             "my grandmother baked bread every morning", "birds sang loudly over green meadows"]
    files = []
    for pool, picks in ((code, 1), (prose, 4)):
        for _ in range(24):
            prompt = " ".join(rng.sample(pool, picks))
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
        files.append(handle.flush_capture.remote().result())
    folder = tmp_path / "monitored"
    folder.mkdir()
    for number, path in enumerate(files):
        shutil.copy(path, folder / f"traffic-{number}.parquet")  # two files of one second sort by their random id
    spec = MonitorSpec.model_validate({"window_requests": 24, "min_requests": 20, "thresholds": {
        "prompt_length_psi": 0.25, "token_js": 0.3, "loglik_shift": 0.05}})
    reading = Monitor(spec, MODEL, str(folder), None).check("1", tiny_lm.pretrain.directory / "model")
    assert (reading.reference_size, reading.current_size) == (24, 24)
    # The model of 60 steps on standard-library code finds prose less likely than code, per token.
    assert {s.name for s in reading.crossed} == {"prompt_length_psi", "token_js", "loglik_shift"}, reading.to_dict()


@pytest.fixture(scope="module")
def direct(served, tiny_lm, tmp_path_factory) -> Iterator[str]:
    """`vllm serve` of the same folder with the same engine arguments and KV cache (vLLM's own server)."""
    folder = tiny_lm.pretrain.directory / "model"
    port = free_port()
    args = vllm_args(str(folder), [MODEL], {"dtype": "float32", "max_model_len": MAX_MODEL_LEN})
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args,
                                    "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=out, env=env)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert process.poll() is None, log.read_text()[-3000:]
        with contextlib.suppress(httpx.HTTPError):  # not listening yet
            return httpx.get(url + "/v1/models", timeout=2).status_code == 200
        return False

    try:
        wait_for(answers, "vllm serve answering", timeout_s=300, poll_s=1)
        yield url
    finally:
        process.terminate()
        process.wait(60)


# Requests a user of the `openai` client sends, valid and not: each must get the same answer shape from the
# KubeForge endpoint as from `vllm serve` (stable variant pinned, so the same greedy model answers).
PARITY = [
    ("completions", {"prompt": "def main(", "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True}),
    ("completions", {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 3, "temperature": 0}),
    ("completions", {"prompt": ["def", "class"], "max_tokens": 3, "temperature": 0, "n": 2}),
    ("completions", {"prompt": "import", "max_tokens": 6, "temperature": 0.8, "seed": 7, "presence_penalty": 1.5,
                     "frequency_penalty": 1.0, "stop": ["\n"]}),
    ("completions", {"prompt": "x", "max_tokens": 4, "temperature": 0, "stream": True,
                     "stream_options": {"include_usage": True}}),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "import os"}]}],
                          "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2}),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
                          "response_format": {"type": "json_object"}}),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
                          "stream": True, "stream_options": {"include_usage": True}}),
    ("completions", {}),
    ("completions", {"prompt": 3}),
    ("completions", {"prompt": "x", "max_tokens": 0}),
    ("completions", {"prompt": "x", "max_tokens": MAX_MODEL_LEN + 1}),
    ("completions", {"prompt": "def " * 400, "max_tokens": 1}),
    ("completions", {"prompt": "x", "temperature": "hot"}),
    ("completions", {"prompt": "x", "n": 0}),
    ("completions", {"prompt": "x", "logprobs": 1000}),
    ("completions", {"prompt": "\ud800", "max_tokens": 1}),
    ("chat/completions", {"messages": "hi"}),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
]


def _shape(value: object) -> object:
    """The keys of every object in `value`, recursively (values differ between two servers: ids, times)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in sorted(value.items()) if k not in ("id", "created", "system_fingerprint")}
    if isinstance(value, list):
        return [_shape(v) for v in value[:3]]
    return type(value).__name__


def _answer(url: str, path: str, body: dict, model: str) -> tuple[int, object]:
    with httpx.Client(base_url=url, timeout=120, headers=AUTH) as http:
        # json.dumps escapes a lone surrogate ("\\ud800"), which httpx's own encoder refuses to send.
        response = http.post(f"/v1/{path}", content=json.dumps({"model": model, **body}).encode(),
                             headers={"content-type": "application/json"})
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [json.loads(line[6:]) for line in response.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        return response.status_code, [_shape(e) for e in events[:1] + events[-2:]]
    return response.status_code, _shape(response.json())


@pytest.mark.parametrize(("path", "body"), PARITY, ids=[f"{p}-{i}" for i, (p, _) in enumerate(PARITY)])
def test_every_request_gets_the_answer_vllm_serve_gives(served, direct, path, body):
    ours = _answer(served[0], path, body, f"{MODEL}:stable")
    theirs = _answer(direct, path, body, MODEL)
    assert ours[0] < 500, ours
    assert ours == theirs


def test_malformed_bodies_are_400s_as_in_vllm_serve(served, direct):
    for raw in (b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'{"model": "tinylm", "prompt": "\xed\xa0\x80"}'):
        statuses = []
        for url in (served[0], direct):
            with httpx.Client(base_url=url, timeout=60, headers=AUTH) as http:
                response = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
            statuses.append(response.status_code)
            assert "Traceback" not in response.text
        assert statuses[0] == statuses[1] and 400 <= statuses[0] < 500, (raw, statuses)


def test_the_openapi_document_describes_the_relayed_api(served):
    with httpx.Client(base_url=served[0], timeout=60) as http:
        document = http.get("/openapi.json").json()
    assert set(document["paths"]) == {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    schema = json.dumps(document["components"]["schemas"])
    assert "logprobs" in schema and "response_format" in schema


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
        async with httpx.AsyncClient(base_url=url, timeout=60, headers=AUTH) as http:
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
    with httpx.Client(base_url=url, timeout=60) as http:  # no token: Prometheus scrapes without one
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


def test_requests_without_the_bearer_token_are_refused(served):
    url, _ = served
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    with httpx.Client(base_url=url, timeout=60) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = http.post("/v1/completions", json=body, headers=headers)
            assert response.status_code == 401, response.text
            assert response.json()["error"]["param"] == "authorization"
            assert response.headers["www-authenticate"] == "Bearer"
        assert http.get("/v1/models").status_code == 401
        assert http.get("/healthz").status_code == 200  # probes carry no token
        assert http.post("/v1/completions", json=body, headers=AUTH).status_code == 200


def test_sticky_header_keeps_each_client_on_one_variant(served):
    url, handle = served
    _set_weight(handle, 50)
    try:
        with _http(url) as http:
            def variant(user: str) -> str:
                response = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                                     headers={"x-user": user})
                assert response.status_code == 200, response.text
                return response.headers[VARIANT_HEADER]

            users = [f"user-{i}" for i in range(16)]
            first = {user: variant(user) for user in users}
            again = {user: variant(user) for user in reversed(users)}
    finally:
        _set_weight(handle, 0)
    assert again == first
    # 16 users at 50%: all on one side has probability 2 * 0.5**16.
    assert set(first.values()) == {"stable", "candidate"}


def test_injected_faults_hit_only_their_variant(served):
    url, handle = served
    handle.set_faults.remote("candidate", fail_rate=1.0).result()
    try:
        with _http(url) as http:
            body = {"prompt": "x", "max_tokens": 1}
            failed = http.post("/v1/completions", json={**body, "model": f"{MODEL}:candidate"})
            ok = http.post("/v1/completions", json={**body, "model": f"{MODEL}:stable"})
        handle.set_faults.remote("candidate", delay_s=0.5).result()
        with _http(url) as http:
            started = time.perf_counter()
            slow = http.post("/v1/completions", json={**body, "model": f"{MODEL}:candidate"})
            slow_s = time.perf_counter() - started
    finally:
        handle.set_faults.remote("candidate").result()
    assert failed.status_code == 503 and "injected" in failed.json()["error"]["message"]
    assert failed.headers[VARIANT_HEADER] == "candidate"
    assert ok.status_code == 200
    assert slow.status_code == 200 and slow_s >= 0.5


# --- rollouts against a real Prometheus ---------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(served, tmp_path_factory) -> Iterator[str]:
    """Scrapes the application and, as `kubeforge serve` exports them, the rollout controller's metrics."""
    from kubeforge import metrics

    app_port = int(served[0].rsplit(":", 1)[1])
    controller_port = free_port()
    metrics.serve(controller_port)
    with running_prometheus(tmp_path_factory.mktemp("prometheus"), app_port, controller_port) as url:
        yield url


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    """MODEL versions 1 (champion) and 2, as the application labels them."""
    return two_version_registry(tmp_path_factory.mktemp("registry"), [MODEL])


def test_canary_of_a_healthy_candidate_is_promoted(served, prometheus, registry, tmp_path):
    url, handle = served
    policy = canary(prometheus, f"models:/{MODEL}/2", [{"weight": 30, "pause_s": 0}, {"weight": 60, "pause_s": 4}])
    subject = Subject(APP, MODEL, "1", MODEL, "2")
    controller = RolloutController(policy, subject, ServeRouter(APP), registry, RolloutStore(tmp_path))
    try:
        with Traffic(url, MODEL, AUTH) as traffic:
            record = drive(controller)
    finally:
        weight = handle.get_weight.remote().result()
        _set_weight(handle, 0)
        registry.move_alias(MODEL, CHAMPION, "1", action="rollback", reason="reset for the next test", user="test")
    assert record.phase == "promoted", record.reason
    assert weight == 100
    assert [e.weight for e in record.events] == [30, 60, 100]
    assert [a.overall for a in record.canary.history][-1] == "pass"
    error_rate = next(r for r in record.canary.history[-1].results if r.name == "error_rate")
    assert error_rate.value == 0.0  # measured by Prometheus, not "no data"
    audit = [r for r in registry.audit(MODEL) if r.action == "promote" and r.to_version == "2"]
    assert audit and audit[-1].user == "kubeforge-rollout"
    assert registry.version(MODEL, "2").tags[TAG_RESULT] == "promoted"
    assert {status for _, status in traffic.seen} == {200}


def test_canary_of_a_failing_candidate_is_rolled_back_while_stable_serves(served, prometheus, registry, tmp_path):
    url, handle = served
    policy = canary(prometheus, f"models:/{MODEL}/2", [{"weight": 50, "pause_s": 0}])
    subject = Subject(APP, MODEL, "1", MODEL, "2")
    controller = RolloutController(policy, subject, ServeRouter(APP), registry, RolloutStore(tmp_path))
    # Every candidate request fails, so every analysis that has data fails, however few requests this machine
    # manages per window: with a share of failures, a window of a handful of requests could hold none and
    # pass, promoting the candidate. Likewise the window must not still hold the successful requests the
    # same candidate version answered in the test before.
    wait_until_the_candidate_is_idle(prometheus, MODEL, "2")
    handle.set_faults.remote("candidate", fail_rate=1.0).result()
    try:
        with Traffic(url, MODEL, AUTH) as traffic:
            record = drive(controller)
            weight = handle.get_weight.remote().result()
            # The request in flight when the router moved to 0% may have gone to the candidate: let it end.
            traffic.wait_for(1)
            candidate, stable = traffic.by_variant("candidate"), traffic.by_variant("stable")
            traffic.wait_for(5)
            assert traffic.by_variant("candidate") == candidate  # no new request reaches the candidate
            assert traffic.by_variant("stable") >= stable + 5
    finally:
        handle.set_faults.remote("candidate").result()
        _set_weight(handle, 0)
    assert record.phase == "rolled_back", record.reason
    assert weight == 0
    assert "error_rate" in record.reason and "failure_limit 2" in record.reason
    assert registry.alias(MODEL, CHAMPION).version == "1"  # champion untouched
    tags = registry.version(MODEL, "2").tags
    assert tags[TAG_RESULT] == "rolled_back" and "error_rate" in tags["kubeforge.rollout.reason"]
    seen = traffic.snapshot()
    assert {status for (variant, status) in seen if variant == "stable"} == {200}  # champion kept serving
    assert seen["candidate", 503] > 0


def test_ab_comparison_reads_both_variants_from_prometheus(prometheus):
    """Over the traffic of the two canaries above: the candidate failed every request of the second one,
    the stable variant none."""
    policy = ABRollout.model_validate({"strategy": "ab", "candidate": f"models:/{MODEL}/2", "duration_s": 300,
                                       "metric": "error_rate", "min_samples": 5, "prometheus": prometheus})
    subject = Subject(APP, MODEL, "1", MODEL, "2")
    errors = measure_ab(policy, subject, time.time())
    assert errors.winner == "stable", errors.reason
    assert errors.p_value is not None and errors.p_value < 0.05
    assert errors.candidate.error_rate is not None and errors.candidate.error_rate > 0
    assert errors.stable.error_rate == 0
    latency = measure_ab(policy.model_copy(update={"metric": "latency"}), subject, time.time())
    assert latency.test == "mann_whitney_u" and latency.candidate.samples > 0 and latency.stable.samples > 0


def test_every_serving_and_rollout_panel_returns_data(served, prometheus):
    """Runs after the rollouts above: their traffic, analyses, promotion and rollback are what the
    dashboards show. Requests of several tokens first, so inter-token latencies exist."""
    url, _ = served
    since = time.time() - 60  # the last minute, as a dashboard opened now shows it
    with _http(url) as http:
        for model in (f"{MODEL}:stable", f"{MODEL}:candidate"):
            for _ in range(3):
                assert http.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 4}).is_success
    panels = [
        (f"{path.stem}: {title}", expr)
        for path in dashboard_files()
        if path.stem != "kubeforge-training"  # no pipeline runs here; tests/e2e/test_quickstart.py checks it
        for title, expr in panel_queries(path, exclude_rows={OPERATOR_ROW, MONITOR_ROW})
    ]
    # Those requests reach Prometheus at its next successful scrape of the application, which a busy
    # machine delays (a scrape that takes longer than the 1 s interval fails).
    empty = wait_for_panel_data(prometheus, panels, since)
    targets = httpx.get(f"{prometheus}/api/v1/targets").json()["data"]["activeTargets"]
    health = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets]
    assert not empty, "panels without data:\n" + "\n".join(empty) + f"\ntargets: {health}"


# --- self-healing (last: it replaces the stable replica) -------------------------------------------------


def _engine_core_of(variant: str) -> psutil.Process:
    """The vLLM engine core process under the variant's replica (`ray::ServeReplica:<app>:model-<variant>`)."""
    for process in psutil.process_iter(["cmdline"]):
        try:
            parent = process.parent()
            if parent is None or f"ServeReplica:{APP}:model-{variant}" not in " ".join(parent.cmdline()):
                continue
            if "EngineCore" in " ".join(process.cmdline()) + process.name():
                return process
        except psutil.Error:
            continue
    raise AssertionError(f"no engine core process under the {variant} replica")


def test_a_killed_engine_is_replaced_and_only_requests_in_flight_fail(served):
    url = served[0]
    statuses: list[tuple[float, int]] = []
    stop = threading.Event()

    def client() -> None:
        # Requests sent while Serve starts the new replica wait for it (the handle queues them).
        with httpx.Client(base_url=url, timeout=300, headers=AUTH) as http:
            while not stop.is_set():
                try:
                    code = http.post("/v1/completions", json={"model": f"{MODEL}:stable", "prompt": "def",
                                                              "max_tokens": 4}).status_code
                except httpx.HTTPError:
                    code = 0
                statuses.append((time.monotonic(), code))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3)
        killed_at = time.monotonic()
        _engine_core_of("stable").kill()
        not_ready = False
        deadline = killed_at + 240
        while time.monotonic() < deadline:
            health = httpx.get(url + "/healthz", timeout=30)
            not_ready = not_ready or health.status_code == 503
            recent = [code for at, code in statuses if at > time.monotonic() - 3]
            if not_ready and health.status_code == 200 and recent and set(recent) == {200}:
                break
            time.sleep(1)
        healed_s = time.monotonic() - killed_at
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    failed = [code for at, code in statuses if at >= killed_at and code != 200]
    print(f"engine killed: {len(failed)} failed requests, serving again after {healed_s:.1f} s")
    assert not_ready, "/healthz never reported the dead engine"
    assert healed_s < 240, f"still failing {healed_s:.0f} s after the engine was killed: {statuses[-10:]}"
    # Requests that had not begun their answer go again, to the replacement: at most those in flight are lost.
    assert len(failed) <= len(threads), Counter(failed)
    assert statuses[-1][1] == 200
