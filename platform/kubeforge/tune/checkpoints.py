"""Deleting trials' old checkpoints without breaking a resume.

Ray Tune's `CheckpointConfig(num_to_keep=N)` deletes a trial's older checkpoints the moment a new one
registers, but the experiment state that `Tuner.restore` reads is saved later (every few seconds, then
copied to storage in the background). A kill in between leaves a saved state that points at a deleted
checkpoint, and the restore fails that trial ("Could not recover from checkpoint as it does not exist
on storage anymore"). So the stage lets Tune keep every checkpoint and deletes only those older than
the checkpoint the saved state would restore each trial from: what a restore reads is never deleted.

Reading the saved state uses Ray Tune's own loaders (private, and Ray is pinned); the resume test in
`tests/integration/test_tune.py` breaks if they change.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
from ray.tune.trainable.metadata import _TrainingRunMetadata


def restore_points(experiment_dir: Path) -> dict[str, str] | None:
    """Trial folder name -> the checkpoint folder a restore would resume that trial from.

    None when there is no saved state yet or it cannot be read now (the background copy may be
    writing it); trials without a checkpoint are absent.
    """
    newest = _find_newest_experiment_checkpoint(str(experiment_dir))
    if newest is None:
        return None
    try:
        state = json.loads(Path(newest).read_text())
        points = {}
        for _trial, run_metadata in state["trial_data"]:
            manager = _TrainingRunMetadata.from_json_state(run_metadata).checkpoint_manager
            latest = manager.latest_checkpoint_result if manager is not None else None
            if latest is not None and latest.checkpoint is not None:
                # Only the last two parts: a restore may have moved the folder the state was written in.
                checkpoint = Path(latest.checkpoint.path)
                points[checkpoint.parent.name] = checkpoint.name
    except Exception:  # a state that cannot be read now (a copy half-written) means: delete nothing now
        return None
    return points


def prune(experiment_dir: Path) -> list[Path]:
    """Deletes every trial's checkpoints older than its restore point; returns what it deleted."""
    points = restore_points(experiment_dir)
    if not points:
        return []
    deleted = []
    for trial_dir, keep_from in points.items():
        # Tune numbers checkpoints checkpoint_000000, checkpoint_000001, ...: names sort by age.
        for checkpoint in sorted((experiment_dir / trial_dir).glob("checkpoint_*")):
            if checkpoint.name >= keep_from:
                break
            shutil.rmtree(checkpoint, ignore_errors=True)
            deleted.append(checkpoint)
    return deleted
