"""Replay: rows of the pretraining corpus mixed into fine-tuning, to limit forgetting."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kubeforge.errors import StageError

if TYPE_CHECKING:
    import numpy as np

    from kubeforge.context import StageOutput
    from kubeforge.stages.data import DataResult

STAGE = "finetune"


def replay_rows(data: StageOutput[DataResult], count: int, seed: int) -> np.ndarray:
    """`count` packed rows of the data stage's train shards (int64, (count, seq_len)).

    Drawn without replacement while the shards have enough rows; beyond that every row is used once more
    (in a new random order) before any is used a third time. Only the chosen rows are read from disk.
    """
    import numpy as np

    seq_len = data.result.seq_len
    shards = [data.directory / p for p in data.result.shards.get("train", [])]
    missing = [str(path) for path in shards if not path.is_file()]
    if missing:
        raise StageError(STAGE, f"replay: the data stage's shard {missing[0]} does not exist; rerun the data stage")
    arrays = [np.load(path, mmap_mode="r") for path in shards]
    sizes = np.array([len(a) for a in arrays], dtype=np.int64)
    total = int(sizes.sum())
    if count <= 0:
        return np.empty((0, seq_len), dtype=np.int64)
    if total == 0:
        raise StageError(
            STAGE, "replay needs the data stage's train shards and they hold no rows; set replay_fraction: 0"
        )
    rng = np.random.default_rng(seed)
    rounds = -(-count // total)
    picks = np.concatenate([rng.permutation(total) for _ in range(rounds)])[:count]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    rows = np.empty((count, seq_len), dtype=np.int64)
    shard_of = np.searchsorted(bounds, picks, side="right") - 1
    for shard in np.unique(shard_of):
        where = np.flatnonzero(shard_of == shard)
        local = picks[where] - bounds[shard]
        order = np.argsort(local)  # sorted reads from the memory map
        rows[where[order]] = np.asarray(arrays[shard][local[order]], dtype=np.int64)
    return rows
