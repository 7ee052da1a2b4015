"""TEST-ONLY fault injection in the training loops: KubeForge itself never sets it.

`KUBEFORGE_TEST_HOLD=<step>:<barrier file>` makes a loop that has just reported the checkpoint of
`<step>` wait for as long as `<barrier file>` exists, with `<barrier file>.held` (holding the step)
present while it waits. A test uses it to act at a moment it chooses — for instance to kill a search
once its saved state holds that checkpoint — instead of racing the loop (tests/integration/test_tune.py).
"""

from __future__ import annotations

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
        raise ValueError(f"{HOLD_ENV}={setting!r}: expected <step>:<barrier file>")
    barrier = Path(path)
    if int(at) != step or not barrier.exists():
        return
    held = barrier.with_name(barrier.name + ".held")
    held.write_text(str(step))
    try:
        while barrier.exists():
            time.sleep(_POLL_S)
    finally:
        held.unlink(missing_ok=True)
