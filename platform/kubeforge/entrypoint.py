"""The command line of the Ray job entrypoint `jobs/stage.py`: run one stage of a manifest.

The entrypoint runs wherever Ray puts the job driver (`ray job submit`, a KubeRay RayJob's
submitter pod); it connects to that cluster through RAY_ADDRESS, which Ray sets for jobs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kubeforge.errors import KubeForgeError, SpecError


def main(argv: list[str] | None = None) -> int:
    from kubeforge import stages

    parser = argparse.ArgumentParser(prog="jobs/stage.py", description="Run one stage of a manifest.")
    parser.add_argument("stage", choices=[s.name for s in stages.all_stages()], help="The stage to run.")
    parser.add_argument("--manifest", required=True, type=Path, help="ModelPipeline manifest (YAML).")
    parser.add_argument("--workdir", required=True, type=Path, help="Shared work directory (a volume on Kubernetes).")
    parser.add_argument("--base-dir", type=Path,
                        help="Folder the manifest's relative paths resolve against (default: the manifest's).")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite in the workdir).")
    parser.add_argument("--metrics-port", type=int, help="Serve Prometheus metrics on this port while running.")
    parser.add_argument("--metrics-addr", default="0.0.0.0", help="Address for the metrics server.")
    parser.add_argument(
        "--report-tag", metavar="KEY=VALUE", type=_tag,
        help="Set this tag on the MLflow run that produced the stage's output (the earlier run when the stage "
             "is reused): how the Kubernetes operator finds the run of each RayJob.")
    args = parser.parse_args(argv)
    stage = args.stage

    from kubeforge import logs, metrics
    from kubeforge.executor import RunOptions, run_stage
    from kubeforge.progress import LineReporter
    from kubeforge.spec.load import load_manifest
    from kubeforge.tracking import resolve_tracking_uri
    from kubeforge.workdir import Workdir

    try:
        base_dir = (args.base_dir or args.manifest.parent).absolute()
        pipeline = load_manifest(args.manifest, base_dir=base_dir)
        if args.metrics_port:
            metrics.serve(args.metrics_port, args.metrics_addr)
        options = RunOptions(
            workdir=Workdir(args.workdir),
            base_dir=base_dir,
            manifest=str(args.manifest),
            tracking_uri=args.tracking_uri,
        )
        # A job's output is its log (`ray job logs`, the pod's): all of it stays on stdout and stderr, as
        # with `kubeforge run --verbose`; the stage's share also goes to its folder and MLflow run.
        with logs.capture(None, verbose=True):
            output = run_stage(pipeline, stage, options, LineReporter())
        if args.report_tag and output.mlflow_run_id:
            _report(output.mlflow_run_id, args.report_tag, resolve_tracking_uri(args.tracking_uri, options.workdir))
    except SpecError as exc:
        for problem in exc.problems:
            print(f"error: {args.manifest}: {problem}", file=sys.stderr)
        return exc.exit_code
    except KubeForgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    # The last stdout line is machine-readable, so a submitter can pick up where outputs went.
    print(json.dumps({"stage": stage, "directory": str(output.directory), "mlflow_run_id": output.mlflow_run_id}))
    return 0


def _tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _report(run_id: str, tag: tuple[str, str], tracking_uri: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=tracking_uri).set_tag(run_id, *tag)
    except MlflowException as exc:
        # The stage's work is done and saved; failing the job now would only make it run again.
        print(f"warning: could not tag MLflow run {run_id} with {tag[0]}: {exc.message}", file=sys.stderr)
