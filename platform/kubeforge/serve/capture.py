"""Opt-in traffic capture (`spec.capture` of a ModelDeployment): a sample of the requests the router
answers, redacted, to Parquet files for monitoring and retraining (`type: served-traffic` sources).

The router draws each request with probability `sample_rate` when it arrives; a drawn request is
written once its answer is complete (streamed or not), with its prompt and answer passed through the
data stage's redactor first, so no personal data or secret reaches the files. Rows wait in memory and go
out as one Parquet file when `max_rows_per_file` are waiting or the oldest has waited `max_file_age_s`
(or when the router stops). Writing never blocks or fails a request: a write that fails keeps its rows for
the next attempt, up to twice a file's rows, beyond which the oldest are dropped and counted.
"""

from __future__ import annotations

import io
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from kubeforge.data.redact import KINDS, redact_text
from kubeforge.filesystems import write_bytes
from kubeforge.spec.deployment import CaptureSpec

logger = logging.getLogger("kubeforge.serve")

COLUMNS = ("time", "request_id", "endpoint", "model", "variant", "version", "status", "latency_s", "prompt",
           "completion")
"""The columns of every capture file, in order (`time`: UNIX seconds when the answer completed)."""


def prompt_text(endpoint: str, document: Any) -> str | None:
    """The text of a request's prompt: a completion's prompt (strings joined by newlines), or a chat's
    messages as `role: content` lines. None for what has no text (token ids), which is not captured."""
    if not isinstance(document, Mapping):
        return None
    if endpoint.endswith("/chat/completions"):
        lines = []
        for message in document.get("messages") or []:
            if not isinstance(message, Mapping):
                return None
            content = message.get("content")
            if isinstance(content, list):  # content parts: their text
                content = "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
            if not isinstance(content, str):
                return None
            lines.append(f"{message.get('role', 'user')}: {content}")
        return "\n".join(lines) if lines else None
    prompt = document.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    return None


def _choice_text(choice: Any) -> str:
    if not isinstance(choice, Mapping):
        return ""
    if isinstance(choice.get("text"), str):
        return str(choice["text"])
    for key in ("message", "delta"):
        part = choice.get(key)
        if isinstance(part, Mapping) and isinstance(part.get("content"), str):
            return str(part["content"])
    return ""


def answer_text(body: bytes, streamed: bool) -> str:
    """The first choice's text of an answer: a JSON document, or the `data:` events of a stream."""
    documents: list[Any] = []
    try:
        if not streamed:
            documents = [json.loads(body)]
        else:
            for line in body.decode("utf-8", errors="replace").splitlines():
                if line.startswith("data: ") and line[6:].strip() != "[DONE]":
                    documents.append(json.loads(line[6:]))
    except ValueError:
        return ""
    parts: list[str] = []
    for document in documents:
        choices = document.get("choices") if isinstance(document, Mapping) else None
        if isinstance(choices, list):
            parts.extend(_choice_text(c) for c in choices if isinstance(c, Mapping) and c.get("index", 0) == 0)
    return "".join(parts)


class TrafficLog:
    """The sample's rows on their way to Parquet files under `directory` (a folder or an object-store URI)."""

    def __init__(self, spec: CaptureSpec, directory: str, registry: CollectorRegistry,
                 draw: Callable[[], float] = random.random, clock: Callable[[], float] = time.time) -> None:
        self.spec, self.directory, self.draw, self.clock = spec, directory.rstrip("/"), draw, clock
        self.rows: list[dict[str, Any]] = []
        self.first_at: float | None = None
        self.lock = threading.Lock()  # rows are added on the event loop and written from a thread
        self.captured = Counter("kubeforge_traffic_captured_rows", "Requests written to the traffic capture.",
                                ["variant"], registry=registry)
        self.files = Counter("kubeforge_traffic_capture_files", "Traffic capture files written.", registry=registry)
        self.failures = Counter("kubeforge_traffic_capture_write_failures",
                                "Traffic capture files that could not be written (their rows wait).", registry=registry)
        self.dropped = Counter("kubeforge_traffic_capture_dropped_rows",
                               "Captured rows dropped because writes kept failing.", registry=registry)
        self.redactions = Counter("kubeforge_traffic_redactions", "Replacements by the redactor in captured traffic.",
                                  ["kind"], registry=registry)
        for kind in KINDS:
            self.redactions.labels(kind)

    def sampled(self) -> bool:
        return self.draw() < self.spec.sample_rate

    def record(self, row: dict[str, Any]) -> bool:
        """Add a drawn request's row (redacted here); True when a file's worth is waiting (`flush` it)."""
        for column in ("prompt", "completion"):
            row[column], counts = redact_text(str(row[column]), self.spec.redact)
            for kind, count in counts.items():
                if count:
                    self.redactions.labels(kind).inc(count)
        row = {column: row[column] for column in COLUMNS}
        with self.lock:
            if not self.rows:
                self.first_at = self.clock()
            self.rows.append(row)
            return len(self.rows) >= self.spec.max_rows_per_file

    def due(self) -> bool:
        """Rows have waited `max_file_age_s`."""
        with self.lock:
            return bool(self.rows) and self.first_at is not None and (
                self.clock() - self.first_at >= self.spec.max_file_age_s)

    def flush(self) -> str | None:
        """Write the waiting rows as one file; its path, or None when nothing was written."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        with self.lock:
            rows, first_at, self.rows, self.first_at = self.rows, self.first_at, [], None
        if not rows:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.clock()))
        path = f"{self.directory}/traffic-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), buffer)
        try:
            write_bytes(path, buffer.getvalue())
        except Exception as exc:  # never the request's problem: keep the rows, bounded, and say so
            self.failures.inc()
            logger.warning("traffic capture: %s; %d rows wait for the next write", exc, len(rows))
            with self.lock:
                self.rows = rows + self.rows
                self.first_at = first_at
                excess = len(self.rows) - 2 * self.spec.max_rows_per_file
                if excess > 0:
                    self.rows = self.rows[excess:]
                    self.dropped.inc(excess)
            return None
        for row in rows:
            self.captured.labels(row["variant"]).inc()
        self.files.inc()
        return path


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("time", pa.float64()), ("request_id", pa.string()), ("endpoint", pa.string()), ("model", pa.string()),
        ("variant", pa.string()), ("version", pa.string()), ("status", pa.int32()), ("latency_s", pa.float64()),
        ("prompt", pa.string()), ("completion", pa.string()),
    ])


SCHEMA = _schema()
