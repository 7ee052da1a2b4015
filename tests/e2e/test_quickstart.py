"""The quickstart, end to end, through the real CLI: what `make demo` runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def kubeforge(*args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).with_name("kubeforge")
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_quickstart_trains_a_model_perplexity_falls_and_a_rerun_skips_everything(tmp_path: Path) -> None:
    workdir = str(tmp_path / "work")
    first = kubeforge("run", "examples/quickstart.yaml", "--workdir", workdir, "--no-metrics")
    assert first.returncode == 0, first.stderr[-4000:]
    assert "succeeded" in first.stdout

    status = kubeforge("status", "--workdir", workdir, "-o", "json")
    (run,) = json.loads(status.stdout)
    assert run["state"] == "succeeded"
    assert [(s["name"], s["state"]) for s in run["stages"]] == [("data", "succeeded"), ("pretrain", "succeeded")]
    assert all(s["mlflow_run_id"] for s in run["stages"])

    stages = Path(workdir) / "pipelines" / "quickstart" / "stages"
    (pretrain_dir,) = stages.glob("pretrain-*")
    result = json.loads((pretrain_dir / "result.json").read_text())
    assert result["final_step"] == 300
    # "Well below its starting value": the untrained model is near-uniform over a 4096-token vocabulary.
    assert result["val_perplexity"] < 0.1 * result["initial_val_perplexity"], result

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = pretrain_dir / result["model_dir"]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer("def ", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]

    second = kubeforge("run", "examples/quickstart.yaml", "--workdir", workdir, "--no-metrics")
    assert second.returncode == 0, second.stderr[-4000:]
    status = kubeforge("status", "--workdir", workdir, "-o", "json", "--limit", "1")
    (rerun,) = json.loads(status.stdout)
    assert [s["state"] for s in rerun["stages"]] == ["skipped", "skipped"]
