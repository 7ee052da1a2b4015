"""The fine-tuning task: examples read from the user's JSONL file or built from the corpus, deduplicated,
split into train and test (see `task_split`) and capped at `max_examples`.

The record kinds and the files the splits are written to are in `kubeforge.formats.splits`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kubeforge.errors import StageError
from kubeforge.formats.chat import user_message
from kubeforge.formats.functions import corpus_functions
from kubeforge.formats.splits import TaskSplits
from kubeforge.formats.task_split import normalise, record_content, split_by_prompt

if TYPE_CHECKING:
    from kubeforge.context import StageOutput
    from kubeforge.spec.finetune import FinetuneSpec
    from kubeforge.stages.data import DataResult

STAGE = "finetune"

_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # kind: (required, optional)
    "instruction": (("instruction", "output"), ("id", "input")),
    "preference": (("prompt", "chosen", "rejected"), ("id",)),
}


def load_task(spec: FinetuneSpec, base_dir: Path, data: StageOutput[DataResult]) -> TaskSplits:
    """Read or build the task's examples and split them into train and test."""
    kind: Literal["instruction", "preference"] = "preference" if spec.objective == "dpo" else "instruction"
    task = spec.task
    if task.path is not None:
        records = _read_jsonl_task(task.path, base_dir, kind)
        keys = [(normalise(record_content(r, kind)), normalise(user_message(r))) for r in records]
    else:
        functions = corpus_functions(data.directory / data.result.documents, STAGE)
        if kind == "instruction":
            records = [f.instruction_record() for f in functions]
        else:
            records = [f.preference_record(task.seed) for f in functions]
        keys = [(normalise(f.source), normalise(user_message(r))) for f, r in zip(functions, records, strict=True)]
    unique: list[dict[str, Any]] = []
    split_keys: list[str] = []
    seen: set[str] = set()
    for record, (content_key, prompt_key) in zip(records, keys, strict=True):
        if content_key in seen:
            continue
        seen.add(content_key)
        unique.append(record)
        split_keys.append(prompt_key)
    train, test = split_by_prompt(unique, split_keys, task.test_fraction)
    if not train or not test:
        side = "training" if not train else "test"
        raise StageError(
            STAGE,
            f"the task has {len(unique)} distinct example(s), which leaves the {side} split empty; "
            f"add examples to spec.finetune.task or change spec.finetune.task.test_fraction",
        )
    capped = 0
    if task.max_examples is not None and len(train) > task.max_examples:
        keep = sorted(random.Random(task.seed).sample(range(len(train)), task.max_examples))
        capped = len(train) - len(keep)
        train = [train[i] for i in keep]
    stats = {
        "examples": len(records), "duplicates": len(records) - len(unique), "capped": capped,
        "train": len(train), "test": len(test),
    }
    return TaskSplits(kind, train, test, stats)


def _read_jsonl_task(path_text: str, base_dir: Path, kind: str) -> list[dict[str, Any]]:
    """Validated records of a user's JSONL task; every error names the file (as written) and the line."""
    path = Path(path_text)
    if not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise StageError(STAGE, f"spec.finetune.task.path: {path_text} does not exist (looked for {path})")
    required, optional = _FIELDS[kind]
    allowed = required + optional
    records: list[dict[str, Any]] = []
    ids: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            where = f"{path_text}:{number}"
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StageError(STAGE, f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(value, dict):
                raise StageError(STAGE, f"{where}: a record must be a JSON object, got {type(value).__name__}")
            for name in value:
                if name not in allowed:
                    raise StageError(
                        STAGE, f"{where}: unknown field '{name}' (a {kind} record has {', '.join(allowed)})"
                    )
            for name in allowed:
                if name not in value:
                    if name in required:
                        raise StageError(STAGE, f"{where}: field '{name}' is missing")
                    continue
                if not isinstance(value[name], str):
                    raise StageError(
                        STAGE, f"{where}: field '{name}' must be a string, got {type(value[name]).__name__}"
                    )
            for name in required:
                if not value[name].strip():
                    raise StageError(STAGE, f"{where}: '{name}' is empty")
            if kind == "preference" and value["chosen"] == value["rejected"]:
                raise StageError(STAGE, f"{where}: 'chosen' and 'rejected' are identical")
            record_id = value.get("id", f"{path.name}:{number}")
            if record_id in ids:
                raise StageError(STAGE, f"{where}: id '{record_id}' already used on line {ids[record_id]}")
            ids[record_id] = number
            record = {"id": record_id, **{name: value[name] for name in required}}
            if kind == "instruction":
                record["input"] = value.get("input", "")
                record = {name: record[name] for name in ("id", "instruction", "input", "output")}
            records.append(record)
    if not records:
        raise StageError(STAGE, f"{path_text}: the file holds no records")
    return records
