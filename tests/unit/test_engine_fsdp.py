"""FSDP (torch FSDP2, `kubeforge.engine.fsdp`): one unit per transformer layer, the optimizer's groups
as without sharding, checkpoints that gather, resume and load without FSDP, and the refusals.

The sharded run is real: two processes on CPU over gloo (no Ray), running the pretraining recipe."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kubeforge.engine.batches import Batcher
from kubeforge.engine.fsdp import ShardingError, layer_classes, shard_model
from kubeforge.engine.model import build_model
from kubeforge.engine.optim import build_optimizer
from kubeforge.engine.session import LocalSession
from kubeforge.engine.state import STATE_FILE
from kubeforge.engine.steps import evaluate_tokens, train_step
from kubeforge.errors import StageError
from kubeforge.pretrain.config import PretrainLoop
from kubeforge.spec.pretrain import PretrainSpec
from tests.unit.test_spec import manifest, problems

pytestmark = pytest.mark.unit

VOCAB = 128
SPECIAL = {"eos_id": 0, "pad_id": 1, "mask_id": 2, "unk_id": 3}
WORLD = 2


def _spec(strategy: str = "fsdp", objective: str = "causal", max_steps: int = 2) -> PretrainSpec:
    """The spec's default (smallest) model: hidden 128, 2 layers, 2 heads; a checkpoint every step."""
    return PretrainSpec.model_validate({
        "objective": objective,
        "strategy": strategy,
        "train": {"max_steps": max_steps, "batch_size": 2, "warmup_steps": 1, "precision": "fp32"},
        "eval": {"every_steps": 1, "max_batches": 1},
        "checkpoint": {"every_steps": 1},
        "resources": {"workers": WORLD, "use_gpu": True},  # the manifest allows FSDP on GPUs only
    })


def _loop(root: Path, spec: PretrainSpec, fallback: Path | None = None) -> PretrainLoop:
    return PretrainLoop(
        spec=spec, train_files=[str(root / "train.npy")], validation_files=[str(root / "val.npy")],
        vocab_size=VOCAB, special_tokens=SPECIAL, fallback_checkpoint=str(fallback) if fallback else None,
    )


def _group_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[float, list[str]]]:
    """(weight decay, parameter names in order) of every parameter group."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [(g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups]


def _gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter in full (a collective under FSDP)."""
    from torch.distributed.tensor import DTensor

    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
        for name, p in model.named_parameters()
    }


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert set(actual) <= set(expected), f"{what}: names differ: {sorted(set(actual) - set(expected))[:3]}"
    for name, tensor in actual.items():
        assert torch.equal(tensor, expected[name]), f"{what}: {name} differs"


def _assert_same_optimizer(actual: dict[Any, Any], expected: dict[Any, Any], what: str) -> None:
    assert set(actual) == set(expected), f"{what}: the optimizer state covers other parameters"
    for key, state in actual.items():
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(state[field]), torch.as_tensor(expected[key][field])), (
                f"{what}: optimizer {field} of {key} differs"
            )


# --- without a process group ---------------------------------------------------------------------


def test_the_units_are_the_transformer_layers_found_in_the_model() -> None:
    llama = build_model(_spec(), VOCAB, SPECIAL)
    assert [c.__name__ for c in layer_classes(llama)] == ["LlamaDecoderLayer"]
    # BERT's _no_split_modules also names BertEmbeddings, whose word embedding the tied MLM head
    # shares: it is no layer of the stack and stays in the root unit with the head.
    bert = build_model(_spec(objective="mlm"), VOCAB, SPECIAL)
    assert set(bert._no_split_modules) == {"BertEmbeddings", "BertLayer"}
    assert [c.__name__ for c in layer_classes(bert)] == ["BertLayer"]


def test_fsdp_is_refused_where_it_would_not_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The manifest: one worker has nothing to shard across.
    assert problems(manifest(**{"spec.pretrain.strategy": "fsdp",
                                "spec.pretrain.resources": {"workers": 1, "use_gpu": True}})) == [
        "spec.pretrain: strategy 'fsdp' shards the model across resources.workers, and 1 worker has nothing "
        "to shard it across: use strategy 'ddp' or 2 workers or more"
    ]
    # A process of its own (LocalSession, a Tune trial) would train the whole model unsharded.
    model = build_model(_spec(), VOCAB, SPECIAL)
    with pytest.raises(ShardingError, match="1 worker: nothing to shard"):
        LocalSession().prepare_model(model, "fsdp")
    # A model without a stack of layers would be one unit: every parameter gathered at once.
    with pytest.raises(ShardingError, match="no transformer layers"):
        shard_model(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)), torch.device("cpu"), WORLD)
    unsplittable = build_model(_spec(), VOCAB, SPECIAL)
    unsplittable._no_split_modules = None
    with pytest.raises(ShardingError, match="LlamaForCausalLM has no transformer layers"):
        layer_classes(unsplittable)
    # ...which the stage refuses before starting any worker, naming the field.
    from kubeforge.pretrain import stage

    monkeypatch.setattr("kubeforge.engine.model.build_model", lambda *args: unsplittable)
    with pytest.raises(StageError, match=r"spec\.pretrain\.strategy: strategy 'fsdp': LlamaForCausalLM"):
        stage.check_strategy(_spec(), _loop(tmp_path, _spec()))
    stage.check_strategy(_spec("ddp"), _loop(tmp_path, _spec("ddp")))  # DDP does not care


