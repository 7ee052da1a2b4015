"""Shared fixtures and the rules for the markers that need hardware or a cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

# The session-wide tiny language model (data + pretrain) that the fine-tuning, tuning and evaluation
# tests share: building it once instead of per module keeps the suite within its time budget. The
# object store (moto's S3 server) that the object-store source tests read from.
pytest_plugins = ["tests.stage_fixtures", "tests.chat_fixtures", "tests.s3_fixtures", "tests.lora_fixtures"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = _has_cuda()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "cluster" in item.keywords and not os.environ.get("KUBECONFIG"):
            item.add_marker(pytest.mark.skip(reason="needs a Kubernetes cluster (set KUBECONFIG)"))


def _has_cuda() -> bool:
    # Checked without importing torch when no NVIDIA driver is present: torch costs seconds to load.
    if not Path("/proc/driver/nvidia").exists() and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        return False
    import torch

    return bool(torch.cuda.is_available())


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray runtime for the integration tests of a session (starting Ray costs seconds)."""
    import ray

    from kubeforge.runtime import haproxy_ports_of_its_own, use_local_runtime_settings

    if not ray.is_initialized():
        use_local_runtime_settings()  # the settings of `kubeforge run` and `kubeforge serve`
        # Ray Serve's controller gives a starting proxy 5 s to report ready, then kills it and starts another
        # (10 s, 15 s, ...); serve.start() fails with the first one. On a busy 2-core machine the proxy's
        # worker and HAProxy take longer than that to start. The controller reads this when it starts, from
        # the environment the runtime started here passes on.
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "120")
        # No worker output on this process's stdout: Ray Train's PlacementGroupCleaner actor keeps printing
        # "Failed to query Ray Train Controller actor state" after a run, which would land in the middle of
        # whatever a CliRunner test captures. The stage logs' own tests run `kubeforge run` as a process.
        with haproxy_ports_of_its_own():
            ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()
