"""Where Ray's output goes while `kubeforge run` and `kubeforge serve` work.

Left alone, Ray prints its own chatter and everything its workers write on the driver's terminal,
between our progress bars, where users read routine lines ("Failed to query Ray Train Controller
actor state", core_worker errors about actor restarts) as failures. Inside `capture(run_log, verbose)`:

* the workers' output, which Ray forwards to this driver, goes to the log file of the stage that is
  running (`<stage folder>/logs/ray.log`, see `stage_log`) or, between stages, to `run_log`;
* without `verbose`, file descriptors 1 and 2 point at that same file, so nothing else reaches the
  terminal either: Ray's Python loggers, the C++ core worker's lines, libraries' prints and
  warnings. `Capture.stdout`/`Capture.stderr` still reach the terminal: the CLI prints through them;
* with `verbose`, the terminal shows everything as it would without a capture, and the log files
  get the workers' output all the same.

Callers: `kubeforge.cli` (`run`, `serve`) and `kubeforge.entrypoint` (verbose) open a capture;
`runtime.ensure_ray` calls `route_ray_output` once Ray is connected; `executor.execute_stage` runs
each stage inside `stage_log`, which also logs the file to the stage's MLflow run and, when the stage
fails, adds the file's last lines to the error as a note (PEP 678), which the CLI prints after it.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from kubeforge.errors import KubeForgeError

if TYPE_CHECKING:
    from kubeforge.tracking import Tracker

STAGE_LOG = Path("logs") / "ray.log"
"""A stage's log file, relative to its folder; the same path in the stage's MLflow artifacts."""
TAIL_LINES = 30
"""How much of a failed stage's log (or the run's, for an error outside any stage) the CLI prints under
the error."""
RAY_HANDLER = "ray_print_logs"
"""The name under which `ray._private.worker.connect` registers the handler that prints the workers'
output on the driver (Ray 2.60): the handler `Capture` stands in for."""
SETTLE_S = 0.5
"""Ray's log monitor forwards a worker's lines within ~0.1 s of their writing; a stage's last lines are
in once none has come for this long."""
SETTLE_LIMIT_S = 3.0

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_PREFIX = re.compile(r"\([^()]*pid=[^()]*\) ")
_active: Capture | None = None


class _Plain:
    """A file that drops the colour codes Ray puts around its `(pid=...)` prefixes."""

    def __init__(self, file: TextIO) -> None:
        self.file = file

    def write(self, text: str) -> int:
        return self.file.write(_ANSI.sub("", text))

    def flush(self) -> None:
        self.file.flush()


class Capture:
    """One capture; `capture()` makes and undoes it."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.stdout: TextIO = sys.stdout
        """Where the CLI prints its own output (the terminal, or whatever stdout was)."""
        self.stderr: TextIO = sys.stderr
        self._file: TextIO | None = None
        """Where the workers' output goes now (None: nowhere but the terminal, verbose only)."""
        self._lock = threading.Lock()
        self._ray_handler: Callable[[dict[str, Any]], None] | None = None
        self._last_batch = 0.0
        self._opened: list[TextIO] = []
        self._saved_fds: tuple[int, int] | None = None
        self.noted: BaseException | None = None
        """The error a stage's log tail was added to: the run's own tail would repeat it."""

    # -- the workers' output ---------------------------------------------------------------
    def attach(self) -> None:
        """Stand in for Ray's handler of the workers' output, which prints it on this terminal."""
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        if any(handler == self._on_batch for _, handler in dispatcher.handlers):
            return
        theirs = [handler for name, handler in dispatcher.handlers if name == RAY_HANDLER]
        if not theirs:
            return  # Ray forwards no worker output to this driver (log_to_driver=False)
        self._ray_handler = theirs[0]
        dispatcher.remove_handler(RAY_HANDLER)
        # Under Ray's name, so that `ray.shutdown()` removes it as it removes its own.
        dispatcher.add_handler(RAY_HANDLER, self._on_batch)

    def detach(self) -> None:
        """Give Ray its handler back (Ray outlives this capture, as in tests that share one runtime)."""
        ray = sys.modules.get("ray")
        if self._ray_handler is None or ray is None:
            return
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        if any(handler == self._on_batch for _, handler in dispatcher.handlers):
            dispatcher.remove_handler(RAY_HANDLER)
            dispatcher.add_handler(RAY_HANDLER, self._ray_handler)
        self._ray_handler = None

    def _on_batch(self, batch: dict[str, Any]) -> None:
        """One batch of lines of one worker process, as Ray's log monitor forwards it."""
        from ray._private.worker import print_worker_logs
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

        with self._lock:
            self._last_batch = time.monotonic()
            if self._file is not None:
                # Progress-bar updates of `tqdm_ray` are JSON state, not lines anyone reads.
                lines = [line for line in batch.get("lines", []) if RAY_TQDM_MAGIC not in line]
                print_worker_logs({**batch, "lines": lines}, _Plain(self._file))  # type: ignore[dict-item]
                self._file.flush()
        if self.verbose and self._ray_handler is not None:
            self._ray_handler(batch)

    def settle(self) -> None:
        """Wait (briefly) for the lines the workers wrote just before now."""
        if self._ray_handler is None:
            return
        deadline = time.monotonic() + SETTLE_LIMIT_S
        while time.monotonic() < deadline and time.monotonic() - self._last_batch < SETTLE_S:
            time.sleep(0.05)

    # -- files -------------------------------------------------------------------------------
    def open(self, path: Path) -> TextIO:
        path.parent.mkdir(parents=True, exist_ok=True)
        file = path.open("a", buffering=1, encoding="utf-8", errors="replace")
        self._opened.append(file)
        return file

    def close(self, file: TextIO) -> None:
        self._opened.remove(file)
        file.close()

    def point_at(self, file: TextIO | None) -> TextIO | None:
        """Send everything to `file` from now on; returns where it went so far."""
        with self._lock:
            previous, self._file = self._file, file
        if self._saved_fds is not None and file is not None:
            _flush_std_streams()  # their buffers hold lines meant for the previous file
            os.dup2(file.fileno(), 1)
            os.dup2(file.fileno(), 2)
        return previous

    def redirect_fds(self, file: TextIO) -> None:
        """Point file descriptors 1 and 2 at `file`, keeping `stdout`/`stderr` on the terminal."""
        self.stdout = self._keep(sys.stdout, 1)
        self.stderr = self._keep(sys.stderr, 2)
        self._saved_fds = (os.dup(1), os.dup(2))
        self.point_at(file)

    def restore_fds(self) -> None:
        if self._saved_fds is None:
            return
        _flush_std_streams()
        for fd, saved in zip((1, 2), self._saved_fds, strict=True):
            os.dup2(saved, fd)
            os.close(saved)
        self._saved_fds = None

    def _keep(self, stream: TextIO, fd: int) -> TextIO:
        """A stream that reaches where `stream` did, once `fd` points at a log file."""
        try:
            on_fd = stream.fileno() == fd
        except (AttributeError, OSError, ValueError):
            on_fd = False  # not a file descriptor (click's CliRunner, pytest): unaffected by the redirect
        if not on_fd:
            return stream
        stream.flush()
        kept = os.fdopen(os.dup(fd), "w", buffering=1, encoding=stream.encoding, errors="replace")
        self._opened.append(kept)
        return kept


