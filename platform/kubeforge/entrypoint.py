"""Shared command line of the Ray job entrypoints in jobs/: run one stage of a manifest.

The entrypoint runs wherever Ray puts the job driver (`ray job submit`, a KubeRay RayJob's
submitter pod); it connects to that cluster through RAY_ADDRESS, which Ray sets for jobs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kubeforge.errors import KubeForgeError, SpecError


def main(stage: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"jobs/{stage}.py", description=f"Run the {stage} stage of a manifest.")
    parser.add_argument("--manifest", required=True, type=Path, help="ModelPipeline manifest (YAML).")
    parser.add_argument("--workdir", required=True, type=Path, help="Shared work directory (a volume on Kubernetes).")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite in the workdir).")
    parser.add_argument("--metrics-port", type=int, help="Serve Prometheus metrics on this port while running.")
    parser.add_argument("--metrics-addr", default="0.0.0.0", help="Address for the metrics server.")
    args = parser.parse_args(argv)

    from kubeforge import metrics
    from kubeforge.executor import RunOptions, run_stage
    from kubeforge.progress import LineReporter
    from kubeforge.spec import load_manifest
    from kubeforge.workdir import Workdir

    try:
        pipeline = load_manifest(args.manifest)
        if args.metrics_port:
            metrics.serve(args.metrics_port, args.metrics_addr)
        options = RunOptions(
            workdir=Workdir(args.workdir),
            base_dir=args.manifest.parent.absolute(),
            manifest=str(args.manifest),
            tracking_uri=args.tracking_uri,
        )
        output = run_stage(pipeline, stage, options, LineReporter())
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
