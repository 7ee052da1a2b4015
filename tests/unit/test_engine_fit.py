"""The checks and resume bookkeeping that run on the driver before Ray Train starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubeforge.engine.fit import check_resources
from kubeforge.engine.state import SNAPSHOT_FILE, latest_checkpoint, repair_snapshot
from kubeforge.errors import StageError
from kubeforge.spec.pretrain import PretrainSpec

pytestmark = pytest.mark.unit


def test_too_few_cpus_name_the_field() -> None:
    spec = PretrainSpec.model_validate({"resources": {"workers": 4, "cpus_per_worker": 1}})
    with pytest.raises(StageError, match=r"spec\.pretrain\.resources\.workers: 4 workers x 1 CPU need 4 CPUs but "
                                         r"the Ray cluster has 2"):
        check_resources(spec, {"CPU": 2.0}, "pretrain")
    check_resources(spec, {"CPU": 4.0}, "pretrain")


def test_gpus_are_checked_too() -> None:
    spec = PretrainSpec.model_validate({"resources": {"workers": 2, "use_gpu": True}})
    with pytest.raises(StageError, match="need 2 GPUs but the Ray cluster has 1"):
        check_resources(spec, {"CPU": 16.0, "GPU": 1.0}, "pretrain")


def _checkpoint(root: Path, name: str, step: int | None, state: bool = True) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    if step is not None:
        (folder / "meta.json").write_text(json.dumps({"step": step}))
    if state:
        (folder / "state.pt").write_bytes(b"x")


def test_latest_complete_checkpoint_wins(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    _checkpoint(tmp_path, "checkpoint_00000010", 10)
    _checkpoint(tmp_path, "checkpoint_00000020", 20)
    _checkpoint(tmp_path, "checkpoint_00000030", 30, state=False)  # rank 0's state never arrived
    _checkpoint(tmp_path, "checkpoint_00000040", None)  # cut off before its meta file
    (tmp_path / "checkpoint_00000050").mkdir()
    (tmp_path / "checkpoint_00000050" / "meta.json").write_text("{")  # cut off mid-write
    (tmp_path / "checkpoint_00000050" / "state.pt").write_bytes(b"x")
    assert latest_checkpoint(tmp_path) == (tmp_path / "checkpoint_00000020", 20)


def test_an_unreadable_ray_snapshot_is_removed(tmp_path: Path) -> None:
    messages: list[str] = []
    (tmp_path / SNAPSHOT_FILE).write_text('{"checkpoint_results": [')
    repair_snapshot(tmp_path, messages.append)
    assert not (tmp_path / SNAPSHOT_FILE).exists()
    assert messages and "unreadable" in messages[0]
    (tmp_path / SNAPSHOT_FILE).write_text("{}")
    repair_snapshot(tmp_path, messages.append)
    assert (tmp_path / SNAPSHOT_FILE).exists()
