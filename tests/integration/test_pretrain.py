"""The pretraining stage on local Ray: it learns, it survives a killed worker and a killed driver,
it refuses impossible resources at once, it trains BERT too, and vLLM serves what it writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from mlflow.tracking import MlflowClient

from kubeforge.context import StageContext, StageOutput
from kubeforge.engine.state import SNAPSHOT_FILE
from kubeforge.errors import StageError
from kubeforge.faults import HOLD_ENV
from kubeforge.progress import LineReporter
from kubeforge.spec.load import parse_manifest
from kubeforge.spec.pretrain import PretrainSpec
from kubeforge.stages.data import DataResult
from kubeforge.tracking import Tracker, start_stage_run
from kubeforge.workdir import Workdir
from tests.helpers import VLLM_SCRIPT, stop_process_group, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# The spec of the killed-worker, killed-driver and MLM runs below (on the session's data stage).
TINY_LLAMA: dict[str, Any] = {
    "model": {"hidden_size": 128, "num_layers": 2, "num_heads": 2, "max_position_embeddings": 128},
    "train": {"max_steps": 80, "batch_size": 8, "lr": 3e-3, "warmup_steps": 8},
    "eval": {"every_steps": 40, "max_batches": 4},
    "checkpoint": {"every_steps": 40, "keep": 2},
    "resources": {"workers": 2},
}


@pytest.fixture(scope="module")
def data_output(tiny_lm) -> StageOutput:
    """The session's data stage (60 standard-library files, a 512-token BPE, 128-token sequences)."""
    return tiny_lm.data


def _context(
    root: Path, data: StageOutput | None, out_dir: Path | None = None, run_id: str | None = None,
    stage: str = "pretrain",
) -> StageContext:
    workdir = Workdir(root / "work")
    workdir.root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{workdir.mlflow_db}"
    tracker = Tracker(uri, run_id) if run_id else start_stage_run(uri, workdir, "pretrain-test", stage, {}, None)
    pipeline = parse_manifest({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelPipeline", "metadata": {"name": "pretrain-test"},
        "spec": {"data": {"sources": [{"type": "python-stdlib", "max_files": 10}]}},
    })
    out = out_dir or root / "pretrain.partial"
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(
        pipeline=pipeline, stage=stage, out_dir=out, base_dir=root, tracker=tracker,
        reporter=LineReporter(), inputs={"data": data} if data else {},
    )


def _spec(**overrides: Any) -> PretrainSpec:
    merged = json.loads(json.dumps(TINY_LLAMA))
    for key, value in overrides.items():
        if isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            merged[key] = value
    return PretrainSpec.model_validate(merged)


@pytest.fixture(scope="module")
def causal_run(tiny_lm):
    """The session's pretraining run (2 workers, 60 steps), shared with the fine-tuning tests."""
    return tiny_lm.pretrain.directory, tiny_lm.pretrain.result, tiny_lm.pretrain.mlflow_run_id, tiny_lm.tracking_uri


