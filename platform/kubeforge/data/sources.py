"""Reading documents from the manifest's sources.

A document is a dict with `id` (stable across runs: it seeds the train/validation/test split),
`source` (the file it came from) and `text`. The driver only lists the sources' files
(`input_files`: names and sizes); Ray workers read them (`documents_of`), each file from start to
end, so that an error names one file and line.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubeforge.errors import KubeForgeError
from kubeforge.filesystems import input_error, is_uri, open_input
from kubeforge.spec.data import DataSpec, FilesSource, ServedTrafficSource, Source, StdlibSource, stdlib_dir
from kubeforge.spec.load import resolve_source_paths

Document = dict[str, str]


def stdlib_files(source: StdlibSource) -> list[tuple[str, Path]]:
    """(path relative to the standard library, absolute path) of every `.py` file kept by `exclude`."""
    root = stdlib_dir()
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # __pycache__ holds bytecode only; skipping it keeps the walk cheap.
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if any(fnmatch.fnmatch(rel, pattern) for pattern in source.exclude):
                continue
            found.append((rel, path))
    found.sort()
    if source.max_files is not None:
        found = found[: source.max_files]
    return found


@dataclass(frozen=True)
class InputFile:
    """One file of the corpus, as the driver lists it for a reader."""

    number: int
    """Position of the file in the corpus: documents are ordered by file, then by line or row."""
    path: str
    format: str
    """`txt`, `jsonl`, `parquet`, or `stdlib` (a `.py` file of the standard library, one document)."""
    text_field: str
    size: int
    name: str = ""
    """For `stdlib`: the path relative to the standard library, which makes the id."""
    until: float | None = None
    """For `traffic`: the source's `until`, the last answer time read."""


@dataclass(frozen=True)
class Piece:
    """The lines of a JSONL file that start in bytes [start, end); the first of them is number
    `first_line` of the file. Big files are read in pieces, by several workers at once."""

    start: int
    end: int
    first_line: int


