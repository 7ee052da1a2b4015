"""The data stage: read, clean, deduplicate, filter, redact, tokenise and pack a corpus.

`run` and `source_fingerprint` are re-exported lazily so that importing this package (which the
CLI and the executor do) loads neither Ray nor pandas nor `tokenizers`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubeforge.context import StageContext
    from kubeforge.spec.data import DataSpec

__all__ = ["run", "source_fingerprint"]


def run(spec: DataSpec, ctx: StageContext) -> dict[str, Any]:
    """Run the whole data stage; see `kubeforge.data.stage.run`."""
    from kubeforge.data.stage import run as run_stage

    return run_stage(spec, ctx)


def source_fingerprint(spec: DataSpec, base_dir: Path) -> str:
    """Cheap fingerprint of the source files, mixed into the stage's cache key."""
    from kubeforge.data.sources import source_fingerprint as fingerprint

    return fingerprint(spec, base_dir)
