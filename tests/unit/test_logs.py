"""Where Ray's output goes under `kubeforge.logs.capture`: a stage's file, the run's file, the terminal.

Ray is imported (its log dispatcher and line formatter are what the capture stands in for) but not
started: batches are fed to Ray's dispatcher as its log-forwarding thread would feed them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from kubeforge import logs
from kubeforge.cli import friendly_errors
from kubeforge.errors import StageError

pytestmark = pytest.mark.unit


class FakeTracker:
    def __init__(self) -> None:
        self.artifacts: list[tuple[Path, str | None, str]] = []

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((path, artifact_path, path.read_text()))


def batch(*lines: str, pid: int = 4242, actor: str = "RayTrainWorker") -> dict[str, Any]:
    """One batch of a worker's lines, as Ray's log monitor publishes it to the driver."""
    return {"ip": "10.0.0.1", "localhost": "10.0.0.1", "pid": pid, "job": FAKE_JOB, "is_err": False,
            "lines": list(lines), "actor_name": actor, "task_name": None}


FAKE_JOB = "ffffffff"


@pytest.fixture
def ray_terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Stands in for the handler `ray.init` registers to print the workers' output on the terminal; yields
    the batches it printed. A runtime that the session's integration tests started keeps its own handler
    out of the way meanwhile, and its log thread's batches (a placement-group cleaner's warning, say)
    are dropped before they reach any handler: only this test's fake job is dispatched."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatch = dispatcher.emit
    monkeypatch.setattr(dispatcher, "emit", lambda data: dispatch(data) if data["job"] == FAKE_JOB else None)
    printed: list[dict[str, Any]] = []
    session_handlers = [pair for pair in dispatcher.handlers if pair[0] == logs.RAY_HANDLER]
    dispatcher.remove_handler(logs.RAY_HANDLER)
    dispatcher.add_handler(logs.RAY_HANDLER, printed.append)
    try:
        yield printed
    finally:
        dispatcher.remove_handler(logs.RAY_HANDLER)
        for pair in session_handlers:
            dispatcher.add_handler(*pair)


def emit(data: dict[str, Any]) -> None:
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.emit(data)


def test_worker_output_goes_to_the_stage_file_and_nothing_reaches_the_terminal(
    tmp_path: Path, ray_terminal: list[dict[str, Any]], capfd: pytest.CaptureFixture[str]
) -> None:
    run_log, stage_dir, tracker = tmp_path / "logs" / "run.log", tmp_path / "data.partial", FakeTracker()
    with logs.capture(run_log, verbose=False) as capture:
        logs.route_ray_output()  # what ensure_ray does once Ray is up
        emit(batch("worker group starting", actor="TrainController", pid=7))
        with logs.stage_log(stage_dir, "data", tracker):  # type: ignore[arg-type]
            emit(batch("\x1b[36mSetting up process group for: env:// [rank=0, world_size=2]\x1b[0m"))
            os.write(2, b"[E 4242] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher'\n")
            print("a library's print in the driver", file=sys.__stdout__)  # sys.stdout is pytest's here
            capture.stderr.write("stage data: done\n")
        emit(batch("after the stage"))
        capture.stderr.write("run: succeeded\n")

    terminal = capfd.readouterr()
    assert ray_terminal == [], "Ray's own handler must not print the batches"
    assert terminal.err == "stage data: done\nrun: succeeded\n"
    assert terminal.out == ""
    stage_file = (stage_dir / "logs" / "ray.log").read_text()
    assert "(RayTrainWorker pid=4242) Setting up process group for: env:// [rank=0, world_size=2]\n" in stage_file
    assert "\x1b[" not in stage_file
    assert "core_worker.cc:2465" in stage_file and "a library's print in the driver" in stage_file
    run_file = run_log.read_text()
    assert "(TrainController pid=7) worker group starting" in run_file
    assert "(RayTrainWorker pid=4242) after the stage" in run_file
    assert "process group" not in run_file
    assert [(path.name, where) for path, where, _ in tracker.artifacts] == [("ray.log", "logs")]

    # Once the capture is over, Ray prints on the terminal again.
    emit(batch("later"))
    assert [b["lines"] for b in ray_terminal] == [["later"]]


def test_verbose_shows_worker_output_on_the_terminal_and_writes_the_stage_file(
    tmp_path: Path, ray_terminal: list[dict[str, Any]], capfd: pytest.CaptureFixture[str]
) -> None:
    stage_dir = tmp_path / "pretrain.partial"
    with logs.capture(tmp_path / "run.log", verbose=True):
        logs.route_ray_output()
        with logs.stage_log(stage_dir, "pretrain", FakeTracker()):  # type: ignore[arg-type]
            emit(batch("step 1"))
            os.write(2, b"straight to the terminal\n")

    assert [b["lines"] for b in ray_terminal] == [["step 1"]]
    assert "straight to the terminal" in capfd.readouterr().err
    assert "(RayTrainWorker pid=4242) step 1" in (stage_dir / "logs" / "ray.log").read_text()


def test_a_failed_stage_carries_the_end_of_its_log_and_logs_it_to_mlflow(
    tmp_path: Path, ray_terminal: list[dict[str, Any]]
) -> None:
    stage_dir, tracker = tmp_path / "pretrain.partial", FakeTracker()
    with pytest.raises(RuntimeError, match="workers died") as failed, logs.capture(tmp_path / "run.log", False):
        logs.route_ray_output()
        emit(batch("Started Ray", actor="TrainController"))
        with logs.stage_log(stage_dir, "pretrain", tracker):  # type: ignore[arg-type]
            emit(batch(*(f"step {i}" for i in range(100))))
            emit(batch("Traceback (most recent call last):", "RuntimeError: NCCL timeout", pid=4243))
            raise RuntimeError("workers died")

    path = stage_dir / "logs" / "ray.log"
    (note,) = failed.value.__notes__  # the stage's tail only: the run's would repeat what matters less
    header, *lines = note.splitlines()
    assert header == f"Ray's output of stage pretrain, last {logs.TAIL_LINES} lines (all of it in {path}):"
    assert len(lines) == logs.TAIL_LINES
    assert lines[-2:] == ["  (RayTrainWorker pid=4243) Traceback (most recent call last):",
                          "  (RayTrainWorker pid=4243) RuntimeError: NCCL timeout"]
    assert lines[0] == "  (RayTrainWorker pid=4242) step 72"
    assert "RuntimeError: NCCL timeout" in tracker.artifacts[0][2], "the artifact is logged after the last line"


def test_an_error_outside_any_stage_carries_the_end_of_the_run_log(
    tmp_path: Path, ray_terminal: list[dict[str, Any]]
) -> None:
    run_log = tmp_path / "serve.log"
    with pytest.raises(RuntimeError, match="HAProxy") as failed, logs.capture(run_log, verbose=False):
        logs.route_ray_output()
        emit(batch("Address already in use: 8000", actor="HAProxyManager", pid=99))
        raise RuntimeError("ray::HAProxyManager.ready() failed")
    (note,) = failed.value.__notes__
    assert note.splitlines() == [f"Ray's output, last 1 lines (all of it in {run_log}):",
                                 "  (HAProxyManager pid=99) Address already in use: 8000"]


@pytest.mark.parametrize("error", [StageError("data", "the quality filter removed every document"),
                                   KeyboardInterrupt()], ids=["input-error", "interrupt"])
def test_no_log_tail_for_input_errors_and_interrupts(
    tmp_path: Path, ray_terminal: list[dict[str, Any]], error: BaseException
) -> None:
    tracker = FakeTracker()
    with logs.capture(tmp_path / "run.log", verbose=False):
        logs.route_ray_output()
        with pytest.raises(type(error)) as failed, \
                logs.stage_log(tmp_path / "data.partial", "data", tracker):  # type: ignore[arg-type]
            emit(batch("Starting execution of Dataset"))
            raise error
    assert not getattr(failed.value, "__notes__", None)
    assert len(tracker.artifacts) == 1, "the log is an MLflow artifact of the failed run all the same"


def test_outside_a_capture_a_stage_log_does_nothing(tmp_path: Path, ray_terminal: list[dict[str, Any]]) -> None:
    tracker = FakeTracker()
    logs.route_ray_output()
    with logs.stage_log(tmp_path / "data.partial", "data", tracker):  # type: ignore[arg-type]
        emit(batch("hello"))
    assert [b["lines"] for b in ray_terminal] == [["hello"]]
    assert not (tmp_path / "data.partial").exists() and tracker.artifacts == []


def test_the_cli_prints_the_log_tail_after_the_error_line() -> None:
    @click.command()
    @friendly_errors
    def failing() -> None:
        error = RuntimeError("training failed")
        error.add_note("Ray's output of stage pretrain, last 1 lines (all of it in /w/logs/ray.log):\n"
                       "  (RayTrainWorker pid=1) [rank0]: boom")
        raise error

    result = CliRunner().invoke(failing, [])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[:3] == [
        "error: RuntimeError: training failed",
        "Ray's output of stage pretrain, last 1 lines (all of it in /w/logs/ray.log):",
        "  (RayTrainWorker pid=1) [rank0]: boom",
    ]
    assert lines[3].startswith("rerun to resume")


def test_tail_skips_a_line_cut_by_the_read_and_shortens_long_ones(tmp_path: Path) -> None:
    path = tmp_path / "ray.log"
    path.write_text("x" * 100 + "\n" + "\n".join(f"line {i}" for i in range(20)) + "\n" + "y" * 500 + "\n\n")
    assert logs.tail(path, 2, max_bytes=1000, max_width=10) == ["line 19", "yyyyyyyyy…"]
    # The last 530 bytes: the 502 of the y line, "line 19\n" to "line 17\n", and the end of "line 16\n".
    assert logs.tail(path, 30, max_bytes=530)[0] == "line 17"


def test_tail_shows_a_progress_bar_as_a_terminal_leaves_it(tmp_path: Path) -> None:
    path = tmp_path / "ray.log"
    path.write_text("(RayTrainWorker pid=1) \rWriting model shards:   0%|  | 0/1\rWriting model shards: 100%|##| 1/1\n"
                    "Loading: 50%\rLoading: 100%\r\n")
    assert logs.tail(path, 5) == ["(RayTrainWorker pid=1) Writing model shards: 100%|##| 1/1", "Loading: 100%"]
