"""Errors users see. Each one renders as lines that name the field, file or step at fault."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class KubeForgeError(Exception):
    """Base of every error caused by the user's input or environment rather than by a bug.

    The CLI prints these as one line per problem and exits non-zero, without a traceback.
    """

    exit_code = 1


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest: where (a dotted field path or a file) and what."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class SpecError(KubeForgeError):
    """The manifest is invalid. Exit code 2, like a usage error."""

    exit_code = 2

    def __init__(self, problems: Sequence[Problem], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__("\n".join(str(p) for p in self.problems))

    def __reduce__(self) -> tuple:
        # Ray copies and pickles errors raised in workers and trials; the default rebuilds an
        # exception from `args`, which do not match this constructor.
        return (type(self), (self.problems, self.source))


class StageError(KubeForgeError):
    """A stage could not do its work because of its input (an empty corpus, a bad line, too few CPUs).

    With `resumable`, the fault lay outside the input (workers kept dying): the stage's partial output,
    checkpoints included, is kept so that a rerun resumes from it instead of starting over.
    """

    def __init__(self, stage: str, message: str, *, resumable: bool = False) -> None:
        self.stage = stage
        self.message = message
        self.resumable = resumable
        super().__init__(f"stage {stage}: {message}")

    def __reduce__(self) -> tuple:
        return (_rebuild_stage_error, (self.stage, self.message, self.resumable))


def _rebuild_stage_error(stage: str, message: str, resumable: bool) -> StageError:
    return StageError(stage, message, resumable=resumable)
