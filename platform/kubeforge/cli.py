"""The `kubeforge` command.

Imports stay light at module level (click, rich, pydantic): `kubeforge --help` and
`kubeforge validate` must not pay for torch or Ray.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kubeforge import __version__, logs
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


# -- models ------------------------------------------------------------------------------------

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
    from kubeforge.registry.client import Registry, RegistryError
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


@main.group()
def models() -> None:
    """Registered models: versions, the champion and challenger aliases, approvals, audit trail."""


@models.command("list")
@click.argument("model", required=False)
@workdir_option
@tracking_uri_option
@output_option
@friendly_errors
def models_list(model: str | None, workdir: Path, tracking_uri: str | None, output: str) -> None:
    """Registered models and their aliases; with MODEL, that model's versions, newest first."""
    registry = open_registry(workdir, tracking_uri)
    if model is None:
        summaries = registry.models()
        if output == "json":
            out.print_json(data=[asdict(m) for m in summaries])
            return
        if not summaries:
            out.print(f"no registered models in {escape(registry.tracking_uri)}")
            return
        table = Table(show_edge=False, pad_edge=False, box=None)
        for column in ("model", "champion", "challenger", "latest", "updated (UTC)"):
            table.add_column(column)
        for m in summaries:
            table.add_row(
                escape(m.name),
                m.aliases.get("champion", "-"),
                m.aliases.get("challenger", "-"),
                m.latest_version or "-",
                short_time(m.updated),
            )
        print_wide(table)
        return
    versions = registry.versions(model)
    if output == "json":
        out.print_json(data=[asdict(v) for v in versions])
        return
    if not versions:
        out.print(f"model '{escape(model)}' has no versions")
        return
    table = Table(show_edge=False, pad_edge=False, box=None)
    for column in ("version", "aliases", "role", "method", "quantization", "gates", "approval", "created (UTC)", "run"):
        table.add_column(column)
    for v in versions:
        table.add_row(
            v.version,
            ",".join(v.aliases) or "-",
            escape(v.role or "-"),
            escape(v.method or "-"),
            escape(v.quantization or "-"),
            escape(v.gates or "-"),
            escape(v.approval or "-"),
            short_time(v.created),
            (v.run_id or "-")[:8],
        )
    print_wide(table)


@models.command("show")
@click.argument("model")
@click.argument("version")
@workdir_option
@tracking_uri_option
@output_option
@friendly_errors
def models_show(model: str, version: str, workdir: Path, tracking_uri: str | None, output: str) -> None:
    """One version (VERSION is a number or an alias like @champion): source, lineage, audit records."""
    registry = open_registry(workdir, tracking_uri)
    info = registry.version(model, version)
    records = [r for r in registry.audit(model) if r.touches(info.version)]
    if output == "json":
        out.print_json(data={**asdict(info), "audit": [asdict(r) for r in records]})
        return
    out.print(f"[bold]{escape(info.model)}[/] version {info.version}  aliases: {', '.join(info.aliases) or '-'}")
    out.print(f"source:  {escape(info.source)}")
    out.print(f"run:     {info.run_id or '-'}")
    out.print(f"created: {info.created}")
    for key, value in sorted(info.tags.items()):
        out.print(f"  {escape(key)} = {escape(value)}")
    if not records:
        out.print("audit: no alias moves or approvals of this version")
        return
    table = Table(show_edge=False, pad_edge=False, box=None, title="audit", title_justify="left")
    for column in ("time (UTC)", "user", "action", "alias", "from", "to", "reason"):
        table.add_column(column)
    for r in records:
        table.add_row(
            short_time(r.time),
            escape(r.user),
            r.action,
            r.alias or "-",
            r.from_version or "-",
            r.to_version or "-",
            escape(r.reason),
        )
    print_wide(table)


@models.command("promote")
@click.argument("model")
@click.argument("version")
@click.option(
    "--alias",
    type=click.Choice(["champion", "challenger"]),
    default="champion",
    show_default=True,
    help="The alias VERSION gets.",
)
@reason_option
@click.option("--force", is_flag=True, help="Promote even when its gates failed or approval is missing.")
@user_option
@workdir_option
@tracking_uri_option
@friendly_errors
def models_promote(
    model: str,
    version: str,
    alias: str,
    reason: str,
    force: bool,
    user: str | None,
    workdir: Path,
    tracking_uri: str | None,
) -> None:
    """Point ALIAS (default champion) at VERSION (a number or @challenger), with an audit record."""
    from kubeforge.registry.client import current_user

    registry = open_registry(workdir, tracking_uri)
    record = registry.promote(model, version, alias=alias, reason=reason, user=user or current_user(), force=force)
    out.print(escape(record.summary()))


@models.command("rollback")
@click.argument("model")
@reason_option
@user_option
@workdir_option
@tracking_uri_option
@friendly_errors
def models_rollback(model: str, reason: str, user: str | None, workdir: Path, tracking_uri: str | None) -> None:
    """Give champion back to the version that held it before the current one."""
    from kubeforge.registry.client import current_user

    registry = open_registry(workdir, tracking_uri)
    record = registry.rollback(model, reason=reason, user=user or current_user())
    out.print(escape(record.summary()))


