"""The local Ray runtime KubeForge starts: its workers compete for the CPU as the run that started them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

WORKER_NICENESS = """
import os, ray
from kubeforge.runtime import ensure_ray

ensure_ray(None, 1)
print(os.nice(0), ray.get(ray.remote(num_cpus=1)(lambda: os.nice(0)).remote()))
ray.shutdown()
"""


def test_workers_of_a_local_runtime_keep_the_niceness_of_the_run_that_started_it() -> None:
    # Ray's own default would put them 15 above it, where any busy process starves them.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_worker_niceness")}
    started = subprocess.run(["nice", "-n", "3", sys.executable, "-c", WORKER_NICENESS], env=env,
                             capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr[-3000:]
    driver, worker = started.stdout.split()[-2:]
    assert int(driver) == os.nice(0) + 3
    assert worker == driver
