"""The data stage's augment step: WordNet synonyms (Debian's wordnet-base, read offline) and paraphrases
from an OpenAI-compatible endpoint, here a small HTTP server in a thread that answers like one."""

from __future__ import annotations

import difflib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from pydantic import ValidationError

from kubeforge.data.augment import (
    COLUMNS,
    PARAPHRASE_STATS,
    SYNONYM_STATS,
    paraphrase_documents,
    paraphrase_selected,
    preflight,
    synonym_documents,
)
from kubeforge.errors import SpecError, StageError
from kubeforge.spec.data import AugmentStep, ParaphraseSpec, SynonymsSpec
from kubeforge.spec.load import parse_manifest
from tests.helpers import free_port

pytestmark = pytest.mark.unit

PROSE = """\
The library keeps a small cache of compiled patterns, so a program that uses the same expression many
times does not pay for compiling it again. When the cache grows beyond its limit, the oldest entries
are discarded. Careful readers will notice that the module offers two ways to work with patterns: the
functions at module level, which are convenient for quick scripts, and compiled objects, which are
faster inside long loops. Errors in a pattern raise an exception that points to the position of the
mistake, and the message usually suggests how to repair it. Large files should be read in pieces
rather than all at once; the reader returns each line as soon as it is complete, and the writer
flushes its buffer when the stream is closed. Good documentation describes the behaviour a user can
rely on, warns about the traps that experienced programmers still fall into, and gives a short example
for every important function. A quiet morning in the garden, a strong cup of coffee and a careful
review of yesterday's changes often reveal problems that a tired mind missed the evening before.
"""


def docs(*texts: str, prefix: str = "doc") -> pd.DataFrame:
    return pd.DataFrame({
        "id": [f"{prefix}{i}" for i in range(len(texts))],
        "source": [f"source-{i}" for i in range(len(texts))],
        "text": list(texts),
    })


def changed_words(before: str, after: str) -> int:
    """How many whitespace-separated words of `before` were replaced in `after` (a word replaced by a
    multi-word synonym that contains it, `cache` -> `memory cache`, shows as an insertion)."""
    matcher = difflib.SequenceMatcher(a=before.split(), b=after.split(), autojunk=False)
    return sum(max(i2 - i1, 1) for op, i1, i2, _, _ in matcher.get_opcodes() if op != "equal")


# --- synonyms ------------------------------------------------------------------------------------

def test_synonym_copies_are_new_documents_with_their_lineage() -> None:
    frame = docs("Happy people walk along the river.", "x = 1  # 42", "The storm destroyed an old house.")
    out, stats = synonym_documents(frame, SynonymsSpec(copies=2))
    assert tuple(out.columns) == COLUMNS
    assert list(out["id"]) == ["doc0#synonyms-1", "doc0#synonyms-2", "doc2#synonyms-1", "doc2#synonyms-2"]
    assert list(out["augmented_from"]) == ["doc0", "doc0", "doc2", "doc2"]
    assert list(out["source"]) == ["source-0", "source-0", "source-2", "source-2"]
    assert set(out["augmentation"]) == {"synonyms"}
    assert not set(out["text"]) & set(frame["text"])
    assert set(stats) == set(SYNONYM_STATS)
    assert stats["documents_in"] == 3 and stats["documents_out"] == 4
    assert stats["documents_without_synonyms"] == 1  # the code line has no word to replace


def test_synonyms_are_deterministic_per_document_and_seed() -> None:
    spec = SynonymsSpec(replace_fraction=0.3, copies=3, seed=7)
    first, _ = synonym_documents(docs(PROSE, "Careful readers notice small problems."), spec)
    # Another batch, in another order, with another neighbour: the same copies of the same document.
    again, _ = synonym_documents(docs("A quiet garden.", PROSE, prefix="x").assign(id=["other", "doc0"]), spec)
    assert list(again[again["augmented_from"] == "doc0"]["text"]) == list(first[first["augmented_from"] == "doc0"]["text"])
    copies = list(first[first["augmented_from"] == "doc0"]["text"])
    assert len(set(copies)) == 3  # each copy draws its own words
    reseeded, _ = synonym_documents(docs(PROSE), spec.model_copy(update={"seed": 8}))
    assert reseeded["text"][0] != copies[0]
    twins, _ = synonym_documents(docs(PROSE, PROSE), spec.model_copy(update={"copies": 1}))
    assert twins["text"][0] != twins["text"][1]  # the id is part of the seed: equal texts, other words


