"""`kubeforge models`: the registered versions of a pipeline's model, their aliases and audit trail."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from kubeforge.cli import main
from kubeforge.cli.common import (
    friendly_errors,
    open_registry,
    out,
    output_option,
    print_wide,
    reason_option,
    short_time,
    tracking_uri_option,
    user_option,
    workdir_option,
)
from kubeforge.secrets import redact_url


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
            out.print(f"no registered models in {escape(redact_url(registry.tracking_uri))}")
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
    from kubeforge.registry.audit import current_user

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
    from kubeforge.registry.audit import current_user

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
    from kubeforge.registry.audit import current_user

    registry = open_registry(workdir, tracking_uri)
    record = registry.approve(model, version, reason=reason, user=user or current_user())
    out.print(escape(record.summary()))



# -- serve -------------------------------------------------------------------------------------


