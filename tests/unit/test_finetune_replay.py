"""Replay rows drawn from the data stage's train shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kubeforge.context import StageOutput
from kubeforge.finetune.replay import replay_rows
from tests.data_fixtures import data_result

pytestmark = pytest.mark.unit


@pytest.fixture
def data(tmp_path: Path) -> StageOutput:
    out = tmp_path / "data"
    (out / "shards" / "train").mkdir(parents=True)
    (out / "shards" / "validation").mkdir(parents=True)
    # Row r of the train shards holds r in every position; validation rows hold -1.
    train = np.repeat(np.arange(10, dtype=np.int32)[:, None], 8, axis=1)
    np.save(out / "shards" / "train" / "shard-00000.npy", train[:6])
    np.save(out / "shards" / "train" / "shard-00001.npy", train[6:])
    np.save(out / "shards" / "validation" / "shard-00000.npy", np.full((4, 8), -1, dtype=np.int32))
    result = data_result(seq_len=8, shards={
        "train": ["shards/train/shard-00000.npy", "shards/train/shard-00001.npy"],
        "validation": ["shards/validation/shard-00000.npy"], "test": [],
    })
    return StageOutput(name="data", key="k", directory=out, result=result, mlflow_run_id=None)


def test_replay_rows_come_from_the_train_shards(data: StageOutput) -> None:
    rows = replay_rows(data, 7, seed=0)
    assert rows.shape == (7, 8) and rows.dtype == np.int64
    assert (rows == rows[:, :1]).all()  # whole rows
    assert len(set(rows[:, 0])) == 7  # without replacement
    assert set(rows[:, 0]) <= set(range(10))  # never a validation row (-1)
    assert (replay_rows(data, 7, seed=0) == rows).all()
    many = replay_rows(data, 25, seed=1)
    counts = np.bincount(many[:, 0], minlength=10)
    assert counts.min() >= 2 and counts.max() <= 3
    assert replay_rows(data, 0, seed=0).shape == (0, 8)
