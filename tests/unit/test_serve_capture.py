"""The traffic capture's pieces without a server: which text is captured from each request and answer
shape, redaction before anything is kept, files by rows and by age, and writes that fail keeping their rows
(bounded) without ever raising."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prometheus_client import CollectorRegistry

from kubeforge.serve.capture import COLUMNS, TrafficLog, answer_text, prompt_text
from kubeforge.spec.deployment import CaptureSpec

pytestmark = pytest.mark.unit


def test_the_prompt_text_of_completions_and_chats() -> None:
    assert prompt_text("/v1/completions", {"prompt": "def f("}) == "def f("
    assert prompt_text("/v1/completions", {"prompt": ["a", "b"]}) == "a\nb"
    assert prompt_text("/v1/completions", {"prompt": [1, 2, 3]}) is None  # token ids: no text to keep
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "you"}]}]}
    assert prompt_text("/v1/chat/completions", chat) == "system: Be brief.\nuser: Hi you"
    assert prompt_text("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}) is None
    assert prompt_text("/v1/completions", None) is None


def test_the_answer_text_of_whole_and_streamed_answers() -> None:
    assert answer_text(json.dumps({"choices": [{"index": 0, "text": "return 1"}]}).encode(), streamed=False) == "return 1"
    chat = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}}]}
    assert answer_text(json.dumps(chat).encode(), streamed=False) == "Hello"
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
              {"choices": [{"index": 0, "delta": {"content": "Hel"}}, {"index": 1, "delta": {"content": "X"}}]},
              {"choices": [{"index": 0, "delta": {"content": "lo"}}]}]
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    assert answer_text(stream.encode(), streamed=True) == "Hello"  # the first choice only
    assert answer_text(b"not json", streamed=False) == ""


def _row(prompt: str = "hello", variant: str = "stable") -> dict[str, object]:
    return {"time": 1.0, "request_id": "r", "endpoint": "/v1/completions", "model": "m", "variant": variant,
            "version": "1", "status": 200, "latency_s": 0.5, "prompt": prompt, "completion": "ok"}


def test_rows_are_redacted_drawn_and_written_by_rows(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    draws = iter([0.05, 0.5, 0.2])
    log = TrafficLog(CaptureSpec(sample_rate=0.25, max_rows_per_file=2), str(tmp_path), registry, draw=lambda: next(draws))
    assert [log.sampled(), log.sampled(), log.sampled()] == [True, False, True]
    assert not log.record(_row("mail me at ada@example.com"))
    assert log.record(_row("from 10.1.2.3", "candidate"))  # the second row fills a file
    path = log.flush()
    assert path is not None and Path(path).parent == tmp_path and Path(path).name.startswith("traffic-")
    table = pq.read_table(path)
    assert table.column_names == list(COLUMNS)
    assert table.column("prompt").to_pylist() == ["mail me at <EMAIL>", "from <IP_ADDRESS>"]
    assert registry.get_sample_value("kubeforge_traffic_captured_rows_total", {"variant": "candidate"}) == 1
    assert registry.get_sample_value("kubeforge_traffic_redactions_total", {"kind": "emails"}) == 1
    assert registry.get_sample_value("kubeforge_traffic_capture_files_total") == 1
    assert log.flush() is None  # nothing waits


def test_rows_go_out_when_they_have_waited_long_enough(tmp_path: Path) -> None:
    now = [100.0]
    log = TrafficLog(CaptureSpec(max_file_age_s=60), str(tmp_path), CollectorRegistry(), clock=lambda: now[0])
    assert not log.due()
    log.record(_row())
    now[0] = 159.0
    assert not log.due()
    now[0] = 160.0
    assert log.due()


def test_a_failing_write_keeps_its_rows_up_to_two_files_and_never_raises(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    registry = CollectorRegistry()
    log = TrafficLog(CaptureSpec(max_rows_per_file=2), str(blocked), registry)
    for n in range(3):
        log.record(_row(f"p{n}"))
    assert log.flush() is None and len(log.rows) == 3
    assert registry.get_sample_value("kubeforge_traffic_capture_write_failures_total") == 1
    for n in range(3, 6):
        log.record(_row(f"p{n}"))
    assert log.flush() is None
    # Six rows waited, four are kept: the two oldest are dropped and counted.
    assert [r["prompt"] for r in log.rows] == ["p2", "p3", "p4", "p5"]
    assert registry.get_sample_value("kubeforge_traffic_capture_dropped_rows_total") == 2
    log.directory = str(tmp_path / "traffic")
    path = log.flush()
    assert path is not None and pq.read_table(path).num_rows == 4


def test_captured_traffic_is_always_redacted() -> None:
    with pytest.raises(ValueError, match="captured traffic is always redacted"):
        CaptureSpec.model_validate({"redact": {"enabled": False}})
