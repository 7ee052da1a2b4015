"""The evaluate stage's lm-evaluation-harness tasks without a model: task files, metric names, the report,
gates on harness metrics and the shipped tasks' data."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from kubeforge.errors import StageError
from kubeforge.evaluate.compare import columns, comparison_rows, write_plots, write_table
from kubeforge.evaluate.harness import (
    SHIPPED_DIR,
    check_gates,
    collect_metrics,
    metric_name,
    prepare,
    read_task_dir,
    write_stdlib_data,
)
from kubeforge.promote.gates import candidate_value
from kubeforge.spec.evaluate import SHIPPED_HARNESS_TASKS, HarnessSpec
from kubeforge.spec.load import parse_manifest
from kubeforge.spec.promotion import Gate
from tests.unit.test_spec_promotion import BASE
from tests.unit.test_spec_stages import problems

pytestmark = pytest.mark.unit

TASK = """\
task: my_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/test.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
"""


def task_dir(tmp_path: Path, text: str = TASK, name: str = "my_qa.yaml") -> Path:
    folder = tmp_path / "tasks"
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "test.jsonl").write_text('{"question": "1+1=", "answer": "2"}\n')
    (folder / name).write_text(text)
    return folder


# ---------------------------------------------------------------------------------------------
# task files


def test_a_local_task_folder_is_read_with_absolute_data_files(tmp_path: Path) -> None:
    folder = task_dir(tmp_path)
    tasks = read_task_dir(folder)
    assert list(tasks) == ["my_qa"]
    assert tasks["my_qa"].data_files == {"test": str((folder / "data" / "test.jsonl").resolve())}
    assert tasks["my_qa"].metric_names() == {"harness_my_qa_exact_match": False}


@pytest.mark.parametrize("dataset_path", ["openai/gsm8k", "hellaswag", "arrow_remote"])
def test_a_hub_dataset_is_refused_naming_the_field_and_file(tmp_path: Path, dataset_path: str) -> None:
    folder = task_dir(tmp_path, TASK.replace("dataset_path: json", f"dataset_path: {dataset_path}"))
    with pytest.raises(StageError, match=r"spec\.evaluate\.harness\.task_dir: .*my_qa\.yaml: dataset_path "
                                         rf"'{dataset_path}' is not a local loader"):
        read_task_dir(folder)


@pytest.mark.parametrize("files", ["https://example.com/test.jsonl", "hf://datasets/x/test.jsonl"])
def test_remote_data_files_are_refused(tmp_path: Path, files: str) -> None:
    folder = task_dir(tmp_path, TASK.replace("test: data/test.jsonl", f"test: {files}"))
    with pytest.raises(StageError, match=r"task_dir: .*my_qa\.yaml: dataset_kwargs\.data_files names .* not a local"):
        read_task_dir(folder)


def test_missing_data_files_and_custom_loaders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"data_files names data/gone\.jsonl, which does not exist"):
        read_task_dir(task_dir(tmp_path / "a", TASK.replace("data/test.jsonl", "data/gone.jsonl")))
    with pytest.raises(StageError, match=r"dataset_kwargs\.data_files is missing"):
        read_task_dir(task_dir(tmp_path / "b", TASK.replace("  data_files:\n    test: data/test.jsonl\n", "  {}\n")))
    with pytest.raises(StageError, match=r"custom_dataset runs code"):
        read_task_dir(task_dir(tmp_path / "c", TASK + "custom_dataset: !function utils.load\n"))


def test_a_task_file_that_does_not_parse_is_named_with_its_line(tmp_path: Path) -> None:
    folder = task_dir(tmp_path, TASK + "metric_list: [unclosed\n")
    with pytest.raises(StageError, match=r"spec\.evaluate\.harness\.task_dir: .*my_qa\.yaml is not valid YAML "
                                         r"\(line \d+\)"):
        read_task_dir(folder)
    with pytest.raises(StageError, match=r"must hold a mapping"):
        read_task_dir(task_dir(tmp_path / "list", "- task: x\n"))


def test_task_names_groups_and_includes(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"task must name the task in lower-case letters .*'My-QA'"):
        read_task_dir(task_dir(tmp_path / "a", TASK.replace("task: my_qa", "task: My-QA")))
    with pytest.raises(StageError, match=r"is the name of a shipped task"):
        read_task_dir(task_dir(tmp_path / "b", TASK.replace("task: my_qa", "task: stdlib_complete")))
    with pytest.raises(StageError, match=r"is a group config"):
        read_task_dir(task_dir(tmp_path / "c", "group: mine\n"))
    # `include:` is merged under the file, as the harness does, so the included loader is checked too.
    folder = task_dir(tmp_path / "d", "include: base.txt\ntask: my_qa\n")
    (folder / "base.txt").write_text(TASK.replace("task: my_qa\n", "").replace("dataset_path: json", "dataset_path: x/y"))
    with pytest.raises(StageError, match=r"dataset_path 'x/y' is not a local loader"):
        read_task_dir(folder)


def test_every_shipped_task_file_names_local_data_only(tmp_path: Path) -> None:
    prepared = prepare(HarnessSpec(), tmp_path, tmp_path, [])
    assert [t.name for t in prepared.tasks] == list(SHIPPED_HARNESS_TASKS)
    assert sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml")) == sorted(SHIPPED_HARNESS_TASKS)
    for task in prepared.tasks:
        assert task.config["dataset_path"] == "json"
        assert all(Path(f).is_file() and Path(f).is_relative_to(tmp_path) for f in task.data_files.values())
    assert prepared.lower_is_better == {
        "harness_stdlib_funcname_acc": False, "harness_stdlib_funcname_acc_norm": False,
        "harness_stdlib_complete_exact_match": False,
    }


def test_unknown_tasks_are_refused_in_the_manifest_and_at_run_time(tmp_path: Path) -> None:
    document = copy.deepcopy(BASE)
    document["spec"]["evaluate"] = {"harness": {"tasks": ["stdlib_funcname", "hellaswag"]}}
    assert problems(document) == [
        "spec.evaluate.harness.tasks: unknown task 'hellaswag' (shipped: stdlib_funcname, stdlib_complete; set "
        "task_dir to a folder of your own task YAML files)"
    ]
    folder = task_dir(tmp_path)
    with pytest.raises(StageError, match=r"spec\.evaluate\.harness\.tasks: unknown task 'hellaswag' .*"
                                         r"in task_dir: my_qa"):
        prepare(HarnessSpec(tasks=["hellaswag"], task_dir=str(folder)), tmp_path / "out", tmp_path, [])


def test_the_shipped_data_is_deterministic_and_well_formed(tmp_path: Path) -> None:
    first, second = write_stdlib_data(tmp_path / "a"), write_stdlib_data(tmp_path / "b")
    for task in SHIPPED_HARNESS_TASKS:
        text = (first[task] / "test.jsonl").read_text()
        assert text == (second[task] / "test.jsonl").read_text()
        rows = [json.loads(line) for line in text.splitlines()]
        assert len(rows) >= 50
    for row in map(json.loads, (first["stdlib_funcname"] / "test.jsonl").read_text().splitlines()):
        assert len(set(row["choices"])) == 4 and 0 <= row["label"] < 4
        assert row["choices"][row["label"]] not in row["docstring"].split()
    for row in map(json.loads, (first["stdlib_complete"] / "test.jsonl").read_text().splitlines()):
        assert row["prompt"].startswith("def ") and row["target"] == row["target"].strip()


# ---------------------------------------------------------------------------------------------
# metric names and the report


def test_metric_names_are_stable_and_gateable() -> None:
    assert metric_name("stdlib_funcname", "acc") == "harness_stdlib_funcname_acc"
    assert metric_name("my_qa", "exact_match", "strict-match") == "harness_my_qa_exact_match_strict_match"
    results = {
        "stdlib_funcname": {"alias": "stdlib_funcname", "acc,none": 0.25, "acc_stderr,none": 0.1, "acc_norm,none": 0.5},
        "stdlib_complete": {"exact_match,none": float("nan"), "exact_match,flexible-extract": 1},
        "not_listed": {"acc,none": 1.0},
    }
    assert collect_metrics(results, ["stdlib_funcname", "stdlib_complete"]) == {
        "harness_stdlib_funcname_acc": 0.25, "harness_stdlib_funcname_acc_norm": 0.5,
        "harness_stdlib_complete_exact_match": None, "harness_stdlib_complete_exact_match_flexible_extract": 1.0,
    }
    for name in ("harness_stdlib_funcname_acc", "harness_my_qa_exact_match_strict_match"):
        Gate(metric=f"evaluate.{name}", min=0.1)  # the gate pattern accepts it


def test_harness_metrics_join_the_comparison_report(tmp_path: Path) -> None:
    scores: dict[str, dict[str, float | None]] = {
        "candidate": {"perplexity": 9.0, "harness_stdlib_funcname_acc": 0.5, "harness_stdlib_complete_exact_match": 0.1},
        "base": {"perplexity": 10.0, "harness_stdlib_funcname_acc": 0.25, "harness_stdlib_complete_exact_match": None},
    }
    rows = comparison_rows(scores)
    assert rows[0]["harness_stdlib_funcname_acc"] == 0.5
    assert rows[0]["harness_stdlib_funcname_acc_vs_base"] == pytest.approx(0.25)
    assert rows[0]["harness_stdlib_complete_exact_match_vs_base"] is None
    header = columns(rows)
    assert "harness_stdlib_complete_exact_match" in header and "harness_stdlib_funcname_acc" in header
    assert "harness_stdlib_funcname_acc_vs_base" in header
    assert "harness_stdlib_complete_exact_match_vs_base" not in header  # no number: no column
    assert header.index("harness_stdlib_funcname_acc") < header.index("perplexity_vs_base")
    write_table(rows, tmp_path / "c.csv", tmp_path / "c.md")
    assert "harness_stdlib_funcname_acc_vs_base" in (tmp_path / "c.csv").read_text().splitlines()[0]
    assert [p.name for p in write_plots(scores, tmp_path / "plots")] == ["perplexity.png", "harness.png"]


# ---------------------------------------------------------------------------------------------
# promotion gates


def gates_document(metric: str, **condition: float) -> dict[str, Any]:
    document = copy.deepcopy(BASE)
    document["spec"]["evaluate"] = {"harness": {"tasks": ["stdlib_funcname"]}}
    document["spec"]["promotion"] = {"gates": [{"metric": metric, **(condition or {"min": 0.3})}]}
    return document


def test_gates_may_name_harness_metrics_and_read_them_from_the_result() -> None:
    from kubeforge.stages.evaluate import EvaluateResult

    parse_manifest(gates_document("evaluate.harness_stdlib_funcname_acc"))  # accepted
    assert problems(gates_document("evaluate.accuracy"))[0].startswith("spec.promotion.gates.0.metric: ")
    fields = dict.fromkeys(f for f in EvaluateResult.__dataclass_fields__ if f not in ("candidate", "champion"))
    result = EvaluateResult(**{**fields, "candidate": {"harness_stdlib_funcname_acc": 0.5},  # type: ignore[arg-type]
                               "champion": {"harness_stdlib_funcname_acc": 0.75}})
    gate = Gate(metric="evaluate.harness_stdlib_funcname_acc", max_regression=0.1)
    assert candidate_value(gate, {"evaluate": result}) == (0.5, 0.75)


def test_a_gate_on_a_metric_no_listed_task_produces_is_refused_before_scoring(tmp_path: Path) -> None:
    pipeline = parse_manifest(gates_document("evaluate.harness_stdlib_complete_exact_match"))
    assert pipeline.spec.promotion is not None and pipeline.spec.evaluate is not None
    harness = pipeline.spec.evaluate.harness
    assert harness is not None
    with pytest.raises(StageError, match=r"promotion\.gates\.0\.metric: the harness tasks in "
                                         r"spec\.evaluate\.harness\.tasks do not produce "
                                         r"'harness_stdlib_complete_exact_match' \(they produce: "
                                         r"harness_stdlib_funcname_acc, harness_stdlib_funcname_acc_norm\)"):
        prepare(harness, tmp_path, tmp_path, list(pipeline.spec.promotion.gates))
    check_gates([Gate(metric="evaluate.perplexity", min=1)], {})  # the fixed metrics are not its business
    with pytest.raises(StageError, match=r"promotion\.gates\.0\.max_regression: lower is better for harness_x_ppl"):
        check_gates([Gate(metric="evaluate.harness_x_ppl", max_regression=0.1)], {"harness_x_ppl": True})
