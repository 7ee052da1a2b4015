"""The evaluate stage on the session's tiny pretrained Llama: alone, and as a fake fine-tuning output
compared with its base and a registered champion.

The fine-tuning output is built by hand (the pretrained model copied as the "merged" model and a few
held-out records of the python-docstrings kind), so these tests do not depend on training.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from kubeforge.context import StageContext, StageOutput
from kubeforge.errors import StageError
from kubeforge.spec.load import parse_manifest
from kubeforge.stages.finetune import FinetuneResult
from tests.stage_fixtures import TinyLM, finetune_result

pytestmark = pytest.mark.integration

INSTRUCTION = "Write the body of this Python function."
# Held-out records as the built-in task writes them: two with doctests that their reference passes
# (one needs its module's globals), one method, one without doctests.
RECORDS: list[dict[str, Any]] = [
    {
        "id": "stdlib/demo.py::add", "instruction": INSTRUCTION,
        "input": 'def add(a, b):\n    """Add two numbers.\n\n    >>> add(2, 3)\n    5\n    """\n',
        "output": "    return a + b\n",
        "entry_point": "add", "qualname": "add", "module": None, "has_doctests": True,
    },
    {
        "id": "stdlib/demo.py::letters", "instruction": INSTRUCTION,
        "input": 'def letters(n):\n    """The first n letters.\n\n    >>> letters(3)\n    \'abc\'\n    """\n',
        "output": "    return ascii_lowercase[:n]\n",
        "entry_point": "letters", "qualname": "letters", "module": "string", "has_doctests": True,
    },
    {
        "id": "stdlib/demo.py::twice", "instruction": INSTRUCTION,
        "input": 'def twice(x):\n    """Double x."""\n',
        "output": "    return 2 * x\n",
        "entry_point": "twice", "qualname": "twice", "module": None, "has_doctests": False,
    },
    {
        "id": "stdlib/demo.py::negate", "instruction": INSTRUCTION,
        "input": 'def negate(flag):\n    """Not flag."""\n',
        "output": "    return not flag\n",
        "entry_point": "negate", "qualname": "negate", "module": None, "has_doctests": False,
    },
]
SECTION: dict[str, Any] = {"max_examples": 4, "max_new_tokens": 24, "perplexity_batches": 4, "batch_size": 4}


