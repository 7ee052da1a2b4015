"""The `kubeforge` command.

Imports stay light at module level (click, rich, pydantic): `kubeforge --help` and
`kubeforge validate` must not pay for torch or Ray.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kubeforge import __version__
from kubeforge.errors import KubeForgeError, SpecError
from kubeforge.workdir import DEFAULT_WORKDIR, Workdir

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
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            err.print("interrupted: rerun the same command to resume where it stopped")
            sys.exit(130)
        except Exception as exc:
            if os.environ.get("KUBEFORGE_DEBUG"):
                traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0]
            err.print(f"[red]error[/]: {type(exc).__name__}: {escape(first)}")
            err.print(
                "rerun to resume from the last finished stage or checkpoint; KUBEFORGE_DEBUG=1 shows the traceback"
            )
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


workdir_option = click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_WORKDIR,
    show_default=True,
    envvar="KUBEFORGE_WORKDIR",
    help="Where stage outputs, run records and the embedded MLflow store live.",
)


@click.group()
@click.version_option(__version__, prog_name="kubeforge")
def main() -> None:
    """KubeForge: data, pretraining and the rest of a language model's life from one manifest."""


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--no-check-files", is_flag=True, help="Do not require local source files to exist.")
@friendly_errors
def validate(manifest: Path, no_check_files: bool) -> None:
    """Check MANIFEST and print one line per problem (exit 2 when invalid)."""
    from kubeforge.spec import load_manifest

    pipeline = load_manifest(manifest, check_files=not no_check_files)
    stages = ", ".join(pipeline.stage_names())
    out.print(f"{manifest}: valid {pipeline.kind} '{pipeline.metadata.name}' (stages: {stages})")


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@workdir_option
@click.option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking server (default: SQLite in the workdir)."
)
@click.option(
    "--ray-address", envvar="RAY_ADDRESS", help="Ray cluster to use (default: start a local one for this run)."
)
@click.option("--num-cpus", type=click.IntRange(min=1), help="CPUs of the local Ray runtime (default: all).")
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=DEFAULT_METRICS_PORT,
    show_default=True,
    envvar="KUBEFORGE_METRICS_PORT",
    help="Serve Prometheus metrics on this port while running.",
)
@click.option(
    "--metrics-addr",
    default="127.0.0.1",
    show_default=True,
    envvar="KUBEFORGE_METRICS_ADDR",
    help="Address the metrics server binds to (0.0.0.0 inside a pod).",
)
@click.option("--no-metrics", is_flag=True, help="Do not serve Prometheus metrics.")
@friendly_errors
def run(
    manifest: Path,
    workdir: Path,
    tracking_uri: str | None,
    ray_address: str | None,
    num_cpus: int | None,
    metrics_port: int,
    metrics_addr: str,
    no_metrics: bool,
) -> None:
    """Run every stage of MANIFEST on a local Ray runtime, skipping stages that already finished."""
    from kubeforge.executor import RunOptions, run_pipeline
    from kubeforge.progress import RichReporter
    from kubeforge.spec import load_manifest

    pipeline = load_manifest(manifest)
    if not no_metrics:
        start_metrics_server(metrics_port, metrics_addr)
    options = RunOptions(
        workdir=Workdir(workdir),
        base_dir=manifest.parent.absolute(),
        manifest=str(manifest),
        tracking_uri=tracking_uri,
        ray_address=ray_address,
        num_cpus=num_cpus,
    )
    with RichReporter(err) as reporter:
        record = run_pipeline(pipeline, options, reporter)
    out.print(f"run {record.run_id}: {record.state}")
    print_stages(record)


def start_metrics_server(port: int, addr: str) -> None:
    from kubeforge import metrics

    try:
        metrics.serve(port, addr)
    except OSError as exc:
        raise KubeForgeError(
            f"--metrics-port {port}: cannot listen on {addr}:{port} ({exc.strerror}); pass another port or --no-metrics"
        ) from None
    err.print(f"metrics: http://{addr}:{port}/metrics")


@main.command()
@workdir_option
@click.option("--pipeline", help="Only runs of this pipeline.")
@click.option("--limit", type=click.IntRange(min=1), default=5, show_default=True, help="Newest runs to show.")
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table", show_default=True)
@friendly_errors
def status(workdir: Path, pipeline: str | None, limit: int, output: str) -> None:
    """Runs, their stages and state, and each stage's MLflow run id."""
    records = Workdir(workdir).runs(pipeline)[-limit:]
    if output == "json":
        payload = []
        for record in records:
            data = asdict(record)
            data["state"] = record.effective_state()
            payload.append(data)
        out.print_json(data=payload)
        return
    if not records:
        where = f" of pipeline '{pipeline}'" if pipeline else ""
        out.print(f"no runs{where} in {Workdir(workdir).root}")
        return
    for record in records:
        out.print(
            f"[bold]{record.pipeline}[/] run {record.run_id}  {record.effective_state()}  "
            f"started {record.started}  tracking {record.tracking_uri}"
        )
        print_stages(record)


def print_stages(record: Any) -> None:
    table = Table(show_edge=False, pad_edge=False, box=None)
    for column in ("stage", "state", "key", "mlflow run", "started", "finished", "error"):
        table.add_column(column)
    for stage in record.stages:
        table.add_row(
            stage.name,
            stage.state,
            stage.key,
            stage.mlflow_run_id or "-",
            stage.started or "-",
            stage.finished or "-",
            escape(stage.error or ""),
        )
    out.print(table)


if __name__ == "__main__":
    main()
