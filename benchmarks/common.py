"""What several benchmarks share: the quickstart's pretrained model, trained once per work directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def pretrained_model(workdir: Path, manifest: str = "benchmarks") -> tuple[Path, Any]:
    """The quickstart's pretrained model folder and data stage output (trained here if not cached).

    Only the quickstart's data and pretrain sections run, through the executor, so their cache keys are
    the quickstart's own: after `make demo` in the same work directory nothing trains. `manifest` only
    labels the run record.
    """
    from kubeforge.executor import RunOptions, plan, run_pipeline
    from kubeforge.progress import QuietReporter
    from kubeforge.spec.load import parse_manifest
    from kubeforge.workdir import Workdir

    manifest_doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    manifest_doc["spec"] = {"data": manifest_doc["spec"]["data"], "pretrain": manifest_doc["spec"]["pretrain"]}
    pipeline = parse_manifest(manifest_doc)
    options = RunOptions(workdir=Workdir(workdir), base_dir=REPO / "examples", manifest=manifest)
    run_pipeline(pipeline, options, QuietReporter())
    stages = {s.name: s for s in plan(pipeline, options.base_dir)}
    data_dir = options.workdir.stage_dir(pipeline.metadata.name, "data", stages["data"].key)
    model_dir = options.workdir.stage_dir(pipeline.metadata.name, "pretrain", stages["pretrain"].key) / "model"
    return model_dir, json.loads((data_dir / "result.json").read_text()) | {"_dir": str(data_dir)}
