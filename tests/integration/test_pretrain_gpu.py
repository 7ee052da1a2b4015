"""The GPU paths of pretraining: NCCL, FSDP, bf16 autocast and the MFU estimate (skipped without CUDA;
FSDP needs two GPUs)."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from kubeforge.context import StageOutput
from kubeforge.pretrain.stage import run
from tests.integration.test_pretrain import _context, _spec, data_output

pytestmark = [pytest.mark.integration, pytest.mark.gpu]

__all__ = ["data_output"]  # the module-scoped fixture, shared with the CPU tests


def test_one_gpu_worker_trains_in_bf16_and_reports_mfu(ray_local, data_output: StageOutput, tmp_path) -> None:
    # FSDP with one worker is refused by the manifest (nothing to shard across): see test_engine_fsdp.
    _trains_and_writes_a_plain_model(data_output, tmp_path, _spec(resources={"workers": 1, "use_gpu": True},
                                                                  train={"precision": "auto"}))


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


@pytest.mark.skipif(_gpus() < 2, reason="FSDP shards across 2 workers, one GPU each (NCCL takes no shared GPU)")
def test_fsdp_on_two_gpus_trains_in_bf16_and_writes_a_plain_model(ray_local, data_output: StageOutput,
                                                                  tmp_path) -> None:
    """The sharded path on NCCL: layer units, bf16 autocast over sharded parameters, a checkpoint in the
    middle (gathered to rank 0) and the final model folder built from the gathered weights."""
    spec = _spec(strategy="fsdp", resources={"workers": 2, "use_gpu": True}, train={"precision": "auto"})
    _trains_and_writes_a_plain_model(data_output, tmp_path, spec)


def _trains_and_writes_a_plain_model(data_output: StageOutput, tmp_path, spec) -> None:
    from mlflow.tracking import MlflowClient

    ctx = _context(tmp_path, data_output)
    result = run(spec, ctx)
    assert result.val_perplexity < 0.5 * result.initial_val_perplexity
    history = MlflowClient(ctx.tracker.tracking_uri).get_metric_history(ctx.tracker.run_id, "mfu")
    assert history and all(0 < m.value < 1 for m in history)
    model = AutoModelForCausalLM.from_pretrained(ctx.out_dir / result.model_dir)
    assert sum(p.numel() for p in model.parameters()) == result.num_parameters
