"""What every training loop's configuration holds (light: drivers build configurations without torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(kw_only=True)
class LoopConfig:
    """What every recipe's configuration holds; a stage's configuration adds its section and inputs."""

    fallback_checkpoint: str | None = None
    """A checkpoint folder on disk to resume from when Ray offers none (its record of the run was lost
    in a crash). The driver sets it (`kubeforge.engine.fit`)."""
    hub: Any = None
    """The driver's `ProgressHub` actor, which the loop's progress messages go to; None where nobody
    follows them (Tune trials report through Tune, `LocalSession` keeps what it needs)."""