def test_a_sharded_evaluation_runs_batches_without_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under FSDP a forward pass is a collective: a rank that skipped a batch would hang the others."""

    class Counting(torch.nn.Module):
        calls = 0

        def forward(self, **batch: Any) -> Any:
            self.calls += 1
            return type("Out", (), {"loss": torch.tensor(float("nan"))})()

    padding_only = [np.full((2, 8), SPECIAL["pad_id"], dtype=np.int64)]
    batcher = Batcher(_spec(), VOCAB, SPECIAL)
    model = Counting()
    evaluate_tokens(model, padding_only, batcher, torch.device("cpu"), False, 0)
    assert model.calls == 0, "unsharded, a batch without targets is skipped"
    monkeypatch.setattr("kubeforge.engine.steps.is_fsdp", lambda m: True)
    loss, _ = evaluate_tokens(model, padding_only, batcher, torch.device("cpu"), False, 0)
    assert model.calls == 1 and np.isnan(loss)


def test_ray_workers_shard_layer_by_layer_rather_than_with_rays_fsdp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's `parallel_strategy="fsdp"` would wrap the model as one FSDP1 unit (and nothing with one worker)."""
    import ray.train.torch

    from kubeforge.engine.session import RayTrainSession

    strategies: list[str | None] = []
    sharded: list[int] = []
    monkeypatch.setattr(ray.train.torch, "prepare_model",
                        lambda model, parallel_strategy: strategies.append(parallel_strategy) or model)
    monkeypatch.setattr("kubeforge.engine.session.shard_model",
                        lambda model, device, world_size: sharded.append(world_size) or model)
    session = RayTrainSession.__new__(RayTrainSession)  # without a Ray Train context
    session.rank, session.world_size, session.device = 0, WORLD, torch.device("cpu")
    model = torch.nn.Linear(2, 2)
    assert session.prepare_model(model, "fsdp") is model
    assert (strategies, sharded) == ([None], [WORLD]), "Ray only places the model; the layers are sharded here"
    session.prepare_model(model, "ddp")
    assert (strategies, sharded) == ([None, "ddp"], [WORLD])


# --- two ranks over gloo -------------------------------------------------------------------------


