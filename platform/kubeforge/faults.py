"""TEST-ONLY fault injection: KubeForge itself never sets it.

`KUBEFORGE_TEST_HOLD=<point>:<folder>` makes whatever reaches `<point>` claim the next free
`<folder>/held-<n>` (n = 0, 1, ...) and wait until `<folder>/release-<n>` or `<folder>/release`
(every hold, present and future) exists. The points are a training loop's step number, right after
it reported that step's checkpoint, and `data.<step>`, right after the data stage saved that step. A
test uses it to act at moments it chooses instead of racing the code: to kill a worker or the driver
while the loops wait after a checkpoint (tests/integration/test_pretrain.py), to let the first trial
of a search go on and kill the search while the second one is held (test_tune.py), to kill the data
stage after a step (test_data_stage.py).

The setting reaches the loops through their environment: a Tune trial inherits its job's runtime
environment, and `kubeforge.engine.fit` hands a driver's setting to its Ray Train workers.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

HOLD_ENV = "KUBEFORGE_TEST_HOLD"
_POLL_S = 0.05


def worker_env() -> dict[str, str]:
    """The setting as environment variables for the Ray Train workers (none when the driver has none)."""
    setting = os.environ.get(HOLD_ENV)
    return {HOLD_ENV: setting} if setting else {}


def hold_at(point: str) -> None:
    """Wait here if the test's setting names `point`; return at once otherwise."""
    setting = os.environ.get(HOLD_ENV)
    if not setting:
        return
    at, _, path = setting.partition(":")
    if not at or not path:
        raise ValueError(f"{HOLD_ENV}={setting!r}: expected <point>:<folder>")
    if at != point:
        return
    folder = Path(path)
    for n in itertools.count():
        try:
            (folder / f"held-{n}").touch(exist_ok=False)  # claimed atomically, whoever else holds here
        except FileExistsError:
            continue
        break
    while not ((folder / f"release-{n}").exists() or (folder / "release").exists()):
        time.sleep(_POLL_S)


def hold_after_checkpoint(step: int) -> None:
    hold_at(str(step))
