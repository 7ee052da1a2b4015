"""Reading documents from the manifest's sources.

A document is a dict with `id` (stable across runs: it seeds the train/validation/test split),
`source` (the file it came from) and `text`. Files are read in the driver: the corpora this stage
is made for fit in memory, and reading in one place gives errors that name one file and line. Local
files and object-store URIs alike are listed and opened through `kubeforge.filesystems`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from kubeforge.errors import KubeForgeError
from kubeforge.filesystems import input_error, is_uri, open_input
from kubeforge.spec.data import DataSpec, FilesSource, Source, StdlibSource, stdlib_dir
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


def _read_text(path: str | Path) -> str:
    with open_input(str(path)) as file:
        try:
            raw = file.read()
        except OSError as exc:  # an object store failing mid-read
            raise input_error(str(path), exc) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KubeForgeError(f"{path}: not valid UTF-8 (byte {exc.start}: {exc.reason})") from None


def _format_of(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "txt"


def _read_jsonl(path: str, text_field: str) -> Iterator[Document]:
    text = _read_text(path)
    for number, line in enumerate(text.splitlines(), start=1):
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
        yield {"id": f"{path}:{number}", "source": str(path), "text": value}


def _read_parquet(path: str, text_field: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open_input(path) as file:
        try:
            parquet = pq.ParquetFile(file)
            schema = parquet.schema_arrow
            if text_field not in schema.names:
                raise KubeForgeError(
                    f"{path}: no column '{text_field}' (columns: {', '.join(schema.names)}); "
                    "set text_field of this source"
                )
            column_type = schema.field(text_field).type
            if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
                raise KubeForgeError(f"{path}: column '{text_field}' must hold strings (got {column_type})")
            values = parquet.read(columns=[text_field]).column(text_field).to_pylist()
        except OSError as exc:  # reading failed, e.g. an object store's error
            raise input_error(path, exc) from None
        except pa.ArrowException as exc:
            raise KubeForgeError(f"{path}: not a readable Parquet file ({exc})") from None
    for row, value in enumerate(values):
        if value is None:
            raise KubeForgeError(f"{path}: row {row}: column '{text_field}' is null")
        yield {"id": f"{path}#{row}", "source": str(path), "text": value}


def read_source(source: Source, base_dir: Path, where: str = "paths") -> Iterator[Document]:
    """Documents of one source, in a stable order (sorted files, then line or row order); `where` is the
    manifest field of its paths, which the error names when they match nothing."""
    if isinstance(source, StdlibSource):
        for rel, path in stdlib_files(source):
            yield {"id": f"stdlib/{rel}", "source": str(path), "text": _read_text(path)}
        return
    paths = resolve_source_paths(source, base_dir)
    if not paths:
        # Local paths were checked when the manifest was loaded; object-store URIs are listed only now.
        looked = "" if all(is_uri(p) for p in source.paths) else f" (looked in {base_dir})"
        raise KubeForgeError(f"{where}: no file matches {', '.join(map(repr, source.paths))}{looked}")
    for found in paths:
        location = found.path  # a local path or a URI: never a Path, which would turn s3:// into s3:/
        fmt = _format_of(location, source.format)
        if fmt == "jsonl":
            yield from _read_jsonl(location, source.text_field)
        elif fmt == "parquet":
            yield from _read_parquet(location, source.text_field)
        else:
            yield {"id": location, "source": location, "text": _read_text(location)}


def read_documents(sources: Sequence[Source], base_dir: Path, field: str = "spec.data.sources") -> list[Document]:
    """Every source's documents; an id seen twice (one file listed by two sources) is read once. `field` is
    the manifest field the sources come from."""
    seen: set[str] = set()
    documents: list[Document] = []
    for index, source in enumerate(sources):
        for document in read_source(source, base_dir, f"{field}[{index}].paths"):
            if document["id"] in seen:
                continue
            seen.add(document["id"])
            documents.append(document)
    return documents


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
        elif isinstance(source, FilesSource):
            for found in resolve_source_paths(source, base_dir):
                digest.update(f"{found.path} {found.size} {found.mtime_ns}\n".encode())
    return digest.hexdigest()