@models.command("approve")
@click.argument("model")
@click.argument("version")
@reason_option
@user_option
@workdir_option
@tracking_uri_option
@friendly_errors
def models_approve(
    model: str, version: str, reason: str, user: str | None, workdir: Path, tracking_uri: str | None
) -> None:
    """Sign off VERSION, which a pipeline's promotion stage is waiting on."""
    from kubeforge.registry.client import current_user

    registry = open_registry(workdir, tracking_uri)
    record = registry.approve(model, version, reason=reason, user=user or current_user())
    out.print(escape(record.summary()))



# -- serve -------------------------------------------------------------------------------------


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
    help="Serve the rollout's Prometheus metrics on this port (the application's own are at /metrics).",
)
@click.option("--no-metrics", is_flag=True, help="Do not serve the rollout's Prometheus metrics.")
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
    if document.spec.rollout is not None and not no_metrics:
        start_metrics_server(metrics_port, host)
    options = ServeOptions(workdir=Workdir(workdir), registry=open_registry(workdir, tracking_uri),
                           ray_address=ray_address, num_cpus=num_cpus, host=host, exit_when_done=exit_when_done)
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


@main.group()
def rollout() -> None:
    """Follow or stop the rollout that `kubeforge serve` runs."""


def load_rollout(workdir: Path, deployment: str) -> tuple[Any, Any]:
    """(store, record) of DEPLOYMENT (a name, or a ModelDeployment manifest file)."""
    from kubeforge.serve.local import rollout_store

    name = deployment
    if deployment.endswith((".yaml", ".yml")) and Path(deployment).is_file():
        from kubeforge.spec.load import load_deployment

        name = load_deployment(Path(deployment)).metadata.name
    store = rollout_store(Workdir(workdir), name)
    record = store.load()
    if record is None:
        raise KubeForgeError(f"deployment '{name}': no rollout recorded in {store.folder} "
                             "(start one with kubeforge serve and a manifest with spec.rollout)")
    return store, record


@rollout.command("status")
@click.argument("deployment")
@workdir_option
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the timeline PNG (default: timeline.png next to the rollout record).")
@output_option
@friendly_errors
def rollout_status(deployment: str, workdir: Path, plot: Path | None, output: str) -> None:
    """Phase, step, weights, the last analysis and the events of DEPLOYMENT's rollout, and a timeline plot."""
    import datetime as dt
    import json
    import time

    from kubeforge.rollout.timeline import plot_timeline

    store, record = load_rollout(workdir, deployment)
    png = plot_timeline(record, plot or store.folder / "timeline.png", now=time.time())
    if output == "json":
        out.print_json(json.dumps({**record.to_dict(), "timeline": str(png)}))
        return
    subject = record.subject
    out.print(f"deployment {subject.deployment}: {record.strategy} rollout, {record.phase}")
    out.print(f"  stable    {subject.model} version {subject.stable_version}: {100 - record.weight}%")
    out.print(f"  candidate {subject.candidate_model} version {subject.candidate_version}: {record.weight}%")
    if record.canary is not None:
        out.print(f"  step {record.canary.step + 1}, failed analyses {record.canary.failures}, "
                  f"inconclusive in a row {record.canary.inconclusive_streak}")
    out.print(f"  {escape(record.reason)}")
    history = record.canary.history if record.canary is not None else ()
    if history:
        last = history[-1]
        table = Table(title=f"last analysis ({last.overall}, step {last.step + 1} at {last.weight}%)")
        for column in ("check", "value", "min", "max", "verdict"):
            table.add_column(column)
        for result in last.results:
            value = "no data" if result.value is None else f"{result.value:.4g}"
            low = "" if result.min is None else f"{result.min:g}"
            high = "" if result.max is None else f"{result.max:g}"
            table.add_row(result.name, value, low, high, result.verdict)
        print_wide(table)
    if record.ab is not None:
        ab = record.ab
        out.print(f"  A/B {ab['metric']}: {ab['test']}, p={ab['p_value']}, winner {ab['winner']}: "
                  f"{escape(ab['reason'])}")
    events = Table(title="events")
    for column in ("time", "event", "weight", "reason"):
        events.add_column(column)
    for event in record.events:
        when = dt.datetime.fromtimestamp(event.time, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        events.add_row(when, event.kind, f"{event.weight}%", escape(event.reason))
    print_wide(events)
    out.print(f"timeline: {png}")


@rollout.command("abort")
@click.argument("deployment")
@reason_option
@user_option
@workdir_option
@friendly_errors
def rollout_abort(deployment: str, reason: str, user: str | None, workdir: Path) -> None:
    """Roll DEPLOYMENT's candidate back (0% traffic, champion untouched); the running `kubeforge serve`
    acts on it within a second, or at its next start."""
    from kubeforge.registry.client import current_user

    store, record = load_rollout(workdir, deployment)
    if record.done:
        raise KubeForgeError(f"deployment '{record.subject.deployment}': the rollout already ended ({record.phase}); "
                             "nothing to abort")
    store.request_abort(reason, user or current_user())
    out.print(f"abort requested for '{record.subject.deployment}' (candidate version "
              f"{record.subject.candidate_version})")


if __name__ == "__main__":
    main()