@contextmanager
def capture(run_log: Path | None, verbose: bool) -> Iterator[Capture]:
    """Send Ray's output and the workers' to log files while the block runs (see the module docstring).

    `run_log` takes what comes outside any stage (None: only with `verbose`, where that goes to the
    terminal alone). A Ray runtime started inside the block is shut down at its end, still inside the
    capture: Ray's farewell lines go to the log rather than under the CLI's last words. An error that
    leaves the block, and failed no stage, carries the end of `run_log` as a note (see `stage_log`).
    """
    global _active
    if _active is not None:
        raise RuntimeError("a log capture is already active in this process")
    if run_log is None and not verbose:
        raise ValueError("a capture that hides Ray's output from the terminal needs a log file for it")
    ray_was_up = _ray_connected()
    current = Capture(verbose)
    run_file = current.open(run_log) if run_log is not None else None
    if verbose or run_file is None:
        current.point_at(run_file)
    else:
        current.redirect_fds(run_file)
    _active = current
    try:
        if ray_was_up:
            current.attach()
        yield current
    except Exception as exc:
        if exc is not current.noted:
            current.settle()
            _add_failure_note(exc, "Ray's output", run_log, verbose)
        raise
    finally:
        try:
            if _ray_connected() and not ray_was_up:
                import ray

                ray.shutdown()
            current.detach()
        finally:
            _active = None
            current.restore_fds()
            current.point_at(None)
            for file in list(current._opened):
                current.close(file)


