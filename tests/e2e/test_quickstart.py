"""The quickstart, end to end, through the real CLI: what `make demo` runs.

One run of the whole lifecycle carries three checks, because each run of it costs minutes on two
cores: the run is killed mid-pretraining (taking its local Ray runtime down, as a node failure or an
OOM-killed pod would) and resumes from the last checkpoint in the same MLflow run; a real Prometheus
scrapes it while it works; and a rerun of the finished pipeline skips every stage. The registry
part checks the lineage of the three versions it registers and the `kubeforge models` commands.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.dashboards import DASHBOARDS, panel_queries, queries_without_data
from tests.helpers import free_port, running_prometheus

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
KUBEFORGE = str(Path(sys.executable).with_name("kubeforge"))


def kubeforge(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KUBEFORGE, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """Debian's Prometheus scraping 127.0.0.1:<port> every second; yields (its URL, that port)."""
    target_port = free_port()
    with running_prometheus(tmp_path, target_port) as url:
        yield url, target_port


def query(url: str, promql: str) -> dict[str, float]:
    """{label-set: value} of an instant query."""
    body = requests.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert body["status"] == "success", body
    return {
        ",".join(f"{k}={v}" for k, v in sorted(r["metric"].items()) if k not in ("instance", "job")): float(
            r["value"][1]
        )
        for r in body["data"]["result"]
    }


NOT_IN_SCRAPED_RUN = ("kubeforge_train_mfu", "kubeforge_tune_", "kubeforge_promotion_awaiting_approval",
                      "kubeforge_data_")
"""Panels the scraped run cannot fill: MFU is measured on GPUs only, the quickstart has no search and no
approval, and its data stage finished in the first (killed, unscraped) run, so the scraped one skips it."""


def training_panels_without_data(url: str, since: float) -> list[str]:
    """Panels of the training dashboard with no data over the run (the run's processes have exited, so
    only a range query finds their series)."""
    panels = [(title, expr) for title, expr in panel_queries(DASHBOARDS / "kubeforge-training.json")
              if not any(name in expr for name in NOT_IN_SCRAPED_RUN)]
    return queries_without_data(url, panels, since)


def runs(workdir: str) -> list[dict]:
    """`kubeforge status -o json`: the recorded runs, oldest first."""
    return json.loads(kubeforge("status", "--workdir", workdir, "-o", "json").stdout)


