"""The work directory: content-addressed stage outputs and the record of every run.

Layout (default root `.kubeforge/`)::

    mlflow.db                                  embedded MLflow tracking store
    mlartifacts/                               MLflow artifacts
    pipelines/<name>/stages/<stage>-<key>/     a finished stage (has result.json)
    pipelines/<name>/stages/<stage>-<key>.partial/   a stage in progress, or killed mid-way
    pipelines/<name>/runs/<run-id>.json        one `kubeforge run`: stage states and MLflow run ids
    traffic/<deployment>/traffic-*.parquet     the sample `kubeforge serve` captures (spec.capture)
    logs/<run|serve>-<name>-<time>.log         what Ray printed outside any stage (kubeforge.logs);
                                               a stage's own share is in its folder's logs/ray.log

A stage's key hashes its manifest section, its inputs' keys and a fingerprint of its source
files, so an unchanged stage is found again and skipped, and a changed one gets a fresh folder.
Finishing a stage is one rename of its `.partial` folder: a reader never sees half a stage.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"
DEFAULT_WORKDIR = Path(".kubeforge")


def stage_key(stage: str, section: Mapping[str, Any], inputs: Mapping[str, str], extra: Any = None) -> str:
    """Content hash of everything that determines a stage's output."""
    payload = {"stage": stage, "spec": section, "inputs": dict(sorted(inputs.items())), "extra": extra}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class StageRecord:
    name: str
    key: str
    state: str = "pending"  # pending | running | succeeded | skipped | failed
    mlflow_run_id: str | None = None
    started: str | None = None
    finished: str | None = None
    error: str | None = None


@dataclass
class RunRecord:
    run_id: str
    pipeline: str
    manifest: str
    started: str
    state: str = "running"  # running | succeeded | failed | interrupted
    finished: str | None = None
    tracking_uri: str | None = None
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    stages: list[StageRecord] = field(default_factory=list)

    def effective_state(self) -> str:
        """`running` only while the recording process lives; a killed run reads `interrupted`."""
        if self.state == "running" and self.host == socket.gethostname() and not _alive(self.pid):
            return "interrupted"
        return self.state

    def stage(self, name: str) -> StageRecord:
        for record in self.stages:
            if record.name == name:
                return record
        raise KeyError(name)


class Workdir:
    def __init__(self, root: str | Path = DEFAULT_WORKDIR) -> None:
        self.root = Path(root).absolute()

    # -- locations ---------------------------------------------------------------------------
    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    def traffic(self, deployment: str) -> Path:
        """Where `kubeforge serve` writes a deployment's captured traffic (`spec.capture` without a path)."""
        return self.root / "traffic" / deployment

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def pipeline_dir(self, pipeline: str) -> Path:
        return self.root / "pipelines" / pipeline

    def stage_dir(self, pipeline: str, stage: str, key: str) -> Path:
        return self.pipeline_dir(pipeline) / "stages" / f"{stage}-{key}"

    def partial_dir(self, pipeline: str, stage: str, key: str) -> Path:
        return self.stage_dir(pipeline, stage, key).with_name(f"{stage}-{key}.partial")

    # -- stage outputs -----------------------------------------------------------------------
    def finished_result(self, pipeline: str, stage: str, key: str) -> dict[str, Any] | None:
        """The result of a finished stage with this key, or None."""
        path = self.stage_dir(pipeline, stage, key) / RESULT_FILE
        if not path.is_file():
            return None
        result: dict[str, Any] = json.loads(path.read_text())
        return result

    def begin_stage(self, pipeline: str, stage: str, key: str) -> Path:
        """The `.partial` folder to work in; kept from an interrupted run so the stage resumes."""
        partial = self.partial_dir(pipeline, stage, key)
        partial.mkdir(parents=True, exist_ok=True)
        return partial

    def finish_stage(self, pipeline: str, stage: str, key: str, result: Mapping[str, Any]) -> Path:
        partial = self.partial_dir(pipeline, stage, key)
        write_json(partial / RESULT_FILE, dict(result))
        final = self.stage_dir(pipeline, stage, key)
        if final.exists():  # a concurrent run finished the same stage first; theirs is as good
            shutil.rmtree(partial)
        else:
            os.replace(partial, final)
        return final

    def discard_stage(self, pipeline: str, stage: str, key: str) -> None:
        """Remove a stage's partial output after an input error, so nothing half-made remains."""
        shutil.rmtree(self.partial_dir(pipeline, stage, key), ignore_errors=True)

    # -- run records -------------------------------------------------------------------------
    def new_run(self, pipeline: str, manifest: str, tracking_uri: str | None) -> RunRecord:
        run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        return RunRecord(run_id=run_id, pipeline=pipeline, manifest=manifest, started=now(), tracking_uri=tracking_uri)

    def save_run(self, record: RunRecord) -> None:
        write_json(self.pipeline_dir(record.pipeline) / "runs" / f"{record.run_id}.json", asdict(record))

    def runs(self, pipeline: str | None = None) -> list[RunRecord]:
        """Every recorded run, oldest first."""
        pattern = f"pipelines/{pipeline or '*'}/runs/*.json"
        records = []
        for path in self.root.glob(pattern):
            data = json.loads(path.read_text())
            data["stages"] = [StageRecord(**s) for s in data.get("stages", [])]
            records.append(RunRecord(**data))
        return sorted(records, key=lambda r: (r.started, r.run_id))


def write_json(path: Path, data: Any) -> None:
    """Write atomically, so a killed process never leaves a truncated JSON file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