def _format_of(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "txt"


def input_files(sources: Sequence[Source], base_dir: Path, field: str = "spec.data.sources") -> list[InputFile]:
    """Every source's files in corpus order; a file listed by two sources is read once. `field` is the
    manifest field the sources come from, which an error names."""
    found: list[InputFile] = []
    seen: set[str] = set()
    for index, source in enumerate(sources):
        if isinstance(source, StdlibSource):
            listed = [(str(path), path.stat().st_size, "stdlib", rel) for rel, path in stdlib_files(source)]
        else:
            matched = resolve_source_paths(source, base_dir)
            if not matched:
                # Local paths were checked when the manifest was loaded; object-store URIs are listed only now.
                looked = "" if all(is_uri(p) for p in source.paths) else f" (looked in {base_dir})"
                raise KubeForgeError(
                    f"{field}[{index}].paths: no file matches {', '.join(map(repr, source.paths))}{looked}"
                )
            listed = [(f.path, f.size, "traffic" if isinstance(source, ServedTrafficSource) else
                       _format_of(f.path, source.format), "") for f in matched]
        text_field = source.text_field if isinstance(source, FilesSource) else source.text if isinstance(
            source, ServedTrafficSource) else "text"
        until = source.until if isinstance(source, ServedTrafficSource) else None
        for path, size, fmt, name in listed:
            if path in seen:
                continue
            seen.add(path)
            found.append(InputFile(len(found), path, fmt, text_field, size, name, until))
    return found


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KubeForgeError(f"{where}: not valid UTF-8 (byte {exc.start}: {exc.reason})") from None


def _read_whole(path: str) -> str:
    with open_input(path) as handle:
        try:
            raw = handle.read()
        except OSError as exc:  # an object store failing mid-read
            raise input_error(path, exc) from None
    return _decode(raw, path)


def _lines(path: str, piece: Piece) -> Iterator[tuple[int, bytes]]:
    """(number, line) of the lines that start in the piece's byte range."""
    try:
        yield from _lines_of(path, piece)
    except OSError as exc:  # an object store failing mid-read
        raise input_error(path, exc) from None


def _lines_of(path: str, piece: Piece) -> Iterator[tuple[int, bytes]]:
    # Object-store files have no readline of their own; a buffer also makes local reads fewer and larger.
    with io.BufferedReader(open_input(path), buffer_size=1 << 20) as handle:  # type: ignore[type-var]
        position = piece.start
        if position > 0:
            handle.seek(position - 1)
            if handle.read(1) != b"\n":  # the range starts inside a line, which the piece before reads
                position += len(handle.readline())
        number = piece.first_line
        while position < piece.end:
            raw = handle.readline()
            if not raw:
                return
            yield number, raw
            position += len(raw)
            number += 1


def _jsonl_documents(path: str, text_field: str, piece: Piece) -> Iterator[tuple[int, Document]]:
    for number, raw in _lines(path, piece):
        line = _decode(raw, f"{path}:{number}")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KubeForgeError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise KubeForgeError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        if text_field not in record:
            fields = ", ".join(sorted(map(str, record))) or "none"
            raise KubeForgeError(
                f"{path}:{number}: no field '{text_field}' in the record (fields: {fields}); "
                "set text_field of this source"
            )
        value = record[text_field]
        if not isinstance(value, str):
            raise KubeForgeError(
                f"{path}:{number}: field '{text_field}' must be a string (got {type(value).__name__})"
            )
        yield number, {"id": f"{path}:{number}", "source": path, "text": value}


# Rows decoded at a time from a Parquet file: bounds a reader's memory whatever the file's size.
_PARQUET_BATCH_ROWS = 4096


def _parquet_file(handle: Any, path: str) -> Any:
    """The Parquet file open on `handle`, or one line naming `path` when it is not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(handle)
    except OSError as exc:
        raise input_error(path, exc) from None
    except pa.ArrowException as exc:
        raise KubeForgeError(f"{path}: not a readable Parquet file ({exc})") from None


def _parquet_documents(path: str, text_field: str) -> Iterator[tuple[int, Document]]:
    import pyarrow as pa

    with open_input(path) as handle:
        reader = _parquet_file(handle, path)
        names = reader.schema_arrow.names
        if text_field not in names:
            raise KubeForgeError(
                f"{path}: no column '{text_field}' (columns: {', '.join(names)}); set text_field of this source"
            )
        column_type = reader.schema_arrow.field(text_field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise KubeForgeError(f"{path}: column '{text_field}' must hold strings (got {column_type})")
        row = 0
        try:
            for batch in reader.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
                for value in batch.column(0).to_pylist():
                    if value is None:
                        raise KubeForgeError(f"{path}: row {row}: column '{text_field}' is null")
                    yield row, {"id": f"{path}#{row}", "source": path, "text": value}
                    row += 1
        except OSError as exc:  # an object store failing mid-read
            raise input_error(path, exc) from None
        except pa.ArrowException as exc:
            raise KubeForgeError(f"{path}: not a readable Parquet file (row {row}: {exc})") from None


TRAFFIC_COLUMNS = ("status", "prompt", "completion", "time")


def _traffic_documents(path: str, text: str, until: float | None) -> Iterator[tuple[int, Document]]:
    """The requests of a capture file (`kubeforge.serve.capture`) answered with 200 (at or before `until`)
    as documents."""
    import pyarrow as pa

    with open_input(path) as handle:
        reader = _parquet_file(handle, path)
        missing = [c for c in TRAFFIC_COLUMNS if c not in reader.schema_arrow.names]
        if missing:
            raise KubeForgeError(f"{path}: not a traffic capture file (no column {', '.join(missing)}); served-traffic "
                                 "sources read what a ModelDeployment's spec.capture writes")
        row = 0
        try:
            for batch in reader.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=list(TRAFFIC_COLUMNS)):
                columns = (batch.column(i).to_pylist() for i in range(len(TRAFFIC_COLUMNS)))
                for status, prompt, completion, answered in zip(*columns, strict=True):
                    if status == 200 and (until is None or answered <= until):
                        value = {"prompt": prompt, "completion": completion}.get(text, f"{prompt}\n{completion}")
                        yield row, {"id": f"{path}#{row}", "source": path, "text": value or ""}
                    row += 1
        except OSError as exc:  # an object store failing mid-read
            raise input_error(path, exc) from None
        except pa.ArrowException as exc:
            raise KubeForgeError(f"{path}: not a readable Parquet file (row {row}: {exc})") from None


def split_into_pieces(size: int, piece_bytes: int) -> list[tuple[int, int]]:
    """The byte ranges of a file's pieces, and, for each, the range whose newlines `pieces` needs."""
    ranges = [(start, min(start + piece_bytes, size)) for start in range(0, size, piece_bytes)]
    return [(max(start - 1, 0), end - 1) for start, end in ranges]


def pieces(size: int, piece_bytes: int, newlines: list[int]) -> list[Piece]:
    """A file's pieces, given `count_newlines` of each range of `split_into_pieces`: a piece's first line
    is the line after those that start before it, which the newlines before its first byte end."""
    found = []
    before = 0
    for (start, end), counted in zip(
        [(s, min(s + piece_bytes, size)) for s in range(0, size, piece_bytes)], newlines, strict=True
    ):
        found.append(Piece(start, end, 2 + before if start else 1))
        before += counted
    return found


def count_newlines(path: str, start: int, end: int) -> int:
    """Newlines in bytes [start, end) of a file, read a block at a time."""
    count = 0
    with open_input(path) as handle:
        handle.seek(start)
        left = end - start
        while left > 0:
            try:
                block = handle.read(min(left, 1 << 24))
            except OSError as exc:  # an object store failing mid-read
                raise input_error(path, exc) from None
            if not block:
                break
            count += block.count(b"\n")
            left -= len(block)
    return count


def documents_of(file: InputFile, piece: Piece | None = None) -> Iterator[tuple[int, Document]]:
    """(row within the file, document) of one file, or of the lines of a JSONL file that start in a
    piece of it, in order; streamed, so any file size fits."""
    if file.format == "stdlib":
        yield 0, {"id": f"stdlib/{file.name}", "source": file.path, "text": _read_whole(file.path)}
    elif file.format == "jsonl":
        yield from _jsonl_documents(file.path, file.text_field, piece or Piece(0, file.size, 1))
    elif file.format == "traffic":
        yield from _traffic_documents(file.path, file.text_field, file.until)
    elif file.format == "parquet":
        yield from _parquet_documents(file.path, file.text_field)
    else:
        yield 0, {"id": file.path, "source": file.path, "text": _read_whole(file.path)}


def read_documents(sources: Sequence[Source], base_dir: Path, field: str = "spec.data.sources") -> Iterator[Document]:
    """Every source's documents, read here (small corpora: the perplexity filter's reference)."""
    for file in input_files(sources, base_dir, field):
        for _, document in documents_of(file):
            yield document


def source_fingerprint(spec: DataSpec, base_dir: Path) -> str:
    """Hash of the source files' names, sizes and modification times (no contents are read).

    For the standard library the interpreter version stands in for modification times, which
    differ between otherwise identical installations.
    """
    digest = hashlib.sha256()
    sources: list[Source] = list(spec.sources)
    if spec.perplexity.enabled:
        sources.extend(spec.perplexity.reference)
    for source in sources:
        if isinstance(source, StdlibSource):
            digest.update(f"stdlib {stdlib_dir()} {sys.version}\n".encode())
            for rel, path in stdlib_files(source):
                digest.update(f"{rel} {path.stat().st_size}\n".encode())
        else:
            for found in resolve_source_paths(source, base_dir):
                digest.update(f"{found.path} {found.size} {found.mtime_ns}\n".encode())
    return digest.hexdigest()