def test_two_workers_learn_and_write_a_loadable_model(causal_run) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir, result, run_id, tracking_uri = causal_run
    print(f"causal run: {json.dumps(result.to_json())}")
    assert result.final_step == 60
    assert result.resumed_from_step == 0
    # Uniform guessing over 512 tokens is perplexity ~512; the model must get far below it and
    # clearly below where it started.
    assert result.initial_val_perplexity > 300
    assert result.val_perplexity < result.initial_val_perplexity / 3
    assert result.val_loss < result.initial_val_loss - 1.0
    assert result.tokens_per_second > 0
    assert result.model_dir == "model"

    model_dir = out_dir / result.model_dir
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (model_dir / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == result.num_parameters
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompt = tokenizer("def main(", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 8

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.data.params["train.max_steps"] == "60"
    assert run.data.params["model.hidden_size"] == "128"
    train_loss = client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in train_loss) == list(range(1, 61))
    val = {m.step: m.value for m in client.get_metric_history(run_id, "val_loss")}
    assert sorted(val) == [0, 30, 60]
    assert val[60] == pytest.approx(result.val_loss)
    assert {m.step for m in client.get_metric_history(run_id, "lr")} == set(range(1, 61))
    assert client.get_metric_history(run_id, "tokens_per_second")
    assert client.get_metric_history(run_id, "val_perplexity")
    artifacts = {a.path for a in client.list_artifacts(run_id, "model")}
    assert "model/model.safetensors" in artifacts


def _train_worker_pids() -> list[int]:
    """The Ray Train workers of this session's Ray runtime, by pid. Ray names a Train worker's process after
    its actor class (`ray::RayTrainWorker...`). Only descendants of this process, which started the runtime:
    workers of another Ray runtime on the machine (another test session) are not ours to kill."""
    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue  # gone meanwhile
        if "RayTrainWorker" in cmdline:
            pids.append(proc.pid)
    return sorted(pids)


def _recorded(experiment: Path) -> bool:
    """Ray Train's snapshot of the run names a checkpoint: a restart (or a rerun) resumes from it."""
    snapshot = experiment / SNAPSHOT_FILE
    return snapshot.is_file() and "checkpoint_" in snapshot.read_text()


def test_a_killed_worker_is_replaced_and_training_resumes_from_the_checkpoint(
    ray_local, data_output: StageOutput, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both workers hold after the checkpoint of step 10 (`kubeforge.faults`); one is killed there,
    once Ray Train has recorded that checkpoint."""
    from kubeforge.pretrain.stage import run

    ctx = _context(tmp_path, data_output)
    spec = _spec(
        train={"max_steps": 40, "batch_size": 4}, checkpoint={"every_steps": 10}, eval={"every_steps": 40},
        max_failures=2,
    )
    holds = tmp_path / "holds"
    holds.mkdir()
    monkeypatch.setenv(HOLD_ENV, f"10:{holds}")
    killed: list[int] = []

    def kill_one_held_worker() -> None:
        try:
            wait_for(lambda: (holds / "held-1").exists() and _recorded(experiment),
                     "Ray Train's record of the checkpoint of step 10, with both workers holding after it")
            pids = _train_worker_pids()
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
        finally:
            (holds / "release").touch()  # whatever happened, no worker waits for ever

    experiment = ctx.out_dir / "ray" / "pretrain"

    watcher = threading.Thread(target=kill_one_held_worker, daemon=True)
    watcher.start()
    result = run(spec, ctx)
    watcher.join(timeout=1)
    print(f"killed worker {killed}; result {json.dumps(result.to_json())}")
    assert killed, "no Ray Train worker process was found to kill"
    assert result.final_step == 40
    assert result.resumed_from_step == 10
    assert result.restored_from_steps == [10]
    assert result.val_perplexity < result.initial_val_perplexity
    history = MlflowClient(ctx.tracker.tracking_uri).get_metric_history(ctx.tracker.run_id, "resumed_from_step")
    assert [m.value for m in history] == [10]


def _child(argument_file: str) -> None:
    """Entry point of the driver process that the next test kills (run with python -c)."""
    import ray

    from kubeforge.pretrain.stage import run

    args = json.loads(Path(argument_file).read_text())
    ray.init(address=args["address"], logging_level="WARNING")
    data = StageOutput(name="data", key="fixture", directory=Path(args["data_dir"]),
                       result=DataResult.from_json(args["data_result"]), mlflow_run_id=None)
    ctx = _context(Path(args["root"]), data, out_dir=Path(args["out_dir"]), run_id=args["run_id"])
    run(PretrainSpec.model_validate(args["spec"]), ctx)


def test_a_rerun_after_the_driver_was_killed_resumes_from_the_last_checkpoint(
    ray_local, data_output: StageOutput, tmp_path: Path
) -> None:
    """The driver is killed while its worker holds after the checkpoint of step 10, once Ray Train has
    recorded that checkpoint; the rerun continues from it."""
    from kubeforge.pretrain.stage import run

    ctx = _context(tmp_path, data_output)
    # One worker: the point here is the driver's death, and fewer processes start faster on 2 cores.
    spec = _spec(
        train={"max_steps": 30, "batch_size": 4}, checkpoint={"every_steps": 10}, eval={"every_steps": 30},
        resources={"workers": 1},
    )
    holds = tmp_path / "holds"
    holds.mkdir()
    arguments = tmp_path / "child.json"
    arguments.write_text(json.dumps({
        "address": ray_local.get_runtime_context().gcs_address, "data_dir": str(data_output.directory),
        "data_result": data_output.result.to_json(), "root": str(tmp_path), "out_dir": str(ctx.out_dir),
        "run_id": ctx.tracker.run_id, "spec": spec.model_dump(mode="json"),
    }))
    child = subprocess.Popen(
        [sys.executable, "-c", f"from tests.integration.test_pretrain import _child; _child({str(arguments)!r})"],
        cwd=REPO, start_new_session=True, env={**os.environ, HOLD_ENV: f"10:{holds}"},
    )
    experiment = ctx.out_dir / "ray" / "pretrain"

    def recorded() -> bool:
        assert child.poll() is None, "the driver ended before it was killed"
        return (holds / "held-0").exists() and _recorded(experiment)

    try:
        wait_for(recorded, "Ray Train's record of the checkpoint of step 10")
    finally:
        stop_process_group(child)
    # Ray tears down the dead driver's controller and workers; wait until their CPUs are free again.
    wait_for(lambda: ray_local.available_resources().get("CPU", 0) >= 2, "the dead driver's workers' exit")

    result = run(spec, ctx)
    print(f"rerun result {json.dumps(result.to_json())}")
    assert result.final_step == 30
    assert result.resumed_from_step == 10
    assert result.val_perplexity < result.initial_val_perplexity


def test_more_workers_than_cpus_fail_at_once_naming_the_field(
    ray_local, data_output: StageOutput, tmp_path: Path
) -> None:
    from kubeforge.pretrain.stage import run

    ctx = _context(tmp_path, data_output)
    started = time.monotonic()
    with pytest.raises(StageError, match=r"resources\.workers: 4 workers x 1 CPU need 4 CPUs but the Ray cluster has 2"):
        run(_spec(resources={"workers": 4}), ctx)
    assert time.monotonic() - started < 60  # refused up front, not after waiting for a placement group
    assert not (ctx.out_dir / "model").exists()


def test_mlm_objective_trains_bert_with_activation_checkpointing(ray_local, data_output: StageOutput, tmp_path: Path) -> None:
    from transformers import AutoModelForMaskedLM

    from kubeforge.pretrain.stage import run

    ctx = _context(tmp_path, data_output)
    spec = _spec(
        objective="mlm", mlm={"mask_probability": 0.2}, resources={"workers": 1},
        # Activation checkpointing recomputes the forward pass in backward: training must still converge.
        train={"max_steps": 40, "batch_size": 4, "warmup_steps": 4, "lr": 5e-3, "activation_checkpointing": True},
        eval={"every_steps": 40}, checkpoint={"every_steps": 40},
    )
    result = run(spec, ctx)
    print(f"mlm result {json.dumps(result.to_json())}")
    assert result.objective == "mlm"
    assert result.final_step == 40
    assert result.val_loss < result.initial_val_loss - 0.5
    model = AutoModelForMaskedLM.from_pretrained(str(ctx.out_dir / result.model_dir))
    assert type(model).__name__ == "BertForMaskedLM"
    assert model.config.hidden_size == 128
    assert model.config.intermediate_size == 512  # the 4 x hidden default


@pytest.mark.slow
def test_vllm_serves_the_causal_model(causal_run) -> None:
    out_dir, result, _, _ = causal_run
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", VLLM_SCRIPT, str(out_dir / result.model_dir)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    generated = json.loads(line[len("RESULT"):])
    assert generated["tokens"] == 8
    assert generated["text"]
