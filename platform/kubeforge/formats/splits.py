"""The fine-tuning task's splits on disk: `train.jsonl`, `test.jsonl` and `task.json` in one folder.

The fine-tuning stage writes them once (its `task/` folder) and trains on `train`; the evaluate stage
scores on `test`. Two kinds of record:

* instruction (objectives `sft` and `distill`): `{"id", "instruction", "input", "output"}`; the built-in
  task adds `entry_point`, `qualname`, `module` and `has_doctests` so that evaluation can run the code;
* preference (objective `dpo`): `{"id", "prompt", "chosen", "rejected"}` (the built-in task adds the same
  metadata).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kubeforge.errors import StageError

STAGE = "finetune"
"""The splits are the fine-tuning stage's output: a missing one is that stage's to write, whoever reads it."""


@dataclass(frozen=True)
class TaskSplits:
    kind: Literal["instruction", "preference"]
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    stats: dict[str, int] = field(default_factory=dict)
    """Counts for the stage's log and task.json: examples found, duplicates dropped, training examples
    left out by `max_examples`."""


def write_splits(splits: TaskSplits, out_dir: Path) -> None:
    """`train.jsonl`, `test.jsonl` and `task.json` (kind and counts) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", splits.train), ("test", splits.test)):
        with (out_dir / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary = {"kind": splits.kind, "train": len(splits.train), "test": len(splits.test), **splits.stats}
    (out_dir / "task.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def read_split(task_dir: Path, split: str) -> list[dict[str, Any]]:
    """The records `write_splits` wrote for `split` ("train" or "test")."""
    path = task_dir / f"{split}.jsonl"
    if not path.is_file():
        raise StageError(STAGE, f"{path} does not exist; the task's splits were not written")
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
