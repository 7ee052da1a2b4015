"""Records of a user's JSONL file (finetune's task files, the reward stage's preference pairs), checked line
by line: every error names the manifest field, the file as written and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubeforge.errors import StageError


def read_records(
    path_text: str, base_dir: Path, *, stage: str, field: str, required: tuple[str, ...],
    optional: tuple[str, ...] = (), what: str = "record",
) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) per record of the JSONL file at `path_text` (relative to `base_dir`): a JSON object
    of string fields, the `required` ones present and not blank, nothing but those, `optional` and `id`.
    Each record gets an `id`, its own or `<file>:<line>`, unique in the file; `where` locates it for the
    caller's own checks."""
    path = Path(path_text)
    if not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise StageError(stage, f"{field}: {path_text} does not exist (looked for {path})")
    allowed = (*required, *optional, "id")
    out: list[tuple[str, dict[str, Any]]] = []
    ids: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            where = f"{field}: {path_text}:{number}"
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StageError(stage, f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(value, dict):
                raise StageError(stage, f"{where}: a {what} must be a JSON object, got {type(value).__name__}")
            for name in value:
                if name not in allowed:
                    raise StageError(stage, f"{where}: unknown field '{name}' (a {what} has {', '.join(allowed)})")
            for name in allowed:
                if name in value and name != "id" and not isinstance(value[name], str):
                    kind = type(value[name]).__name__
                    raise StageError(stage, f"{where}: field '{name}' must be a string, got {kind}")
            for name in required:
                if name not in value:
                    raise StageError(stage, f"{where}: field '{name}' is missing")
                if not value[name].strip():
                    raise StageError(stage, f"{where}: field '{name}' is empty")
            record_id = str(value.get("id", f"{path.name}:{number}"))
            if record_id in ids:
                raise StageError(stage, f"{where}: field 'id' ('{record_id}') already used on line {ids[record_id]}")
            ids[record_id] = number
            out.append((where, {**value, "id": record_id}))
    if not out:
        raise StageError(stage, f"{field}: {path_text} holds no {what}s")
    return out
