"""lm-evaluation-harness in the evaluate stage, offline, on the session's tiny pretrained Llama: a fake
fine-tuning output (the pretrained model copied) compared with its base on both shipped tasks and a task
from a user's folder, and the metrics in the result, the comparison table and MLflow."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from tests.integration.test_evaluate import RECORDS, fake_finetune, finetune_context, run_stage
from tests.stage_fixtures import TinyLM

pytestmark = pytest.mark.integration

USER_TASK = """\
task: tiny_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: questions.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}} ="
doc_to_choice: choices
doc_to_target: label
"""


def test_harness_tasks_score_candidate_and_base_offline(
    tiny_lm: TinyLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Any attempt to reach the network fails loudly instead of silently downloading.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    (folder / "arith.yaml").write_text(USER_TASK)
    (folder / "questions.jsonl").write_text("".join(
        f'{{"question": "{a} + {a}", "choices": ["{2 * a}", "{2 * a + 1}"], "label": 0}}\n' for a in range(4)
    ))
    section = {"max_examples": 1, "max_new_tokens": 8, "perplexity_batches": 1, "batch_size": 4,
               "harness": {"limit": 10, "task_dir": str(folder),
                           "tasks": ["stdlib_funcname", "stdlib_complete", "tiny_arith"]}}
    finetune = fake_finetune(tiny_lm, "harness", [RECORDS[2]])
    ctx = finetune_context(tiny_lm, "evaluate-harness", section, finetune)

    result = run_stage(ctx)

    expected = ["harness_stdlib_complete_exact_match", "harness_stdlib_funcname_acc",
                "harness_stdlib_funcname_acc_norm", "harness_tiny_arith_acc", "harness_tiny_arith_acc_norm"]
    assert result.harness is not None and result.harness["metrics"] == expected
    assert result.harness["limit"] == 10 and result.harness["tasks"][-1] == "tiny_arith"
    for scores in (result.candidate, result.base):
        assert scores is not None
        for name in expected:
            assert scores[name] is not None and 0.0 <= scores[name] <= 1.0, (name, scores[name])
    # The candidate is a copy of its base: the same model scores the same on the same questions.
    assert result.base is not None
    assert result.candidate["harness_stdlib_funcname_acc"] == result.base["harness_stdlib_funcname_acc"]
    assert (ctx.out_dir / "harness" / "data" / "stdlib_funcname" / "test.jsonl").is_file()

    with (ctx.out_dir / "comparison.csv").open() as handle:
        table = {row["model"]: row for row in csv.DictReader(handle)}
    assert float(table["candidate"]["harness_stdlib_funcname_acc"]) == pytest.approx(
        result.candidate["harness_stdlib_funcname_acc"])
    assert float(table["candidate"]["harness_stdlib_funcname_acc_vs_base"]) == 0.0
    assert "plots/harness.png" in result.plots

    logged = ctx.tracker.client.get_run(ctx.tracker.run_id).data.metrics
    for name in expected:
        assert math.isclose(logged[f"eval.{name}"], result.candidate[name])
        assert f"eval.base.{name}" in logged