def _rank(rank: int, root: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        _sharded_run(rank, Path(root))
    finally:
        dist.destroy_process_group()


def _sharded_run(rank: int, root: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from kubeforge.engine.session import ProcessGroupSession
    from kubeforge.engine.state import _parameter_order, full_state
    from kubeforge.pretrain.recipe import PretrainRecipe

    spec = _spec()
    first = PretrainRecipe(_loop(root, spec), ProcessGroupSession(keep_checkpoints=root / "fsdp"))
    first.setup()
    model = first.model

    # Each decoder layer is a unit of its own; the root holds the embeddings, final norm and head.
    assert isinstance(model, FSDPModule)
    assert all(isinstance(layer, FSDPModule) for layer in model.model.layers)
    assert not isinstance(model.model.embed_tokens, FSDPModule)

    # The optimizer sees the original names and shapes: the same groups as without FSDP.
    plain = build_model(spec, VOCAB, SPECIAL)
    expected_groups = _group_names(plain, build_optimizer(plain, spec.train))
    assert _group_names(model, first.optimizer) == expected_groups
    (decay, decayed), (no_decay, not_decayed) = expected_groups
    assert decay == spec.train.weight_decay > 0 and no_decay == 0.0
    assert "model.layers.1.self_attn.q_proj.weight" in decayed and "model.embed_tokens.weight" in decayed
    assert "model.layers.1.input_layernorm.weight" in not_decayed and "model.norm.weight" in not_decayed

    # Every rank holds half of every parameter.
    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert total == first.num_parameters == sum(p.numel() for p in plain.parameters())
    assert local == pytest.approx(total / WORLD, rel=0.01)
    held = torch.tensor([local])
    dist.all_reduce(held)
    assert int(held) == total

    # Two steps: a checkpoint after the first, the final one (with the model folder) after the second.
    first.train()
    final = _gathered(model)
    dist.barrier()
    step1 = root / "fsdp" / "checkpoint_00000001"
    last = next(d for d in (root / "fsdp").glob("checkpoint_00000002_final_*") if (d / STATE_FILE).exists())
    _assert_same(final, torch.load(last / STATE_FILE, weights_only=False)["model"], "the final checkpoint")

    # Resuming from the first checkpoint restores the parameters and optimizer state, and the second
    # step then ends where the uninterrupted run did.
    saved = torch.load(step1 / STATE_FILE, weights_only=False)
    resumed = PretrainRecipe(_loop(root, spec, fallback=step1), ProcessGroupSession())
    resumed.setup()
    assert resumed.step == 1
    model_state, optimizer_state = full_state(resumed.model, resumed.optimizer)
    if rank == 0:
        _assert_same(model_state, saved["model"], "the resumed model")
        _assert_same_optimizer(optimizer_state["state"], saved["optimizer"]["state"], "the resumed optimizer")
    resumed.train()
    _assert_same(_gathered(resumed.model), final, "the resumed run's final parameters")

    # A checkpoint saved without FSDP (optimizer state by position) resumes under FSDP.
    unsharded = torch.load(root / "single" / "state.pt", weights_only=False)
    switched = PretrainRecipe(_loop(root, spec, fallback=root / "single"), ProcessGroupSession())
    switched.setup()
    model_state, optimizer_state = full_state(switched.model, switched.optimizer)
    if rank == 0:
        order = _parameter_order(switched.model, switched.optimizer)
        by_name = {order[k]: v for k, v in unsharded["optimizer"]["state"].items()}
        _assert_same(model_state, unsharded["model"], "the model from a DDP checkpoint")
        _assert_same_optimizer(optimizer_state["state"], by_name, "the optimizer from a DDP checkpoint")

    # BERT trains sharded too: its tied word embedding stays in the root unit with the MLM head.
    mlm = _spec(objective="mlm")
    bert = shard_model(build_model(mlm, VOCAB, SPECIAL), torch.device("cpu"), WORLD)
    assert all(isinstance(layer, FSDPModule) for layer in bert.bert.encoder.layer)
    optimizer = build_optimizer(bert, mlm.train)
    batch = Batcher(mlm, VOCAB, SPECIAL)(np.load(root / "train.npy")[rank * 2:rank * 2 + 2], torch.device("cpu"),
                                         torch.Generator().manual_seed(rank))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    assert np.isfinite(train_step(bert, optimizer, scheduler, [batch], 1.0, False, torch.device("cpu")))
    model_state, _ = full_state(bert, None)
    if rank == 0:
        build_model(mlm, VOCAB, SPECIAL).load_state_dict(model_state)  # strict: every key, full shapes


def test_two_ranks_shard_layers_keep_groups_and_resume_from_checkpoints(tmp_path: Path) -> None:
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    from kubeforge.engine.state import _parameter_order
    from kubeforge.pretrain.recipe import MODEL_SUBDIR, PretrainRecipe

    rows = np.random.default_rng(0).integers(4, VOCAB, size=(40, 32), dtype=np.int32)
    np.save(tmp_path / "train.npy", rows[:32])
    np.save(tmp_path / "val.npy", rows[32:])
    # A one-step single-process checkpoint (optimizer state keyed by position) for FSDP to resume.
    single = LocalSession(keep_checkpoints=tmp_path / "kept")
    PretrainRecipe(_loop(tmp_path, _spec("ddp", max_steps=1)), single).run()
    assert single.last_checkpoint is not None
    single.last_checkpoint.rename(tmp_path / "single")

    mp.spawn(_rank, args=(str(tmp_path),), nprocs=WORLD, join=True)

    # The final model folder is a plain Hugging Face folder with the final weights.
    last = next(d for d in (tmp_path / "fsdp").glob("checkpoint_00000002_final_*") if (d / MODEL_SUBDIR).exists())
    loaded = AutoModelForCausalLM.from_pretrained(last / MODEL_SUBDIR)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    final = torch.load(last / STATE_FILE, weights_only=False)["model"]
    _assert_same({k: v.detach() for k, v in loaded.state_dict().items()}, final, "the model folder")

    # An FSDP checkpoint (optimizer state keyed by name) resumes without FSDP, on one worker.
    step1 = tmp_path / "fsdp" / "checkpoint_00000001"
    saved = torch.load(step1 / STATE_FILE, weights_only=False)
    resumed = PretrainRecipe(_loop(tmp_path, _spec("ddp"), fallback=step1), LocalSession())
    resumed.setup()
    assert resumed.step == 1
    _assert_same({k: v.detach() for k, v in resumed.model.state_dict().items()}, saved["model"], "one worker's model")
    order = _parameter_order(resumed.model, resumed.optimizer)
    by_name = {order[k]: v for k, v in resumed.optimizer.state_dict()["state"].items()}
    _assert_same_optimizer(by_name, saved["optimizer"]["state"], "one worker's optimizer")
