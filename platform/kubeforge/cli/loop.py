"""`kubeforge loop`: the retraining loop of a deployment that `kubeforge serve` runs (`spec.monitor.retrain`):
its turns, its kill switch, and a turn on request."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.table import Table

from kubeforge.cli import main
from kubeforge.cli.common import (
    friendly_errors,
    out,
    output_option,
    print_wide,
    reason_option,
    user_option,
    workdir_option,
)
from kubeforge.errors import KubeForgeError
from kubeforge.workdir import Workdir

if TYPE_CHECKING:
    from kubeforge.monitor.loop import LoopStore


@main.group()
def loop() -> None:
    """Follow, pause, resume or start the retraining loop of a served deployment."""


def _store(workdir: Path, deployment: str, must_exist: bool = True) -> tuple[str, LoopStore]:
    from kubeforge.monitor.loop import loop_store

    name = deployment
    if deployment.endswith((".yaml", ".yml")) and Path(deployment).is_file():
        from kubeforge.spec.load import load_deployment

        name = load_deployment(Path(deployment)).metadata.name
    store = loop_store(Workdir(workdir).root, name)
    if must_exist and not store.folder.is_dir():
        raise KubeForgeError(f"deployment '{name}': no retraining loop recorded in {store.folder} (serve a manifest "
                             "with spec.monitor.retrain using kubeforge serve)")
    return name, store


def _when(stamp: float | None) -> str:
    return "" if stamp is None else dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@loop.command("status")
@click.argument("deployment")
@workdir_option
@output_option
@friendly_errors
def loop_status(deployment: str, workdir: Path, output: str) -> None:
    """Every turn of DEPLOYMENT's loop (trigger, run, versions, outcome), the turn running now, and whether the
    loop is paused."""
    name, store = _store(workdir, deployment)
    turns, running, state = store.turns(), store.running(), store.state()
    if output == "json":
        out.print_json(json.dumps({"deployment": name, "paused": bool(state.get("paused")), "state": state,
                                   "running": running.to_dict() if running else None,
                                   "turns": [t.to_dict() for t in turns]}))
        return
    paused = f"PAUSED by {state.get('by')}: {state.get('reason')}" if state.get("paused") else "active"
    out.print(f"deployment {name}: loop {escape(paused)}")
    if running is not None:
        out.print(f"  turn {running.turn} running since {_when(running.started)} ({running.trigger.kind}: "
                  f"{escape(running.trigger.detail)})")
    table = Table(title=f"turns ({len(turns)})")
    for column in ("turn", "started", "minutes", "trigger", "candidate", "champion", "outcome", "reason"):
        table.add_column(column)
    for turn in turns:
        minutes = "" if turn.ended is None else f"{(turn.ended - turn.started) / 60:.1f}"
        champion = f"{turn.champion_before or '-'} -> {turn.champion_after or '-'}"
        trigger = f"{turn.trigger.kind}: {escape(turn.trigger.detail)}"
        table.add_row(str(turn.turn), _when(turn.started), minutes, trigger, turn.candidate_version or "-", champion,
                      turn.outcome or "", escape(turn.reason))
    print_wide(table)


@loop.command("pause")
@click.argument("deployment")
@reason_option
@user_option
@workdir_option
@friendly_errors
def loop_pause(deployment: str, reason: str, user: str | None, workdir: Path) -> None:
    """The kill switch: no new turn starts until `kubeforge loop resume` (a turn running now goes on; stop it
    with `kubeforge rollout abort` during its canary). The monitor keeps exporting its signals."""
    from kubeforge.registry.audit import current_user

    name, store = _store(workdir, deployment, must_exist=False)
    store.set_paused(True, user or current_user(), reason)
    out.print(f"loop of '{name}' paused")


@loop.command("resume")
@click.argument("deployment")
@reason_option
@user_option
@workdir_option
@friendly_errors
def loop_resume(deployment: str, reason: str, user: str | None, workdir: Path) -> None:
    """Let turns start again."""
    from kubeforge.registry.audit import current_user

    name, store = _store(workdir, deployment)
    store.set_paused(False, user or current_user(), reason)
    out.print(f"loop of '{name}' resumed")


@loop.command("trigger")
@click.argument("deployment")
@reason_option
@user_option
@workdir_option
@friendly_errors
def loop_trigger(deployment: str, reason: str, user: str | None, workdir: Path) -> None:
    """Ask the running `kubeforge serve` for a turn now, drift or not; the guard rails (pause, cooldown, turns
    per day) still apply, and a turn already running finishes first."""
    from kubeforge.registry.audit import current_user

    name, store = _store(workdir, deployment, must_exist=False)
    store.request_turn(user or current_user(), reason)
    out.print(f"turn requested for '{name}'; kubeforge serve takes it within a second (kubeforge loop status {name})")