def route_ray_output() -> None:
    """Called once Ray is connected: the capture in force, if any, takes the workers' output."""
    if _active is not None:
        _active.attach()


def session_log(logs_dir: Path, name: str) -> Path:
    """A new log file for one `kubeforge run` or `kubeforge serve`: `<logs_dir>/<name>-<time>.log`."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return logs_dir / f"{name}-{stamp}.log"


@contextmanager
def stage_log(out_dir: Path, stage: str, tracker: Tracker) -> Iterator[None]:
    """Run a stage with its output going to `<out_dir>/logs/ray.log`, logged to its MLflow run at the end.

    A no-op outside a capture (tests that call the executor directly). The file is appended to, so a
    resumed stage keeps the output of its earlier attempts.
    """
    capture = _active
    if capture is None:
        yield
        return
    path = out_dir / STAGE_LOG
    file = capture.open(path)
    file.write(f"===== stage {stage}: attempt started {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}\n")
    previous = capture.point_at(file)
    try:
        yield
    except BaseException as exc:
        _end_stage_log(capture, file, previous)
        try:
            tracker.log_artifact(path, str(STAGE_LOG.parent))
        except Exception as logging_failed:  # the stage's own error is the one to report
            exc.add_note(f"(could not log {path} to MLflow: {logging_failed})")
        if _add_failure_note(exc, f"Ray's output of stage {stage}", path, capture.verbose):
            capture.noted = exc
        raise
    _end_stage_log(capture, file, previous)
    tracker.log_artifact(path, str(STAGE_LOG.parent))


def _end_stage_log(capture: Capture, file: TextIO, previous: TextIO | None) -> None:
    capture.settle()
    capture.point_at(previous)
    capture.close(file)


def _add_failure_note(exc: BaseException, what: str, path: Path | None, verbose: bool) -> bool:
    """Add the end of `path` to `exc` (only where the file is, with `verbose`); whether a note was added."""
    if path is None or not isinstance(exc, Exception):
        return False  # nothing to show, or the user interrupted and knows why it stopped
    if isinstance(exc, KubeForgeError) and not getattr(exc, "resumable", False):
        # The input was at fault and the message says what to change; the executor also removes the
        # stage's folder, its log with it (the MLflow artifact stays).
        return False
    if verbose:
        exc.add_note(f"{what} is in {path}")
        return True
    lines = tail(path, TAIL_LINES)
    if not lines:
        return False
    header = f"{what}, last {len(lines)} lines (all of it in {path}):"
    exc.add_note("\n".join([header, *(f"  {line}" for line in lines)]))
    return True


def tail(path: Path, count: int, max_bytes: int = 64 * 1024, max_width: int = 400) -> list[str]:
    """The last `count` non-blank lines of `path`, each cut to `max_width` characters."""
    with path.open("rb") as file:
        start = max(0, path.stat().st_size - max_bytes)
        file.seek(start)
        text = file.read().decode("utf-8", errors="replace")
    lines = text.split("\n")[1 if start else 0 :]  # a read from the middle starts mid-line
    lines = [shown for shown in map(_as_shown, lines) if shown.strip()]
    return [line if len(line) <= max_width else line[: max_width - 1] + "…" for line in lines[-count:]]


def _as_shown(line: str) -> str:
    """`line` as a terminal leaves it: of a progress bar's redraws (\r), the last, after Ray's prefix."""
    line = line.rstrip()
    if "\r" not in line:
        return line
    drawn = [part for part in line.split("\r") if part.strip()]
    last = drawn[-1] if drawn else ""
    prefix = _RAY_PREFIX.match(line)
    return prefix.group(0) + last if prefix and not last.startswith(prefix.group(0)) else last


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")  # not imported: not connected, and not worth importing to find out
    return bool(ray is not None and ray.is_initialized())