def fake_finetune(
    tiny_lm: TinyLM, name: str, records: list[dict[str, Any]], copy_model: bool = True
) -> StageOutput[FinetuneResult]:
    """A finished fine-tuning stage as `kubeforge.finetune.stage` leaves it, without training."""
    directory = tiny_lm.root / f"{name}-finetune"
    base = tiny_lm.pretrain.directory / tiny_lm.pretrain.result.model_dir
    if copy_model:
        shutil.copytree(base, directory / "merged")
    (directory / "task").mkdir(parents=True)
    (directory / "task" / "train.jsonl").write_text("")
    (directory / "task" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = finetune_result(base_model_dir=str(base.resolve()), num_test_examples=len(records))
    return StageOutput("finetune", "fixture", directory, result, None)


def finetune_context(tiny_lm: TinyLM, name: str, section: dict[str, Any], finetune: StageOutput) -> StageContext:
    ctx = tiny_lm.context("evaluate", section, name)
    manifest = ctx.pipeline.model_dump(mode="json", exclude_none=True)
    manifest["spec"]["finetune"] = {"task": {"builtin": "python-docstrings", "test_fraction": 0.1}}
    ctx.pipeline = parse_manifest(manifest)
    ctx.inputs["finetune"] = finetune
    return ctx


def run_stage(ctx: StageContext) -> dict[str, Any]:
    from kubeforge.evaluate.stage import run

    assert ctx.pipeline.spec.evaluate is not None
    return run(ctx.pipeline.spec.evaluate, ctx)


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as handle:
        return {row["model"]: row for row in csv.DictReader(handle)}


def test_the_pretrained_model_alone_gets_a_held_out_perplexity(tiny_lm: TinyLM) -> None:
    ctx = tiny_lm.context("evaluate", {"perplexity_batches": 8, "batch_size": 8}, "evaluate-alone")
    result = run_stage(ctx)

    perplexity = result.candidate["perplexity"]
    reported = tiny_lm.pretrain.result.val_perplexity
    assert math.isfinite(perplexity)
    assert reported / 2 < perplexity < reported * 2, (perplexity, reported)
    assert result.base is None and result.champion is None and result.champion_version is None
    assert result.task is None and result.num_examples == 0
    assert result.perplexity_split in ("test", "validation")
    assert result.candidate["bleu"] is None
    assert any("no champion" in line for line in ctx.reporter.lines)  # type: ignore[attr-defined]

    table = read_csv(ctx.out_dir / "comparison.csv")
    assert list(table) == ["candidate"] and float(table["candidate"]["perplexity"]) == pytest.approx(perplexity, 1e-4)
    assert table["candidate"]["bleu"] == ""
    assert result.plots == ["plots/perplexity.png"]
    run = ctx.tracker.client.get_run(ctx.tracker.run_id)
    assert run.data.metrics["eval.perplexity"] == pytest.approx(perplexity)
    assert run.data.metrics["eval.candidate.perplexity"] == pytest.approx(perplexity)


def test_a_finetuned_candidate_is_compared_with_its_base_and_the_champion(tiny_lm: TinyLM) -> None:
    from mlflow.tracking import MlflowClient

    from kubeforge.metrics import REGISTRY

    client = MlflowClient(tiny_lm.tracking_uri)
    champion_name = "tinylm-evaluate-champion"
    client.create_registered_model(champion_name)
    version = client.create_model_version(
        champion_name, f"runs:/{tiny_lm.pretrain.mlflow_run_id}/model", run_id=tiny_lm.pretrain.mlflow_run_id
    )
    # Production serves a quantized child of that version; its source holds no Hugging Face folder, so
    # scoring it instead of its parent would fail the stage.
    quantized = client.create_model_version(
        champion_name, f"runs:/{tiny_lm.data.mlflow_run_id}/no-model-here", run_id=tiny_lm.data.mlflow_run_id,
        tags={"kubeforge.role": "quantized", "kubeforge.parent_version": str(version.version)},
    )
    client.set_registered_model_alias(champion_name, "champion", quantized.version)

    finetune = fake_finetune(tiny_lm, "compare", RECORDS)
    ctx = finetune_context(tiny_lm, "evaluate-compare", {**SECTION, "champion": champion_name}, finetune)
    result = run_stage(ctx)

    assert result.task == {"kind": "instruction", "name": "python-docstrings"}
    assert result.num_examples == 4 and result.champion_version == str(quantized.version)
    assert result.champion_scored_version == str(version.version)
    candidate, base, champion = result.candidate, result.base, result.champion
    for scores in (candidate, base, champion):
        assert math.isfinite(scores["perplexity"])
        assert 0 <= scores["exact_match"] <= 1 and 0 <= scores["bleu"] <= 100 and 0 <= scores["rouge_l"] <= 1
        assert 0 <= scores["parse_rate"] <= 1
        # Both references pass their doctests, so every model has a doctest pass rate.
        assert scores["doctest_pass_rate"] is not None and 0 <= scores["doctest_pass_rate"] <= 1
    # The candidate is a copy of its base and of the champion: same weights, same greedy answers.
    assert candidate["perplexity"] == pytest.approx(base["perplexity"], rel=1e-5)
    assert candidate["perplexity"] == pytest.approx(champion["perplexity"], rel=1e-5)
    assert candidate["rouge_l"] == pytest.approx(base["rouge_l"])

    table = read_csv(ctx.out_dir / "comparison.csv")
    assert list(table) == ["candidate", "base", "champion"]
    assert float(table["candidate"]["perplexity_vs_base"]) == pytest.approx(0.0, abs=1e-3)
    assert float(table["candidate"]["bleu_vs_champion"]) == pytest.approx(0.0, abs=1e-6)
    assert table["base"]["perplexity_vs_base"] == ""
    assert "| champion |" in (ctx.out_dir / "comparison.md").read_text()
    assert sorted(result.plots) == ["plots/bleu.png", "plots/generation.png", "plots/perplexity.png"]

    samples = [json.loads(line) for line in (ctx.out_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["id"] for s in samples] == [r["id"] for r in RECORDS]
    assert samples[0]["prompt"].endswith("### Assistant:\n") and samples[0]["reference"] == "    return a + b\n"
    assert [s["reference_passes_doctests"] for s in samples] == [True, True, None, None]
    assert all(isinstance(s["generation"], str) and isinstance(s["parses"], bool) for s in samples)

    run = ctx.tracker.client.get_run(ctx.tracker.run_id)
    for name in ("eval.bleu", "eval.candidate.rouge_l", "eval.base.perplexity", "eval.champion.exact_match",
                 "eval.doctest_pass_rate", "eval.parse_rate"):
        assert name in run.data.metrics, name
    artifacts = {a.path for a in ctx.tracker.client.list_artifacts(ctx.tracker.run_id)}
    assert {"comparison.csv", "comparison.md", "samples.jsonl", "plots", "evaluation.json"} <= artifacts
    plots = {a.path for a in ctx.tracker.client.list_artifacts(ctx.tracker.run_id, "plots")}
    assert "plots/generation.png" in plots
    gauge = REGISTRY.get_sample_value(
        "kubeforge_eval_metric", {"pipeline": "tinylm", "model": "champion", "metric": "perplexity"}
    )
    assert gauge == pytest.approx(champion["perplexity"])


def test_a_missing_finetuned_model_folder_is_named(tiny_lm: TinyLM) -> None:
    finetune = fake_finetune(tiny_lm, "missing", RECORDS, copy_model=False)
    ctx = finetune_context(tiny_lm, "evaluate-missing", SECTION, finetune)
    with pytest.raises(StageError, match=r"model folder .*missing-finetune/merged does not exist"):
        run_stage(ctx)


def test_an_empty_test_split_says_how_to_get_one(tiny_lm: TinyLM) -> None:
    finetune = fake_finetune(tiny_lm, "empty", [])
    ctx = finetune_context(tiny_lm, "evaluate-empty", SECTION, finetune)
    with pytest.raises(StageError, match=r"test split .* is empty; raise spec.finetune.task.test_fraction \(now 0.1\)"):
        run_stage(ctx)



def test_a_prefix_tuned_candidate_is_scored_through_its_adapter(tiny_lm: TinyLM) -> None:
    """Prefix tuning leaves no merged model: the candidate is the base with the adapter on top."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    finetune = fake_finetune(tiny_lm, "prefix", RECORDS[:2], copy_model=False)
    base = Path(finetune.result.base_model_dir)
    adapter = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base)), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    adapter.save_pretrained(str(finetune.directory / "adapter"))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(finetune.directory / "adapter"))
    finetune = dataclasses.replace(
        finetune, result=dataclasses.replace(finetune.result, model_dir=None, adapter_dir="adapter", method="prefix")
    )

    ctx = finetune_context(tiny_lm, "evaluate-prefix", SECTION, finetune)
    result = run_stage(ctx)

    assert result.num_examples == 2 and result.champion is None
    # The untrained prefix changes the model's predictions, so its perplexity differs from the base's.
    assert math.isfinite(result.candidate["perplexity"])
    assert result.candidate["perplexity"] != pytest.approx(result.base["perplexity"], rel=1e-6)
    assert result.candidate["rouge_l"] is not None and result.candidate["doctest_pass_rate"] is not None
