"""A real Prometheus scrapes a live `kubeforge run`, then we query what it stored."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from tests.helpers import TINY_PRETRAIN, free_port, small_manifest

pytestmark = pytest.mark.integration


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, int]]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus missing: `make test` installs Debian's prometheus package")
    target_port, port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "kubeforge", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}
                ],
            }
        )
    )
    server = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/-/ready", timeout=2).ok:
                break
        except requests.ConnectionError:
            time.sleep(0.5)
    try:
        yield url, target_port
    finally:
        server.terminate()
        server.wait(timeout=30)


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


def test_stage_and_training_metrics_reach_prometheus(prometheus: tuple[str, int], tmp_path: Path) -> None:
    url, metrics_port = prometheus
    manifest = tmp_path / "pipeline.yaml"
    manifest.write_text(yaml.safe_dump(small_manifest("scraped", pretrain=TINY_PRETRAIN)))
    kubeforge = Path(sys.executable).with_name("kubeforge")
    result = subprocess.run(
        [
            str(kubeforge),
            "run",
            str(manifest),
            "--workdir",
            str(tmp_path / "work"),
            "--num-cpus",
            "2",
            "--metrics-port",
            str(metrics_port),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    time.sleep(2)  # one more scrape interval, so the last values are stored

    window = "[15m]"
    docs = query(url, f'max_over_time(kubeforge_data_documents{{pipeline="scraped"}}{window})')
    assert docs["direction=in,pipeline=scraped,step=read"] == 60
    out_after_dedup = docs["direction=out,pipeline=scraped,step=fuzzy_dedup"]
    assert 0 < out_after_dedup <= docs["direction=in,pipeline=scraped,step=fuzzy_dedup"]

    steps = query(url, f'max_over_time(kubeforge_train_step{{pipeline="scraped"}}{window})')
    assert steps == {"pipeline=scraped,stage=pretrain": 12}
    throughput = query(url, f'max_over_time(kubeforge_train_tokens_per_second{{pipeline="scraped"}}{window})')
    assert len(throughput) == 2 and all(v > 0 for v in throughput.values()), throughput
    loss = query(url, f'max_over_time(kubeforge_train_loss{{pipeline="scraped",split="validation"}}{window})')
    assert all(v > 0 for v in loss.values()) and loss

    states = query(
        url, f'max_over_time(kubeforge_stage_state{{pipeline="scraped",kubeforge_stage_state="succeeded"}}{window})'
    )
    assert {k.split("stage=")[1] for k, v in states.items() if v == 1} == {"data", "pretrain"}
