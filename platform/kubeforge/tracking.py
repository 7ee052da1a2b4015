"""MLflow: one experiment per pipeline, one run per stage, lineage tags on every run.

All calls go through an explicit `MlflowClient` and run id rather than MLflow's global "active
run", so that stages never depend on hidden state and the same code works from a Ray job.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubeforge import __version__
from kubeforge.errors import KubeForgeError
from kubeforge.secrets import redact_url, scrub
from kubeforge.workdir import Workdir

TAG_PREFIX = "kubeforge."


def resolve_tracking_uri(explicit: str | None, workdir: Workdir) -> str:
    """--tracking-uri, then MLFLOW_TRACKING_URI, then the embedded SQLite store in the work directory."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir.mlflow_db}"


def code_version() -> str:
    """Package version plus the git commit when running from a checkout (recorded as lineage)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{sha}" if sha else __version__


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}: MLflow params are flat."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class Tracker:
    """Logs to one stage's MLflow run."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        # A resumed run already holds these params; MLflow refuses to overwrite a param.
        fresh = [Param(k, str(v)[:6000]) for k, v in flatten(params).items() if k not in existing]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), stamp, step or 0) for k, v in metrics.items() if v is not None and math.isfinite(v)
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, filename: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / filename
            target.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
            self.log_artifact(target)

    def log_dataset(
        self, name: str, digest: str, source: str, context: str, profile: Mapping[str, Any] | None = None
    ) -> None:
        """Record a dataset by content hash as an MLflow run input (the lineage link between runs).

        Built as the entity MLflow's `LocalArtifactDatasetSource` would produce ("local" source with
        a URI), without loading the data into a pandas frame just to log its fingerprint.
        """
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        dataset = Dataset(
            name=name,
            digest=digest[:36],  # MLflow's column limit
            source_type="local",
            source=json.dumps({"uri": source}),
            profile=json.dumps(dict(profile), default=str) if profile else None,
        )
        tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset=dataset, tags=tags)])


def start_stage_run(
    tracking_uri: str, workdir: Workdir, experiment: str, stage: str, tags: Mapping[str, Any], resume_run_id: str | None
) -> Tracker:
    """Create (or reopen, when resuming an interrupted stage) the stage's MLflow run."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            # With the embedded store, artifacts go under the work directory, not ./mlruns.
            location = None
            if tracking_uri.startswith("sqlite:"):
                location = (workdir.artifacts / experiment).as_uri()
            experiment_id = client.create_experiment(experiment, artifact_location=location)
        else:
            experiment_id = found.experiment_id
        if resume_run_id is not None:
            try:
                run = client.get_run(resume_run_id)
                if run.info.experiment_id == experiment_id:
                    client.update_run(resume_run_id, status="RUNNING")
                    return Tracker(tracking_uri, resume_run_id)
            except MlflowException:
                pass  # the earlier run was deleted or lives in another store: start afresh
        run = client.create_run(experiment_id, run_name=stage, tags={k: str(v) for k, v in tags.items()})
    except MlflowException as exc:
        raise KubeForgeError(f"MLflow at {redact_url(tracking_uri)}: {scrub(exc.message, tracking_uri)}") from None
    return Tracker(tracking_uri, run.info.run_id)


def end_stage_run(tracker: Tracker, status: str) -> None:
    tracker.client.set_terminated(tracker.run_id, status=status)
