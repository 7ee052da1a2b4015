"""What every `kubeforge` command shares: the consoles, error reporting, options, the registry handle.

Imports stay light at module level (click, rich, pydantic): `kubeforge --help` and
`kubeforge validate` must not pay for torch or Ray.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kubeforge import logs
from kubeforge.errors import KubeForgeError, SpecError
from kubeforge.workdir import DEFAULT_WORKDIR, Workdir

if TYPE_CHECKING:
    from kubeforge.registry.client import Registry

F = TypeVar("F", bound=Callable[..., Any])

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

DEFAULT_METRICS_PORT = 9108


def friendly_errors(func: F) -> F:
    """Turn our errors into one line per problem and a non-zero exit; bugs keep their traceback
    only with KUBEFORGE_DEBUG=1, so users see what to do rather than a stack."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SpecError as exc:
            prefix = f"{exc.source}: " if exc.source else ""
            for problem in exc.problems:
                err.print(f"[red]error[/]: {escape(prefix + str(problem))}")
            sys.exit(exc.exit_code)
        except KubeForgeError as exc:
            for line in str(exc).splitlines() or [type(exc).__name__]:
                err.print(f"[red]error[/]: {escape(line)}")
            print_notes(exc)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            err.print("interrupted: rerun the same command to resume where it stopped")
            sys.exit(130)
        except Exception as exc:
            if os.environ.get("KUBEFORGE_DEBUG"):
                traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0]
            err.print(f"[red]error[/]: {type(exc).__name__}: {escape(first)}")
            print_notes(exc)
            err.print(
                "rerun to resume from the last finished stage or checkpoint; KUBEFORGE_DEBUG=1 shows the traceback"
            )
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def print_notes(exc: BaseException) -> None:
    """Notes the error gathered on its way up (PEP 678): the end of a failed stage's log (kubeforge.logs)."""
    for note in getattr(exc, "__notes__", ()):
        err.print(escape(note), style="dim")


@contextmanager
def ray_output_to(log_file: Path, verbose: bool) -> Iterator[None]:
    """Ray's output and its workers' to `log_file` (each stage's to the stage's own, see kubeforge.logs),
    and, with `verbose` only, to the terminal too; this command's own lines reach the terminal either way."""
    with logs.capture(log_file, verbose) as capture:
        err.file, out.file = capture.stderr, capture.stdout
        try:
            yield
        finally:
            # None: follow sys.stderr and sys.stdout again, as the consoles did when they were made.
            err.file = out.file = None  # type: ignore[assignment]


def where_logs_go(log_file: Path, verbose: bool, stages: bool) -> str:
    also = ", and each stage's logs/ray.log" if stages else ""
    shown = "" if verbose else " (--verbose shows it here)"
    return f"Ray's output: {log_file}{also}{shown}"


verbose_option = click.option(
    "--verbose", "-v", is_flag=True,
    help="Show Ray's and its workers' output here as it comes (it goes to log files either way).",
)

workdir_option = click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_WORKDIR,
    show_default=True,
    envvar="KUBEFORGE_WORKDIR",
    help="Where stage outputs, run records and the embedded MLflow store live.",
)


tracking_uri_option = click.option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking server (default: SQLite in the workdir)."
)
reason_option = click.option("--reason", required=True, help="Why, for the audit trail (required).")
user_option = click.option(
    "--user", help="Who acts, for the audit trail (default: $KUBEFORGE_USER, else the login name)."
)
output_option = click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table", show_default=True)


def open_registry(workdir: Path, tracking_uri: str | None) -> Registry:
    """The registry behind --tracking-uri, resolved as `kubeforge run` resolves it."""
    from kubeforge.registry.audit import RegistryError
    from kubeforge.registry.client import Registry
    from kubeforge.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, Workdir(workdir))
    db = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    # MLflow would quietly create an empty database (and the work directory) for a mistyped path,
    # and then report "no registered model": name the missing file instead.
    if db and db != ":memory:" and not Path(db).exists():
        raise RegistryError(f"no MLflow store at {db}: run a pipeline first, or pass --tracking-uri / --workdir")
    return Registry(uri)


def print_wide(table: Table) -> None:
    """Print a table whole when stdout is a pipe or file: rich would squeeze it into 80 columns and
    cut versions, aliases and dates short with an ellipsis, which scripts and logs cannot use."""
    from rich.measure import Measurement

    if out.is_terminal:
        out.print(table)
        return
    # Console.print clamps `width` to the console's own width, so a console of the table's width does it.
    width = max(out.width, Measurement.get(out, out.options.update_width(100_000), table).maximum)
    Console(file=out.file, width=width, highlight=False, soft_wrap=True).print(table)


def short_time(iso: str) -> str:
    """`2026-11-22T12:32:46+00:00` -> `2026-11-22 12:32` (tables say UTC in the header)."""
    return iso.replace("T", " ")[:16]


