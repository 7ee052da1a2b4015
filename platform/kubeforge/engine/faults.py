"""TEST-ONLY fault injection in the training loops: KubeForge itself never sets it.

`KUBEFORGE_TEST_HOLD=<step>:<folder>` makes every loop that has just reported the checkpoint of
`<step>` claim the next free `<folder>/held-<n>` (n = 0, 1, ...) and wait until `<folder>/release-<n>`
exists. A test uses it to act at moments it chooses instead of racing the loops: to let the first trial
of a search go on and to kill the search while the second one is held (tests/integration/test_tune.py).
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

HOLD_ENV = "KUBEFORGE_TEST_HOLD"
_POLL_S = 0.05


def hold_after_checkpoint(step: int) -> None:
    setting = os.environ.get(HOLD_ENV)
    if not setting:
        return
    at, _, path = setting.partition(":")
    if not at.isdigit() or not path:
        raise ValueError(f"{HOLD_ENV}={setting!r}: expected <step>:<folder>")
    if int(at) != step:
        return
    folder = Path(path)
    for n in itertools.count():
        try:
            (folder / f"held-{n}").touch(exist_ok=False)  # claimed atomically, whoever else holds here
        except FileExistsError:
            continue
        break
    while not (folder / f"release-{n}").exists():
        time.sleep(_POLL_S)
