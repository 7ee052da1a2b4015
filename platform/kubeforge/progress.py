"""Progress bars (rich) behind the `Reporter` protocol that stages use."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


class _Task:
    def __init__(self, progress: Progress, task_id: TaskID) -> None:
        self._progress = progress
        self._id = task_id

    def update(self, completed: float, total: float | None = None, description: str | None = None) -> None:
        fields: dict[str, object] = {"completed": completed}
        if total is not None:
            fields["total"] = total
        if description is not None:
            fields["description"] = description
        self._progress.update(self._id, **fields)  # type: ignore[arg-type]


class RichReporter:
    """One live progress display for a whole `kubeforge run`; each stage step adds a bar.

    With `redirect_output` (rich's default), what the process prints to sys.stdout and sys.stderr
    shows above the bars; without it, it goes where those streams go (a log file under
    `kubeforge.logs.capture`).
    """

    def __init__(self, console: Console | None = None, redirect_output: bool = True) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
            redirect_stdout=redirect_output,
            redirect_stderr=redirect_output,
        )

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[_Task]:
        task_id = self.progress.add_task(description, total=total)
        handle = _Task(self.progress, task_id)
        try:
            yield handle
        finally:
            # A finished bar shows as complete even when the stage stopped short of its estimate.
            current = self.progress.tasks[task_id]
            if current.total is None:
                self.progress.update(task_id, total=current.completed or 1, completed=current.completed or 1)

    def log(self, message: str) -> None:
        self.progress.console.log(message)


class _LineTask:
    def __init__(self, reporter: LineReporter, description: str, total: float | None) -> None:
        self.reporter = reporter
        self.description = description
        self.total = total
        self.completed = 0.0
        self._last_decile = -1

    def update(self, completed: float, total: float | None = None, description: str | None = None) -> None:
        self.completed = completed
        self.total = total if total is not None else self.total
        self.description = description or self.description
        if self.total:
            decile = int(10 * min(completed / self.total, 1.0))
            if decile > self._last_decile:
                self._last_decile = decile
                self.reporter.log(f"{self.description}: {completed:g}/{self.total:g}")


class LineReporter:
    """Progress as plain log lines (every 10%), for Ray job logs and pods where no terminal redraws."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[_LineTask]:
        handle = _LineTask(self, description, total)
        yield handle
        self.log(f"{handle.description}: done ({handle.completed:g})")

    def log(self, message: str) -> None:
        print(message, file=self.stream, flush=True)


class _SilentTask:
    def update(self, completed: float, total: float | None = None, description: str | None = None) -> None:
        del completed, total, description


class QuietReporter:
    """No progress and no log lines: for benchmarks, whose output should be their results only."""

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[_SilentTask]:
        yield _SilentTask()

    def log(self, message: str) -> None:
        del message
