"""EWC: the Fisher information is the mean of per-row squared gradients, the penalty is
strength/2 x sum F (theta - theta*)^2, it holds fine-tuning near the base model, and the spec and the
stage refuse EWC where it cannot work, naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from kubeforge.context import StageContext
from kubeforge.errors import StageError
from kubeforge.finetune.ewc import EWCPenalty
from kubeforge.spec.finetune import FinetuneSpec
from tests.unit.test_finetune_qat import TASK, _llama, run_local

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore")]


def _rows(count: int, vocab: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(count, 16))


def test_the_fisher_is_the_mean_of_per_row_squared_gradients() -> None:
    model = _llama()
    rows = _rows(3)
    ewc = EWCPenalty.estimate(model, rows, strength=1.0, device=torch.device("cpu"))
    assert all(p.grad is None for p in model.parameters())  # nothing left for the first optimizer step
    name = "model.layers.0.mlp.down_proj.weight"
    expected = torch.zeros_like(dict(model.named_parameters())[name])
    for row in rows:
        model.zero_grad()
        ids = torch.as_tensor(row)[None]
        model(input_ids=ids, labels=ids).loss.backward()
        expected += dict(model.named_parameters())[name].grad ** 2
    assert torch.allclose(ewc.fisher[name], expected / 3, rtol=1e-4, atol=1e-12)
    assert float(ewc.fisher[name].sum()) > 0


def test_the_penalty_is_half_strength_times_fisher_weighted_squared_distance() -> None:
    model = _llama()
    ewc = EWCPenalty.estimate(model, _rows(2), strength=3.0, device=torch.device("cpu"))
    assert float(ewc.penalty(model)) == 0.0
    name = "model.layers.1.self_attn.q_proj.weight"
    with torch.no_grad():
        dict(model.named_parameters())[name][0, :4] += 0.5
    expected = 0.5 * 3.0 * float((ewc.fisher[name][0, :4] * 0.25).sum())
    assert float(ewc.penalty(model)) == pytest.approx(expected, rel=1e-5)


def test_ewc_holds_the_weights_the_corpus_depends_on_near_the_base_model(tmp_path: Path, chat_tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    rows = _rows(4, vocab=len(chat_tokenizer))
    train = {"max_steps": 12, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0}
    _, free = run_local(tmp_path / "free", chat_tokenizer, {"train": train})
    _, held = run_local(tmp_path / "held", chat_tokenizer, {"train": train, "ewc": {"strength": 1e4, "samples": 4}},
                        ewc_rows=rows)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "free" / "base")
    ewc = EWCPenalty.estimate(base, rows, strength=1.0, device=torch.device("cpu"))
    # The Fisher-weighted distance from the base weights: what EWC penalises.
    moved_free = float(ewc.penalty(AutoModelForCausalLM.from_pretrained(free / "merged")))
    moved_held = float(ewc.penalty(AutoModelForCausalLM.from_pretrained(held / "merged")))
    assert moved_held < 0.5 * moved_free, (moved_held, moved_free)


@pytest.mark.parametrize(("section", "message"), [
    ({"method": "lora", "ewc": {}}, "ewc: only used with method 'full'"),
    ({"method": "full", "objective": "distill", "ewc": {},
      "distill": {"student_path": "s"}}, "ewc: objective 'distill'"),
    ({"method": "full", "ewc": {"strength": 0}}, "ewc.strength"),
])
def test_the_spec_refuses_ewc_where_it_has_no_meaning(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace(".", r"\.")):
        FinetuneSpec.model_validate({"task": TASK, **section})


def test_ewc_without_a_data_stage_is_refused_naming_the_field(tmp_path: Path) -> None:
    from kubeforge.finetune.stage import _ewc_rows

    spec = FinetuneSpec.model_validate({"task": TASK, "method": "full", "ewc": {"samples": 4}})
    ctx = StageContext(pipeline=None, stage="finetune", out_dir=tmp_path, base_dir=tmp_path,  # type: ignore[arg-type]
                       tracker=None, reporter=None)  # type: ignore[arg-type]
    with pytest.raises(StageError, match=r"spec\.finetune\.ewc: EWC estimates the Fisher information on the data "
                                         r"stage's corpus and this pipeline has no data stage"):
        _ewc_rows(spec, ctx, tmp_path)
    assert _ewc_rows(FinetuneSpec.model_validate({"task": TASK, "method": "full"}), ctx, tmp_path) is None
