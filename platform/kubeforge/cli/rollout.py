"""`kubeforge rollout`: the state of a deployment's canary or A/B rollout, and stopping it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    from kubeforge.registry.audit import current_user

    store, record = load_rollout(workdir, deployment)
    if record.done:
        raise KubeForgeError(f"deployment '{record.subject.deployment}': the rollout already ended ({record.phase}); "
                             "nothing to abort")
    store.request_abort(reason, user or current_user())
    out.print(f"abort requested for '{record.subject.deployment}' (candidate version "
              f"{record.subject.candidate_version})")


if __name__ == "__main__":
    main()

