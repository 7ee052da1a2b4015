"""The fine-tuning task: examples read from the user's JSONL file or built from the corpus, deduplicated,
split into train and test (see `task_split`) and capped at `max_examples`.

The record kinds and the files the splits are written to are in `kubeforge.formats.splits`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kubeforge.errors import StageError
from kubeforge.formats.chat import user_message
from kubeforge.formats.functions import corpus_functions
from kubeforge.formats.jsonl import read_records
from kubeforge.formats.splits import TaskSplits
from kubeforge.formats.task_split import normalise, record_content, split_by_prompt

if TYPE_CHECKING:
    from kubeforge.context import StageOutput
    from kubeforge.spec.finetune import FinetuneSpec
    from kubeforge.stages.data import DataResult

STAGE = "finetune"

_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # kind: (required, optional)
    "instruction": (("instruction", "output"), ("input",)),
    "preference": (("prompt", "chosen", "rejected"), ()),
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
    required, optional = _FIELDS[kind]
    records = []
    for where, value in read_records(path_text, base_dir, stage=STAGE, field="spec.finetune.task.path",
                                     required=required, optional=optional):
        if kind == "preference" and value["chosen"] == value["rejected"]:
            raise StageError(STAGE, f"{where}: fields 'chosen' and 'rejected' are identical")
        if kind == "instruction":
            records.append({"id": value["id"], "instruction": value["instruction"], "input": value.get("input", ""),
                            "output": value["output"]})
        else:
            records.append({name: value[name] for name in ("id", *required)})
    return records