def test_synonyms_do_not_depend_on_the_process(tmp_path: Path) -> None:
    """Ray workers are other processes, each with its own string-hash salt."""
    spec = SynonymsSpec(replace_fraction=0.5, seed=3)
    script = (
        "import json, sys; import pandas as pd\n"
        "from kubeforge.data.augment import synonym_documents\n"
        "from kubeforge.spec.data import SynonymsSpec\n"
        "frame = pd.DataFrame({'id': ['doc0'], 'source': ['s'], 'text': [sys.stdin.read()]})\n"
        f"out, _ = synonym_documents(frame, SynonymsSpec.model_validate_json({spec.model_dump_json()!r}))\n"
        "print(json.dumps(list(out['text'])))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", script], input=PROSE, capture_output=True, text=True, env=env,
                         check=False, timeout=120)
    assert run.returncode == 0, run.stderr
    out, _ = synonym_documents(docs(PROSE), spec)
    assert json.loads(run.stdout) == list(out["text"])


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_the_share_of_words_replaced_follows_replace_fraction(fraction: float) -> None:
    out, stats = synonym_documents(docs(PROSE), SynonymsSpec(replace_fraction=fraction, copies=4))
    eligible = stats["eligible_words"]
    assert eligible > 50, stats
    assert stats["words_replaced"] == 4 * round(fraction * eligible)
    for text in out["text"]:
        assert changed_words(PROSE, text) / eligible == pytest.approx(fraction, abs=0.03)


def test_synonyms_keep_capitalisation_and_leave_code_alone() -> None:
    code = "obj.method(x) foo_bar `happy` x=1 HAPPY getHappy happy2"
    out, stats = synonym_documents(docs(f"Happy {code} happy."), SynonymsSpec(replace_fraction=1.0, copies=8))
    assert stats["eligible_words"] == 2
    for text in out["text"]:
        first, *middle, last = text.split(" ")
        assert " ".join(middle[-len(code.split(" ")):]) == code
        assert first[0].isupper() and first.lower() != "happy"
        assert last.endswith(".") and last[0].islower() and last != "happy."


def test_multi_word_synonyms_have_spaces_and_never_repeat_the_word() -> None:
    words = ["begin", "happy", "storm", "quickly", "house", "careful"]
    out, _ = synonym_documents(docs(*words), SynonymsSpec(replace_fraction=1.0, copies=16))
    replaced = dict(zip(out["id"], out["text"], strict=True))
    assert all(text != words[int(doc_id[3])] for doc_id, text in replaced.items())
    assert not any("_" in text for text in replaced.values())
    assert any(" " in text for text in replaced.values())  # e.g. begin -> "set about"


def test_missing_wordnet_is_one_error_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "index.noun").write_text("")  # half an installation is still missing
    with pytest.raises(StageError, match=r"^stage data: augment.synonyms needs WordNet, but .* lacks .*"
                                         r"install the Debian package wordnet-base \(`apt-get install wordnet-base`"):
        synonym_documents(docs(), SynonymsSpec(), wordnet_dir=tmp_path)
    step = AugmentStep(enabled=True, synonyms=SynonymsSpec())
    with pytest.raises(StageError, match="wordnet-base"):
        preflight(step, wordnet_dir=tmp_path)
    preflight(step.model_copy(update={"enabled": False}), wordnet_dir=tmp_path)  # off: nothing to check


# --- paraphrases -----------------------------------------------------------------------------------

@dataclass
class FakeEndpoint:
    """An OpenAI-compatible chat completions endpoint: `reply(request_number, body)` gives the status, the
    body (dict for JSON, str as is) and extra headers of each answer; requests are recorded."""

    reply: Callable[[int, dict[str, Any]], tuple[int, Any, dict[str, str]]]
    delay_s: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""


