"""A tiny trained language model shared by the fine-tuning, tuning and evaluation tests.

Building it (data stage over 60 standard-library files, then 60 pretraining steps of a 2-layer
Llama) takes about a minute; it is built once per test session and only by the tests that ask for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubeforge.context import StageContext, StageOutput
from kubeforge.spec.load import parse_manifest
from kubeforge.spec.pipeline import ModelPipeline
from kubeforge.stages.finetune import FinetuneResult
from kubeforge.tracking import Tracker, start_stage_run
from kubeforge.workdir import Workdir
from tests.data_fixtures import RecordingReporter

PIPELINE = "tinylm"
# hidden 128 with 2 heads gives head_dim 64, the smallest head vLLM's CPU attention supports.
TINY_LM_PRETRAIN: dict[str, Any] = {
    "model": {"hidden_size": 128, "num_layers": 2, "num_heads": 2, "max_position_embeddings": 256},
    "train": {"max_steps": 60, "batch_size": 8, "lr": 3e-3, "warmup_steps": 6},
    "eval": {"every_steps": 30, "max_batches": 4},
    "checkpoint": {"every_steps": 30, "keep": 1},
    "resources": {"workers": 2},
}
TINY_LM_DATA: dict[str, Any] = {
    "sources": [{"type": "python-stdlib", "max_files": 60}],
    "tokenizer": {"vocab_size": 512},
    "packing": {"seq_len": 128},
}


@dataclass
class TinyLM:
    root: Path
    workdir: Workdir
    tracking_uri: str
    pipeline: ModelPipeline
    data: StageOutput
    pretrain: StageOutput

    def context(self, stage: str, spec_section: dict[str, Any] | None = None, name: str | None = None) -> StageContext:
        """A fresh output folder and MLflow run for `stage`, with data and pretrain as its inputs.

        `spec_section` is set as `spec.<stage>` of the context's pipeline (stages read it for names and
        cross-references); `name` makes the folder unique when a test runs the same stage twice.
        """
        manifest = self.pipeline.model_dump(mode="json", exclude_none=True)
        if spec_section is not None:
            manifest["spec"][stage] = spec_section
        pipeline = parse_manifest(manifest)
        out_dir = self.root / f"{name or stage}.partial"
        out_dir.mkdir(parents=True, exist_ok=True)
        return StageContext(
            pipeline=pipeline, stage=stage, out_dir=out_dir, base_dir=self.root,
            tracker=self.tracker(stage), reporter=RecordingReporter(),
            inputs={"data": self.data, "pretrain": self.pretrain},
        )

    def tracker(self, stage: str) -> Tracker:
        return start_stage_run(self.tracking_uri, self.workdir, PIPELINE, stage, {}, None)


@pytest.fixture(scope="session")
def tiny_lm(ray_local, tmp_path_factory: pytest.TempPathFactory) -> TinyLM:
    from kubeforge.data.stage import run as run_data
    from kubeforge.pretrain.stage import run as run_pretrain

    root = tmp_path_factory.mktemp("tinylm")
    workdir = Workdir(root / "work")
    workdir.root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{workdir.mlflow_db}"
    pipeline = parse_manifest({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelPipeline", "metadata": {"name": PIPELINE},
        "spec": {"data": TINY_LM_DATA, "pretrain": TINY_LM_PRETRAIN},
    })
    outputs: dict[str, StageOutput] = {}
    for stage, run, section in (
        ("data", run_data, pipeline.spec.data), ("pretrain", run_pretrain, pipeline.spec.pretrain)
    ):
        out_dir = root / stage
        out_dir.mkdir()
        ctx = StageContext(
            pipeline=pipeline, stage=stage, out_dir=out_dir, base_dir=root,
            tracker=start_stage_run(uri, workdir, PIPELINE, stage, {}, None), reporter=RecordingReporter(),
            inputs=dict(outputs),
        )
        result = run(section, ctx)  # type: ignore[operator]
        outputs[stage] = StageOutput(stage, "fixture", out_dir, result, ctx.tracker.run_id)
    return TinyLM(root, workdir, uri, pipeline, outputs["data"], outputs["pretrain"])


def finetune_result(**fields: Any) -> FinetuneResult:
    """A fine-tuning stage's result for tests that lay out its folder by hand: `fields` over defaults."""
    defaults: dict[str, Any] = {
        "model_dir": "merged", "adapter_dir": None, "task_dir": "task", "base_model_dir": "base",
        "objective": "sft", "method": "full", "trainable_parameters": 1, "total_parameters": 1,
        "trainable_share": 1.0, "initial_val_loss": 1.0, "val_loss": 1.0, "final_step": 1, "train_loss": 1.0,
        "tokens_per_second": 1.0, "tokens_seen": 1, "resumed_from_step": 0, "restored_from_steps": [],
        "num_train_examples": 1, "num_validation_examples": 1, "num_test_examples": 1, "dropped_examples": 0,
        "workers": 1,
    }
    return FinetuneResult(**{**defaults, **fields})
