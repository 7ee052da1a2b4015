"""The `kubeforge` command: `run`, `validate`, `status` and `serve` here, `models` and `rollout` in
their own modules, what they share in `common`.

Imports stay light at module level (click, rich, pydantic): `kubeforge --help` and
`kubeforge validate` must not pay for torch or Ray.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from kubeforge import __version__, logs
from kubeforge.cli.common import (
    DEFAULT_METRICS_PORT,
    err,
    friendly_errors,
    open_registry,
    out,
    ray_output_to,
    tracking_uri_option,
    verbose_option,
    where_logs_go,
    workdir_option,
)
from kubeforge.errors import KubeForgeError
from kubeforge.secrets import redact_url
from kubeforge.workdir import Workdir


@click.group()
@click.version_option(__version__, prog_name="kubeforge")
def main() -> None:
    """KubeForge: data, pretraining and the rest of a language model's life from one manifest."""


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--no-check-files", is_flag=True, help="Do not require local source files to exist.")
@friendly_errors
def validate(manifest: Path, no_check_files: bool) -> None:
    """Check MANIFEST (a ModelPipeline or a ModelDeployment) and print one line per problem (exit 2 when invalid)."""
    from kubeforge.spec.load import load_any
    from kubeforge.spec.pipeline import ModelPipeline

    document = load_any(manifest, check_files=not no_check_files)
    if isinstance(document, ModelPipeline):
        detail = "stages: " + ", ".join(document.stage_names())
    else:
        rollout = document.spec.rollout
        detail = f"serves {document.spec.model}" + (
            f", {rollout.strategy} rollout of {rollout.candidate}" if rollout is not None else "")
    out.print(f"{manifest}: valid {document.kind} '{document.metadata.name}' ({detail})")


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
@click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE",
              help="Override a spec field, e.g. --set finetune.train.max_steps=200 (repeatable; value read as YAML).")
@verbose_option
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
    overrides: tuple[str, ...],
    verbose: bool,
) -> None:
    """Run every stage of MANIFEST on a local Ray runtime, skipping stages that already finished."""
    from kubeforge.executor import RunOptions, run_pipeline
    from kubeforge.progress import RichReporter
    from kubeforge.spec.load import load_manifest

    pipeline = load_manifest(manifest, overrides=overrides)
    if not no_metrics:
        start_metrics_server(metrics_port, metrics_addr)
    options = RunOptions(
        workdir=Workdir(workdir),
        base_dir=manifest.parent.absolute(),
        manifest=" ".join([str(manifest), *(f"--set {item}" for item in overrides)]),
        tracking_uri=tracking_uri,
        ray_address=ray_address,
        num_cpus=num_cpus,
    )
    log_file = logs.session_log(options.workdir.logs, f"run-{pipeline.metadata.name}")
    with ray_output_to(log_file, verbose):
        err.print(escape(where_logs_go(log_file, verbose, stages=True)), style="dim")
        with RichReporter(err, redirect_output=verbose) as reporter:
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
            f"started {record.started}  tracking {redact_url(record.tracking_uri or '-')}"
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


# -- models ------------------------------------------------------------------------------------

@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@workdir_option
@tracking_uri_option
@click.option(
    "--ray-address", envvar="RAY_ADDRESS", help="Ray cluster to use (default: start a local one for this run)."
)
@click.option("--num-cpus", type=click.IntRange(min=1), help="CPUs of the local Ray runtime (default: all).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 in a pod).")
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=DEFAULT_METRICS_PORT + 1,
    show_default=True,
    envvar="KUBEFORGE_SERVE_METRICS_PORT",
    help="Serve the rollout's and the monitor's Prometheus metrics on this port (the application's are at /metrics).",
)
@click.option("--no-metrics", is_flag=True, help="Do not serve the rollout's and the monitor's Prometheus metrics.")
@click.option("--exit-when-done", is_flag=True,
              help="Stop serving once the rollout has ended (for scripts); without a rollout, stop at once.")
@verbose_option
@friendly_errors
def serve(manifest: Path, workdir: Path, tracking_uri: str | None, ray_address: str | None, num_cpus: int | None,
          host: str, metrics_port: int, no_metrics: bool, exit_when_done: bool, verbose: bool) -> None:
    """Serve the ModelDeployment MANIFEST (OpenAI-compatible HTTP on spec.port) until Ctrl-C.

    With spec.rollout, the candidate is served next to the stable model and the rollout runs to its
    end: a canary moves its weight step by step while Prometheus says it is healthy, then promotes it
    (alias champion) or rolls it back; an A/B test compares the variants after its duration. Follow
    it with `kubeforge rollout status NAME`. Started again, it resumes an unfinished rollout."""
    from kubeforge.serve.local import ServeOptions, serve_deployment
    from kubeforge.spec.load import load_deployment

    document = load_deployment(manifest)
    if (document.spec.rollout is not None or document.spec.monitor is not None) and not no_metrics:
        start_metrics_server(metrics_port, host)
    options = ServeOptions(workdir=Workdir(workdir), registry=open_registry(workdir, tracking_uri),
                           ray_address=ray_address, num_cpus=num_cpus, host=host, exit_when_done=exit_when_done,
                           base_dir=manifest.parent.absolute())
    log_file = logs.session_log(options.workdir.logs, f"serve-{document.metadata.name}")
    with ray_output_to(log_file, verbose):
        out.print(escape(where_logs_go(log_file, verbose, stages=False)))
        serve_deployment(document, options, lambda line: out.print(escape(line)))


# -- bench -------------------------------------------------------------------------------------


@main.group()
def bench() -> None:
    """Measure a running deployment (benchmarks/ holds the side-by-side comparisons)."""


def _add_bench_commands() -> None:
    from kubeforge.serve.loadgen import load_command  # click and httpx only: `kubeforge --help` stays fast

    bench.add_command(load_command)


_add_bench_commands()


# -- rollout -----------------------------------------------------------------------------------


from kubeforge.cli import harness, loop, models, rollout  # noqa: E402, F401  (their commands join `main`)

__all__ = ["friendly_errors", "loop", "main", "models", "rollout"]