def chat_completion(content: str | None, finish_reason: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


def echo(_: int, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
    """Answers with the document's text (what follows the template's colon), upper-cased."""
    return 200, chat_completion(body["messages"][0]["content"].split(": ", 1)[1].upper()), {}


@pytest.fixture
def endpoint() -> Iterator[Callable[..., FakeEndpoint]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(reply: Callable[[int, dict[str, Any]], tuple[int, Any, dict[str, str]]], delay_s: float = 0.0) -> FakeEndpoint:
        fake = FakeEndpoint(reply, delay_s)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with fake.lock:
                    number = len(fake.requests)
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    fake.in_flight += 1
                    fake.most_in_flight = max(fake.most_in_flight, fake.in_flight)
                time.sleep(fake.delay_s)
                with fake.lock:
                    fake.in_flight -= 1
                status, answer, headers = fake.reply(number, body)
                data = (json.dumps(answer) if isinstance(answer, dict) else answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # a client that timed out has gone

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        fake.url = f"http://127.0.0.1:{server.server_port}/v1"
        return fake

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def paraphrase_spec(url: str, **fields: Any) -> ParaphraseSpec:
    return ParaphraseSpec(endpoint=url, model="tiny", prompt_template="Rewrite: {text}", **fields)


def test_paraphrases_are_new_documents_from_chat_completions(endpoint, monkeypatch) -> None:
    fake = endpoint(echo)
    monkeypatch.setenv("AUGMENT_TEST_KEY", "sk-test-123")
    spec = paraphrase_spec(fake.url, api_key_env="AUGMENT_TEST_KEY", max_tokens=64, temperature=0.5, sampling_seed=9)
    out, stats = paraphrase_documents(docs("first text", "second text", "third text"), spec)
    assert tuple(out.columns) == COLUMNS
    assert list(out["id"]) == ["doc0#paraphrase", "doc1#paraphrase", "doc2#paraphrase"]
    assert list(out["text"]) == ["FIRST TEXT", "SECOND TEXT", "THIRD TEXT"]
    assert list(out["augmented_from"]) == ["doc0", "doc1", "doc2"]
    assert list(out["source"]) == ["source-0", "source-1", "source-2"]
    assert set(out["augmentation"]) == {"paraphrase"}
    assert set(stats) == set(PARAPHRASE_STATS)
    assert stats == {**stats, "documents_in": 3, "documents_selected": 3, "documents_out": 3, "requests": 3,
                     "retries": 0, "truncated": 0, "prompt_tokens": 15, "completion_tokens": 9}
    request = fake.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == "Bearer sk-test-123"
    assert request["body"]["model"] == "tiny" and request["body"]["max_tokens"] == 64
    assert request["body"]["temperature"] == 0.5 and request["body"]["seed"] == 9
    assert sorted(r["body"]["messages"][0]["content"] for r in fake.requests) == [
        "Rewrite: first text", "Rewrite: second text", "Rewrite: third text"]


def test_requests_are_concurrent_up_to_max_concurrency(endpoint) -> None:
    fake = endpoint(echo, delay_s=0.2)
    out, _ = paraphrase_documents(docs(*(f"text {i}" for i in range(6))), paraphrase_spec(fake.url, max_concurrency=2))
    assert len(out) == 6
    assert fake.most_in_flight == 2


def test_the_template_keeps_other_braces(endpoint) -> None:
    fake = endpoint(lambda n, body: (200, chat_completion("ok"), {}))
    spec = ParaphraseSpec(endpoint=fake.url, model="tiny", prompt_template='Answer as {"text": ...}: {text}')
    paraphrase_documents(docs("a {b} c"), spec)
    assert fake.requests[0]["body"]["messages"][0]["content"] == 'Answer as {"text": ...}: a {b} c'
    assert "seed" not in fake.requests[0]["body"]  # sampling_seed null: servers that reject it still answer


def test_failed_requests_are_retried_then_succeed(endpoint) -> None:
    def flaky(number: int, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if number < 2:
            return 503, {"error": {"message": "overloaded"}}, {"retry-after-ms": "1"}
        return echo(number, body)

    fake = endpoint(flaky)
    out, stats = paraphrase_documents(docs("only text"), paraphrase_spec(fake.url, max_retries=3))
    assert list(out["text"]) == ["ONLY TEXT"]
    assert (stats["requests"], stats["retries"]) == (3, 2)
    assert len(fake.requests) == 3


def test_a_persistent_server_error_names_endpoint_status_and_body(endpoint) -> None:
    body = "model tiny is overloaded: " + "x" * 2000
    fake = endpoint(lambda n, _: (500, body, {"retry-after-ms": "1"}))
    with pytest.raises(StageError) as info:
        paraphrase_documents(docs("only text"), paraphrase_spec(fake.url, max_retries=2))
    message = str(info.value)
    assert message.startswith(f"stage data: augment.paraphrase: {fake.url} answered HTTP 500 for document 'doc0' "
                              "after 2 retries: model tiny is overloaded: xxx")
    assert message.endswith("x...") and len(message) < 700  # the body is cut
    assert info.value.resumable  # the endpoint's fault: a rerun resumes after the saved steps
    assert len(fake.requests) == 3


def test_a_client_error_is_not_retried(endpoint) -> None:
    fake = endpoint(lambda n, _: (404, {"error": {"message": "The model `tiny` does not exist."}}, {}))
    with pytest.raises(StageError, match=r"answered HTTP 404 for document 'doc0': .*The model `tiny` does not exist"):
        paraphrase_documents(docs("only text"), paraphrase_spec(fake.url, max_retries=3))
    assert len(fake.requests) == 1


def test_an_unreachable_endpoint_is_named() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(StageError, match=rf"^stage data: cannot reach {re.escape(url)} \(augment.paraphrase\) "
                                         r"after 1 retry: .*[Cc]onnect"):
        paraphrase_documents(docs("only text"), paraphrase_spec(url, max_retries=1))


def test_a_slow_endpoint_times_out(endpoint) -> None:
    fake = endpoint(echo, delay_s=1.0)
    with pytest.raises(StageError, match=r"did not answer document 'doc0' within timeout_s=0.2$"):
        paraphrase_documents(docs("only text"), paraphrase_spec(fake.url, max_retries=0, timeout_s=0.2))


@pytest.mark.parametrize("content", ["", "  \n", None])
def test_an_empty_completion_names_the_document(endpoint, content: str | None) -> None:
    fake = endpoint(lambda n, body: (200, chat_completion(content if "second" in body["messages"][0]["content"] else "ok"), {}))
    with pytest.raises(StageError, match=r"sent an empty completion for document 'doc1' \(model tiny\)"):
        paraphrase_documents(docs("first", "second", "third"), paraphrase_spec(fake.url))


def test_document_fraction_chooses_documents_by_a_hash_of_their_id(endpoint) -> None:
    ids = [f"file-{i}.py" for i in range(2000)]
    spec = paraphrase_spec("http://127.0.0.1:9/v1", document_fraction=0.3)
    chosen = [i for i in ids if paraphrase_selected(i, spec)]
    assert len(chosen) / len(ids) == pytest.approx(0.3, abs=0.03)
    assert chosen != [i for i in ids if paraphrase_selected(i, spec.model_copy(update={"seed": 1}))]
    fake = endpoint(echo)
    frame = docs(*(f"text {i}" for i in range(40)))
    out, stats = paraphrase_documents(frame, paraphrase_spec(fake.url, document_fraction=0.3))
    expected = [i for i in frame["id"] if paraphrase_selected(i, spec)]
    assert list(out["augmented_from"]) == expected and 0 < len(expected) < 40
    assert stats["documents_selected"] == len(expected) == len(fake.requests)


def test_a_missing_api_key_variable_is_named_before_any_request(endpoint, monkeypatch) -> None:
    fake = endpoint(echo)
    monkeypatch.delenv("AUGMENT_TEST_KEY", raising=False)
    spec = paraphrase_spec(fake.url, api_key_env="AUGMENT_TEST_KEY")
    message = r"augment.paraphrase.api_key_env: the environment variable AUGMENT_TEST_KEY is not set or empty"
    with pytest.raises(StageError, match=message):
        paraphrase_documents(docs("text"), spec)
    with pytest.raises(StageError, match=message):
        preflight(AugmentStep(enabled=True, paraphrase=spec))
    assert fake.requests == []


# --- the manifest ----------------------------------------------------------------------------------

def pipeline(augment: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelPipeline", "metadata": {"name": "demo"},
            "spec": {"data": {"sources": [{"type": "python-stdlib"}], "augment": augment}, "pretrain": {}}}


def test_augment_is_off_and_each_part_absent_by_default() -> None:
    step = parse_manifest(pipeline({})).spec.data.augment
    assert (step.enabled, step.synonyms, step.paraphrase) == (False, None, None)
    step = parse_manifest(pipeline({"enabled": True, "synonyms": {}})).spec.data.augment
    assert step.synonyms == SynonymsSpec() and step.paraphrase is None


def test_a_template_without_the_placeholder_is_refused_at_load() -> None:
    with pytest.raises(SpecError) as info:
        parse_manifest(pipeline({"enabled": True, "paraphrase": {
            "endpoint": "http://127.0.0.1:8000/v1", "model": "tiny", "prompt_template": "Paraphrase this."}}))
    assert [str(p) for p in info.value.problems] == [
        "spec.data.augment.paraphrase.prompt_template: must contain the placeholder {text}, where each "
        "document's text goes (got 'Paraphrase this.')"]
    with pytest.raises(ValidationError, match="prompt_template"):
        ParaphraseSpec(endpoint="http://x/v1", model="m", prompt_template="{txt}")


def test_enabled_augment_needs_something_to_do() -> None:
    with pytest.raises(SpecError, match=r"spec.data.augment: enabled, but neither synonyms nor paraphrase is given"):
        parse_manifest(pipeline({"enabled": True}))