def test_quickstart_killed_resumes_is_scraped_learns_and_a_rerun_skips_everything(
    prometheus: tuple[str, int], tmp_path: Path
) -> None:
    url, metrics_port = prometheus
    started = time.time()
    workdir = str(tmp_path / "work")
    command = [KUBEFORGE, "run", "examples/quickstart.yaml", "--workdir", workdir]
    stages = Path(workdir) / "pipelines" / "quickstart" / "stages"

    # Its own process group, so the kill takes the local Ray runtime it started down with it.
    first = subprocess.Popen(
        [*command, "--no-metrics"], cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 900
    try:
        while not list(stages.glob("pretrain-*.partial/ray/**/checkpoint_*/state.pt")):
            assert first.poll() is None, f"run ended before its first checkpoint: {first.stderr.read()[-3000:]}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no pretraining checkpoint within 15 minutes"
            time.sleep(0.5)
        time.sleep(1)  # let the checkpoint finish being written, as it would be in a real crash window
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    (killed,) = runs(workdir)
    assert killed["state"] == "interrupted"  # its process is gone without recording an end

    second = subprocess.run(
        [*command, "--metrics-port", str(metrics_port)], cwd=REPO, capture_output=True, text=True, timeout=1500
    )
    assert second.returncode == 0, second.stderr[-4000:]
    assert "succeeded" in second.stdout
    time.sleep(2)  # one more scrape interval, so the last values are stored

    resumed = runs(workdir)[-1]
    assert resumed["state"] == "succeeded"
    assert [(s["name"], s["state"]) for s in resumed["stages"]] == [
        ("data", "skipped"), ("pretrain", "succeeded"), ("finetune", "succeeded"), ("evaluate", "succeeded"),
        ("quantize", "succeeded"), ("promote", "succeeded"),
    ]
    assert all(s["mlflow_run_id"] for s in resumed["stages"])
    assert resumed["stages"][1]["mlflow_run_id"] == killed["stages"][1]["mlflow_run_id"], "the MLflow run is resumed"

    (pretrain_dir,) = stages.glob("pretrain-*")
    result = json.loads((pretrain_dir / "result.json").read_text())
    assert result["final_step"] == 300
    assert 0 < result["resumed_from_step"] < 300
    # "Well below its starting value": the untrained model is near-uniform over a 4096-token vocabulary.
    assert result["val_perplexity"] < 0.1 * result["initial_val_perplexity"], result

    (finetune_dir,) = stages.glob("finetune-*")
    finetuned = json.loads((finetune_dir / "result.json").read_text())
    assert finetuned["method"] == "lora" and finetuned["trainable_share"] < 0.05
    assert finetuned["val_loss"] < finetuned["initial_val_loss"], finetuned

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = finetune_dir / finetuned["model_dir"]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": 'Write the body of this Python function.\n\ndef add(a, b):\n    """Sum."""\n'}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]

    (evaluate_dir,) = stages.glob("evaluate-*")
    evaluation = json.loads((evaluate_dir / "result.json").read_text())
    candidate, base = evaluation["candidate"], evaluation["base"]
    for metric in ("perplexity", "exact_match", "bleu", "rouge_l", "parse_rate", "doctest_pass_rate"):
        assert metric in candidate and metric in base, metric
    # Fine-tuning on the task must make the answers more like the references than the base model's.
    assert candidate["rouge_l"] > base["rouge_l"], evaluation
    assert (evaluate_dir / evaluation["comparison"]).is_file()

    (quantize_dir,) = stages.glob("quantize-*")
    quantized = json.loads((quantize_dir / "result.json").read_text())
    assert quantized["scheme"] == "w8a8-int8" and quantized["format"] == "compressed-tensors"
    # The tied embedding (4096 x 128) stays fp32 and is over half of this small model, hence not 0.25.
    assert quantized["perplexity_increase"] <= 0.03 and quantized["size_ratio"] < 0.75, quantized
    assert quantized["check"]["engine"] == "vllm" and quantized["check"]["generated_tokens"] > 0, quantized["check"]

    (promote_dir,) = stages.glob("promote-*")
    promoted = json.loads((promote_dir / "result.json").read_text())
    assert promoted["gates_verdict"] == "passed" and promoted["version"] == quantized["registered"]["version"]
    from kubeforge.registry.client import Registry

    registry = Registry(f"sqlite:///{workdir}/mlflow.db")
    versions = {v.version: v for v in registry.versions("quickstart")}
    roles = {v.tags["kubeforge.role"]: v for v in versions.values()}
    assert set(roles) == {"base", "finetuned", "quantized"}, versions
    assert roles["quantized"].tags["kubeforge.parent_version"] == roles["finetuned"].version
    assert roles["finetuned"].tags["kubeforge.parent_version"] == roles["base"].version
    assert roles["quantized"].tags["kubeforge.quantization"] == "w8a8-int8"
    assert roles["finetuned"].tags["kubeforge.method"] == "sft-lora"
    assert roles["base"].tags["kubeforge.dataset_hash"] == roles["quantized"].tags["kubeforge.dataset_hash"]
    assert roles["quantized"].aliases == ("challenger",)

    champion = roles["quantized"].version
    promote = kubeforge("models", "promote", "quickstart", champion, "--reason", "first champion", "--workdir", workdir)
    assert promote.returncode == 0, promote.stderr
    listed = kubeforge("models", "list", "quickstart", "--workdir", workdir)
    assert listed.returncode == 0 and "champion" in listed.stdout, listed.stdout
    rollback = kubeforge("models", "rollback", "quickstart", "--reason", "test", "--workdir", workdir)
    assert rollback.returncode != 0 and "no previous champion" in rollback.stderr, rollback.stderr

    window = "[30m]"
    steps = query(url, f'max_over_time(kubeforge_train_step{{pipeline="quickstart"}}{window})')
    assert steps == {"pipeline=quickstart,stage=pretrain": 300, "pipeline=quickstart,stage=finetune": 120}
    throughput = query(url, f'max_over_time(kubeforge_train_tokens_per_second{{stage="pretrain"}}{window})')
    assert len(throughput) == 2 and all(v > 0 for v in throughput.values()), throughput
    loss = query(url, f'max_over_time(kubeforge_train_loss{{pipeline="quickstart",split="validation"}}{window})')
    assert {k.split("stage=")[1].split(",")[0] for k in loss} == {"pretrain", "finetune"}
    scored = query(url, f'max_over_time(kubeforge_eval_metric{{metric="rouge_l"}}{window})')
    assert scored["metric=rouge_l,model=candidate,pipeline=quickstart"] == pytest.approx(candidate["rouge_l"])
    states = query(url, f'max_over_time(kubeforge_stage_state{{kubeforge_stage_state="succeeded"}}{window})')
    assert {k.split("stage=")[1] for k, v in states.items() if v == 1} == {
        "pretrain", "finetune", "evaluate", "quantize", "promote"}
    gates = query(url, f'max_over_time(kubeforge_promotion_gate_passed{{pipeline="quickstart"}}{window})')
    assert len(gates) == 3 and set(gates.values()) == {1}, gates
    assert not training_panels_without_data(url, started), "training dashboard panels without data"

    third = kubeforge("run", "examples/quickstart.yaml", "--workdir", workdir, "--no-metrics")
    assert third.returncode == 0, third.stderr[-4000:]
    assert [s["state"] for s in runs(workdir)[-1]["stages"]] == ["skipped"] * 6
