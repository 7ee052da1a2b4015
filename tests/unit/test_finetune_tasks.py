"""The fine-tuning task: built-in and JSONL examples, deduplicated and split, and the splits written to disk."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

from kubeforge.context import StageOutput
from kubeforge.errors import StageError
from kubeforge.finetune.task_files import load_task
from kubeforge.formats.splits import read_split, write_splits
from kubeforge.spec.finetune import FinetuneSpec
from tests.data_fixtures import data_result

pytestmark = pytest.mark.unit

GEOMETRY = '''"""Shapes."""

import functools
import math


def area(radius):
    """Area of a circle.

    >>> round(area(1.0), 2)
    3.14
    """
    if radius < 0:
        raise ValueError("negative radius")
    return math.pi * radius ** 2


def stub():
    """Only a docstring: nothing to learn."""


@functools.lru_cache
def clamp(value, low=0, high=10):
    """Clamp value between low and high."""
    if value < low:
        return low
    if value > high:
        return high
    return value


def undocumented(x):
    return x + 1


class Tally:
    """Counts things."""

    def __init__(self):
        """Start at zero."""
        self.count = 0
        self.total = 0

    @property
    def double(self):
        """Twice the count, plus the length of a string that starts at column 0."""
        text = """
kept as is
"""
        return self.count * 2 + len(text)
'''

# `clamp` again, with other formatting around it: the built-in task must keep one copy.
HELPERS = (
    '"""Helpers."""\n\n\n'
    + "\n\n".join(
        f'def add_{i}(x):\n    """Return x plus {i}."""\n    total = x + {i}\n    return total\n' for i in range(30)
    )
    + '\n\n@functools.lru_cache\ndef clamp(value, low=0, high=10):\n    """Clamp value between low and high."""\n'
    "    if value < low:\n        return low   \n\n    if value > high:\n        return high\n    return value\n"
)
DOCUMENTS = [
    ("stdlib/shapes/geometry.py", GEOMETRY),
    ("stdlib/helpers.py", HELPERS),
    ("stdlib/broken.py", "def broken(:\n    pass\n"),
    ("stdlib/shapes/__main__.py", 'def main():\n    """Run."""\n    return 0\n'),
]


@pytest.fixture
def data(tmp_path: Path) -> StageOutput:
    import pandas as pd

    out = tmp_path / "data"
    out.mkdir()
    frame = pd.DataFrame({
        "id": [doc_id for doc_id, _ in DOCUMENTS],
        "source": [f"/somewhere/lib/python3.11/{doc_id.removeprefix('stdlib/')}" for doc_id, _ in DOCUMENTS],
        "text": [text for _, text in DOCUMENTS],
        "split": ["train"] * len(DOCUMENTS),
    })
    frame.to_parquet(out / "documents.parquet", index=False)
    return StageOutput(name="data", key="k", directory=out, result=data_result(), mlflow_run_id=None)


def _spec(**task: Any) -> FinetuneSpec:
    objective = task.pop("objective", "sft")
    return FinetuneSpec.model_validate({"objective": objective, "task": task})


def _original_functions() -> dict[str, str]:
    """ast.dump of every function and method of the documents, by name."""
    found = {}
    for doc_id, text in DOCUMENTS:
        if doc_id == "stdlib/broken.py":
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef):
                found[node.name] = ast.dump(node)
    return found


# ---------------------------------------------------------------------------------------------
# built-in task


def test_builtin_task_splits_by_function_and_keeps_whole_functions(data: StageOutput, tmp_path: Path) -> None:
    splits = load_task(_spec(builtin="python-docstrings", test_fraction=0.3), tmp_path, data)
    records = splits.train + splits.test
    assert splits.kind == "instruction"
    assert splits.train and splits.test
    assert len({r["id"] for r in records}) == len(records)
    assert not {r["input"] + r["output"] for r in splits.train} & {r["input"] + r["output"] for r in splits.test}
    names = [r["entry_point"] for r in records]
    assert names.count("clamp") == 1
    assert splits.stats["duplicates"] == 1
    # Neither stubs nor undocumented functions nor files that do not parse.
    assert "stub" not in names and "undocumented" not in names and "broken" not in names
    assert sorted(n for n in names if not n.startswith("add_")) == ["__init__", "area", "clamp", "double", "main"]

    originals = _original_functions()
    for record in records:
        tree = ast.parse(record["input"] + record["output"])
        assert ast.dump(tree.body[0]) == originals[record["entry_point"]], record["id"]
        assert record["input"].startswith(("def ", "@"))  # methods are dedented to column 0
        assert record["output"].strip()
    by_name = {r["entry_point"]: r for r in records}
    assert by_name["double"]["input"].startswith("@property\ndef double(self):\n")
    assert by_name["double"]["qualname"] == "Tally.double"
    assert by_name["area"]["has_doctests"] and not by_name["clamp"]["has_doctests"]
    assert by_name["area"]["module"] == "shapes.geometry"
    assert by_name["add_3"]["module"] == "helpers"
    assert by_name["main"]["module"] is None


def test_split_is_stable_across_seeds_and_max_examples_caps_training_only(data: StageOutput, tmp_path: Path) -> None:
    first = load_task(_spec(builtin="python-docstrings", test_fraction=0.3, seed=0), tmp_path, data)
    other = load_task(_spec(builtin="python-docstrings", test_fraction=0.3, seed=5), tmp_path, data)
    assert [r["id"] for r in first.test] == [r["id"] for r in other.test]
    capped = load_task(_spec(builtin="python-docstrings", test_fraction=0.3, max_examples=3), tmp_path, data)
    assert len(capped.train) == 3 and capped.stats["capped"] == len(first.train) - 3
    assert capped.test == first.test

    write_splits(capped, tmp_path / "task")
    assert read_split(tmp_path / "task", "train") == capped.train
    assert read_split(tmp_path / "task", "test") == capped.test
    summary = json.loads((tmp_path / "task" / "task.json").read_text())
    assert (summary["kind"], summary["train"], summary["test"]) == ("instruction", 3, len(first.test))


def test_builtin_dpo_pairs_reject_a_wrong_but_parseable_body(data: StageOutput, tmp_path: Path) -> None:
    splits = load_task(_spec(builtin="python-docstrings", objective="dpo", seed=1), tmp_path, data)
    assert splits.kind == "preference"
    for record in splits.train + splits.test:
        assert record["chosen"].strip() and record["rejected"].strip()
        assert record["rejected"] != record["chosen"]
        header = record["prompt"].split("\n\n", 1)[1]
        ast.parse(header + record["rejected"])
        ast.parse(header + record["chosen"])
    again = load_task(_spec(builtin="python-docstrings", objective="dpo", seed=1), tmp_path, data)
    assert again.train == splits.train


def test_builtin_task_without_python_sources_says_what_to_change(data: StageOutput, tmp_path: Path) -> None:
    import pandas as pd

    pd.DataFrame({"id": ["a.txt"], "source": ["a.txt"], "text": ["just prose"], "split": ["train"]}).to_parquet(
        data.directory / "documents.parquet", index=False
    )
    with pytest.raises(StageError, match=r"no function with a docstring .* needs Python sources"):
        load_task(_spec(builtin="python-docstrings"), tmp_path, data)


# ---------------------------------------------------------------------------------------------
# JSONL tasks


def _write(tmp_path: Path, lines: list[str]) -> None:
    (tmp_path / "tasks.jsonl").write_text("".join(line + "\n" for line in lines))


def test_jsonl_instruction_task(data: StageOutput, tmp_path: Path) -> None:
    lines = [json.dumps({"instruction": f"Say {i}.", "output": str(i)}) for i in range(20)]
    lines.append(json.dumps({"instruction": "Say 3.", "output": "3"}))  # a duplicate
    lines.append(json.dumps({"id": "mine", "instruction": "Add", "input": "1 2", "output": "3"}))
    _write(tmp_path, [*lines, ""])
    splits = load_task(_spec(path="tasks.jsonl", test_fraction=0.2), tmp_path, data)
    records = splits.train + splits.test
    assert len(records) == 21 and splits.stats["duplicates"] == 1
    assert {r["input"] for r in records} == {"", "1 2"}
    assert set(records[0]) == {"id", "instruction", "input", "output"}
    assert "mine" in {r["id"] for r in records}


@pytest.mark.parametrize(
    ("objective", "lines", "message"),
    [
        ("sft", ['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": '],
         r"tasks\.jsonl:2: not valid JSON \("),
        ("sft", ['["instruction", "output"]'], r"tasks\.jsonl:1: a record must be a JSON object, got list"),
        ("sft", ['{"instruction": "a", "output": "b"}', "", '{"instruction": "a"}'],
         r"tasks\.jsonl:3: field 'output' is missing"),
        ("sft", ['{"instruction": "a", "output": 3}'], r"tasks\.jsonl:1: field 'output' must be a string, got int"),
        ("sft", ['{"instruction": "a", "output": "b", "notes": "x"}'], r"tasks\.jsonl:1: unknown field 'notes'"),
        ("sft", ['{"instruction": "a", "output": "  "}'], r"tasks\.jsonl:1: field 'output' is empty"),
        ("dpo", ['{"prompt": "p", "chosen": "c", "rejected": "r"}', '{"prompt": "p", "chosen": "c", "rejected": ""}'],
         r"tasks\.jsonl:2: field 'rejected' is empty"),
        ("dpo", ['{"prompt": "p", "chosen": "c", "rejected": "c"}'], r"tasks\.jsonl:1: fields 'chosen' and 'rejected' are identical"),
        ("dpo", ['{"instruction": "a", "output": "b"}'], r"tasks\.jsonl:1: unknown field 'instruction'"),
        ("sft", [""], r"spec\.finetune\.task\.path: tasks\.jsonl holds no records"),
    ],
)
def test_jsonl_errors_name_file_and_line(
    data: StageOutput, tmp_path: Path, objective: str, lines: list[str], message: str
) -> None:
    _write(tmp_path, lines)
    with pytest.raises(StageError, match=message):
        load_task(_spec(path="tasks.jsonl", objective=objective), tmp_path, data)


def test_missing_task_file_names_the_field(data: StageOutput, tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"spec\.finetune\.task\.path: nope\.jsonl does not exist"):
        load_task(_spec(path="nope.jsonl"), tmp_path, data)


def test_a_single_example_cannot_fill_both_splits(data: StageOutput, tmp_path: Path) -> None:
    _write(tmp_path, ['{"instruction": "a", "output": "b"}'])
    with pytest.raises(StageError, match=r"1 distinct example\(s\).*change spec\.finetune\.task\.test_fraction"):
        load_task(_spec(path="tasks.jsonl"), tmp_path, data)
    _write(tmp_path, ['{"instruction": "a", "output": "b"}', '{"instruction": "c", "output": "d"}'])
    splits = load_task(_spec(path="tasks.jsonl", test_fraction=0.01), tmp_path, data)
    assert len(splits.train) == len(splits.test) == 1
