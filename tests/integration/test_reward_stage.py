"""The reward stage on local Ray over the session's tiny language model: on the built-in pairs (a real
function preferred over a corrupted copy) its held-out accuracy clearly beats chance, every evaluation
reaches MLflow and Prometheus, and its model registers with role `reward` as a one-label
AutoModelForSequenceClassification folder."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from kubeforge.spec.reward import RewardSpec

pytestmark = pytest.mark.integration

SECTION: dict[str, Any] = {
    "pairs": {"builtin": "python-docstrings", "test_fraction": 0.3},
    "method": "full",
    "max_length": 256,
    "train": {"max_steps": 30, "batch_size": 8, "lr": 1e-3, "warmup_steps": 3},
    "eval": {"every_steps": 15, "max_batches": 32},
    "checkpoint": {"every_steps": 15, "keep": 1},
    "resources": {"workers": 1},
}


def test_the_reward_model_ranks_held_out_pairs_and_registers_with_role_reward(tiny_lm) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    from kubeforge import metrics
    from kubeforge.formats.splits import read_split
    from kubeforge.registry.lineage import register_stage_model
    from kubeforge.reward.stage import run
    from kubeforge.stages.reward import REWARD

    ctx = tiny_lm.context("reward", SECTION)
    started = time.monotonic()
    result = run(RewardSpec.model_validate(SECTION), ctx)
    print(f"reward: {time.monotonic() - started:.1f}s {json.dumps(result.to_json())}")

    assert result.final_step == 30 and result.method == "full"
    assert result.num_test_pairs >= 40
    assert result.accuracy >= 0.62 and result.accuracy > result.initial_accuracy, result
    assert result.margin > 0 and result.val_loss < result.initial_val_loss
    base = tiny_lm.pretrain.directory / tiny_lm.pretrain.result.model_dir
    assert result.base_model_dir == str(base.resolve())
    # No held-out pair was trained on.
    train = {r["prompt"] for r in read_split(ctx.out_dir / result.pairs_dir, "train")}
    assert not train & {r["prompt"] for r in read_split(ctx.out_dir / result.pairs_dir, "test")}

    client = MlflowClient(ctx.tracker.tracking_uri)
    for name in ("accuracy", "margin", "val_loss"):
        assert [m.step for m in client.get_metric_history(ctx.tracker.run_id, name)] == [0, 15, 30]
    gauge = metrics.REGISTRY.get_sample_value(
        "kubeforge_train_eval_metric", {"pipeline": "tinylm", "stage": "reward", "metric": "accuracy"}
    )
    assert gauge == pytest.approx(result.accuracy)

    model = AutoModelForSequenceClassification.from_pretrained(str(ctx.out_dir / result.model_dir)).eval()
    assert model.config.num_labels == 1 and model.config.architectures == ["LlamaForSequenceClassification"]
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape == (1, 1)

    registered = register_stage_model(
        ctx.tracker.tracking_uri, "tinylm-reward", REWARD, result, ctx.tracker.run_id, {}, {}
    )
    assert registered is not None
    tags = client.get_model_version("tinylm-reward", registered.version).tags
    assert tags["kubeforge.role"] == "reward" and tags["kubeforge.method"] == "reward-full"
    assert tags["kubeforge.format"] == "hf"


def test_a_lora_reward_model_trains_its_head_and_adapters_and_merges(tiny_lm) -> None:
    """The default method: adapters and the new scalar head train, and the output folder is a plain merged
    one-label classifier (no adapter files needed to load it)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from kubeforge.reward.stage import run

    section = {**SECTION, "method": "lora", "train": {**SECTION["train"], "max_steps": 12},
               "eval": {"every_steps": 12, "max_batches": 16}, "checkpoint": {"every_steps": 12, "keep": 1}}
    ctx = tiny_lm.context("reward", section, "lora")
    result = run(RewardSpec.model_validate(section), ctx)
    assert result.method == "lora" and result.final_step == 12
    assert result.val_loss < result.initial_val_loss, result
    folder = ctx.out_dir / result.model_dir
    assert not (folder / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape == (1, 1)
