"""Finding, in MLflow, the run each succeeded stage of a pipeline produced and the version it registered.

The operator does not mount the work volume, and a RayJob's status says nothing of what its job
produced. So each stage job tags its output's MLflow run `kubeforge.rayjob.<RayJob name>` = <pipeline
uid> (`--report-tag`, set by `rayjob.entrypoint`; a stage reused from an earlier run tags that run),
and the operator searches the pipeline's experiment (named after the pipeline, as `kubeforge.tracking`
names it) for that tag. The versions come from the registry, by run id.
"""

from __future__ import annotations

from collections.abc import Mapping

from kubeforge.secrets import redact_url, scrub
from kubeforge_operator.rayjob import StageRun, report_tag


class MlflowUnavailable(Exception):
    """MLflow could not be asked (unreachable, refused): worth trying again later."""


def find_stage_runs(tracking_uri: str, pipeline: str, owner_uid: str, wanted: Mapping[str, str]) -> dict[str, StageRun]:
    """{stage: StageRun} for the `wanted` {stage: RayJob name} whose run MLflow has; blocking (run it in
    a thread). A stage whose job tagged nothing (an older image, a run still finishing) is left out."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not wanted:
        return {}
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        experiment = client.get_experiment_by_name(pipeline)
        if experiment is None:
            return {}
        found: dict[str, StageRun] = {}
        for stage, rayjob in wanted.items():
            # Backquotes: the tag key holds dots and dashes.
            runs = client.search_runs(
                [experiment.experiment_id], f"tags.`{report_tag(rayjob)}` = '{_quoted(owner_uid)}'", max_results=1
            )
            if not runs:
                continue
            run_id = runs[0].info.run_id
            versions = client.search_model_versions(f"name = '{_quoted(pipeline)}' and run_id = '{run_id}'")
            newest = max((int(v.version) for v in versions), default=None)
            found[stage] = StageRun(run_id, None if newest is None else str(newest))
        return found
    except MlflowException as exc:
        raise MlflowUnavailable(f"MLflow at {redact_url(tracking_uri)}: {scrub(exc.message, tracking_uri)}") from exc
    except OSError as exc:  # connection refused, DNS: the server is not there (yet)
        raise MlflowUnavailable(f"MLflow at {redact_url(tracking_uri)}: {scrub(str(exc), tracking_uri)}") from exc


def _quoted(value: str) -> str:
    # Names and uids come from the API server, but a filter string must never be open to injection.
    return value.replace("\\", "\\\\").replace("'", "\\'")
