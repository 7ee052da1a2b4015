"""The test-only hold (`kubeforge.faults`) that tests use to act at moments they choose."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubeforge.faults import HOLD_ENV, hold_after_checkpoint, hold_at

pytestmark = pytest.mark.unit


def test_the_test_hold_waits_at_its_step_until_released(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    monkeypatch.setenv(HOLD_ENV, f"8:{tmp_path}")
    hold_after_checkpoint(4)  # another step: no hold
    assert list(tmp_path.iterdir()) == []

    holders = [threading.Thread(target=hold_after_checkpoint, args=(8,)) for _ in range(2)]
    for holder in holders:
        holder.start()
    while not (tmp_path / "held-1").exists():  # each loop claims its own number
        holders[0].join(timeout=0.05)
    (tmp_path / "release-0").touch()
    while all(h.is_alive() for h in holders):
        holders[0].join(timeout=0.05)
    assert sum(h.is_alive() for h in holders) == 1, "release-0 lets exactly one loop go on"
    (tmp_path / "release").touch()
    for holder in holders:
        holder.join(timeout=5)
        assert not holder.is_alive()


def test_a_malformed_test_hold_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOLD_ENV, "8")
    with pytest.raises(ValueError, match=r"KUBEFORGE_TEST_HOLD='8': expected <point>:<folder>"):
        hold_after_checkpoint(8)


def test_a_named_point_holds_only_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    monkeypatch.setenv(HOLD_ENV, f"data.fuzzy_dedup:{tmp_path}")
    hold_at("data.exact_dedup")
    hold_after_checkpoint(8)
    assert list(tmp_path.iterdir()) == []
    holder = threading.Thread(target=hold_at, args=("data.fuzzy_dedup",))
    holder.start()
    while not (tmp_path / "held-0").exists():
        holder.join(timeout=0.05)
    assert holder.is_alive()
    (tmp_path / "release").touch()
    holder.join(timeout=5)
    assert not holder.is_alive()
