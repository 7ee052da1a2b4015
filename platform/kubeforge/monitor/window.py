"""The two windows of answered prompts the traffic signals compare, read from a deployment's capture files.

For the version the stable variant serves, the reference window is the first `size` prompts it answered,
and the current window the latest `size` after those: the reference is frozen once full, so a shift is
measured against what the version first saw, not against a window that drifts along with the traffic.
A newly promoted version starts a fresh reference, so the traffic it was retrained on is its normal.

Capture files are named by the time they were written (`traffic-<UTC stamp>-<id>.parquet`), so name order
is time order; each file is read once, only its version, status and prompt columns, a batch of rows at a
time. Memory stays at two windows whatever the capture's size.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kubeforge.errors import KubeForgeError
from kubeforge.filesystems import input_error, list_files, open_input
from kubeforge.spec.data import Source
from kubeforge.spec.monitor import TRAINING_DOCUMENT_CHARS

COLUMNS = ("version", "status", "prompt")
BATCH_ROWS = 4096


def capture_pattern(directory: str) -> str:
    return f"{directory.rstrip('/')}/traffic-*.parquet"


@dataclass
class Windows:
    """Reference and current prompts of one served version, fed file by file."""

    version: str
    size: int
    reference: list[str] = field(default_factory=list)
    current: deque[str] = field(init=False)
    seen_files: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.current = deque(maxlen=self.size)

    def add(self, prompt: str) -> None:
        if len(self.reference) < self.size:
            self.reference.append(prompt)
        else:
            self.current.append(prompt)


class TrafficWindows:
    """Follows a capture folder (local or object store) and keeps the windows of the version served now."""

    def __init__(self, directory: str, size: int, base_dir: Path = Path(".")) -> None:
        self.directory = directory
        self.size = size
        self.base_dir = base_dir
        self.windows: Windows | None = None

    def update(self, version: str) -> tuple[Windows, list[str]]:
        """The windows of `version` after reading the files written since the last call, and one line for
        each file that could not be read (skipped for good: a damaged file must not stop the monitor). A
        version other than the last call's starts over from the first file."""
        if self.windows is None or self.windows.version != version:
            self.windows = Windows(version, self.size)
        windows, problems = self.windows, []
        for file in list_files((capture_pattern(self.directory),), self.base_dir):
            if file.path in windows.seen_files:
                continue
            try:
                prompts = _answered_prompts(file.path, version)
            except KubeForgeError as exc:
                problems.append(str(exc))
                prompts = []
            for prompt in prompts:
                windows.add(prompt)
            windows.seen_files.add(file.path)
        return windows, problems


def _answered_prompts(path: str, version: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts: list[str] = []
    try:
        with open_input(path) as handle:
            reader = pq.ParquetFile(handle)
            missing = [c for c in COLUMNS if c not in reader.schema_arrow.names]
            if missing:
                raise KubeForgeError(f"{path}: not a traffic capture file (no column {', '.join(missing)})")
            for batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=list(COLUMNS)):
                versions, statuses, texts = (batch.column(i).to_pylist() for i in range(3))
                prompts.extend(text for v, status, text in zip(versions, statuses, texts, strict=True)
                               if v == version and status == 200 and text)
    except OSError as exc:
        raise input_error(path, exc) from None
    except pa.ArrowException as exc:
        raise KubeForgeError(f"{path}: not a readable Parquet file ({exc})") from None
    return prompts


def training_sample(sources: Sequence[Source], size: int, base_dir: Path) -> list[str]:
    """About `size` documents of a training corpus, spread over its files (one from each of `size` evenly spaced
    files, or the first few of every file when there are fewer), each cut to its beginning: the corpus is read
    only that far, whatever its size."""
    from kubeforge.data.sources import documents_of, input_files

    files = input_files(sources, base_dir, "spec.monitor.training_data")
    if not files:
        return []
    step = max(len(files) / size, 1.0)
    chosen = [files[int(i * step)] for i in range(min(size, len(files)))]
    per_file = math.ceil(size / len(chosen))
    return [document["text"][:TRAINING_DOCUMENT_CHARS] for file in chosen
            for _, document in itertools.islice(documents_of(file), per_file)][:size]
