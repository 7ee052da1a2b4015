"""The GPU paths of pretraining: NCCL, FSDP, bf16 autocast and the MFU estimate (skipped without CUDA)."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from kubeforge.context import StageOutput
from kubeforge.pretrain.stage import run
from tests.integration.test_pretrain import _context, _spec, data_output

pytestmark = [pytest.mark.integration, pytest.mark.gpu]

__all__ = ["data_output"]  # the module-scoped fixture, shared with the CPU tests


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_gpu_worker_trains_in_bf16_and_reports_mfu(ray_local, data_output: StageOutput, tmp_path, strategy) -> None:
    from mlflow.tracking import MlflowClient

    ctx = _context(tmp_path, data_output)
    spec = _spec(strategy=strategy, resources={"workers": 1, "use_gpu": True}, train={"precision": "auto"})
    result = run(spec, ctx)
    assert result.val_perplexity < 0.5 * result.initial_val_perplexity
    history = MlflowClient(ctx.tracker.tracking_uri).get_metric_history(ctx.tracker.run_id, "mfu")
    assert history and all(0 < m.value < 1 for m in history)
    model = AutoModelForCausalLM.from_pretrained(ctx.out_dir / result.model_dir)
    assert sum(p.numel() for p in model.parameters()) == result.num_parameters
