"""What several benchmarks share: the quickstart's pretrained model, trained once per work directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def pretrained_model(workdir: Path, manifest: str = "benchmarks") -> tuple[Path, Any]:
    """The quickstart's pretrained model folder and data stage output (`StageOutput[DataResult]`),
    trained here if not cached.

    Only the quickstart's data and pretrain sections run, through the executor, so their cache keys are
    the quickstart's own: after `make demo` in the same work directory nothing trains. `manifest` only
    labels the run record.
    """
    from kubeforge.executor import RunOptions, finished_output, plan, run_pipeline
    from kubeforge.progress import QuietReporter
    from kubeforge.spec.load import parse_manifest
    from kubeforge.workdir import Workdir

    manifest_doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    manifest_doc["spec"] = {"data": manifest_doc["spec"]["data"], "pretrain": manifest_doc["spec"]["pretrain"]}
    pipeline = parse_manifest(manifest_doc)
    options = RunOptions(workdir=Workdir(workdir), base_dir=REPO / "examples", manifest=manifest)
    run_pipeline(pipeline, options, QuietReporter())
    stages = {s.name: s for s in plan(pipeline, options.base_dir)}
    data = finished_output(pipeline, stages["data"], options.workdir)
    pretrain = finished_output(pipeline, stages["pretrain"], options.workdir)
    assert data is not None and pretrain is not None  # run_pipeline just finished both
    return pretrain.directory / pretrain.result.model_dir, data
