"""The fine-tuning losses against hand computations, and the batch pieces of the loop (no Ray, no model)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kubeforge.finetune.losses import (
    IGNORE_INDEX,
    distill_loss,
    dpo_terms,
    lm_loss,
    lm_loss_sum,
    sequence_logprobs,
)

pytestmark = pytest.mark.unit

VOCAB = 11


def _logits(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, length, VOCAB, generator=torch.Generator().manual_seed(seed))


def test_lm_loss_is_token_weighted_and_skips_masked_positions() -> None:
    logits = _logits(2, 6)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5, 6], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 2]])
    # Position t - 1 predicts the label at t: row 0 scores logits 1..4, row 1 scores logit 4 only.
    terms = [F.cross_entropy(logits[0, t - 1], labels[0, t], reduction="sum") for t in range(2, 6)]
    terms.append(F.cross_entropy(logits[1, 4], labels[1, 5], reduction="sum"))
    expected = torch.stack(terms).sum()
    total, count = lm_loss_sum(logits, labels)
    assert count == 5
    assert torch.allclose(total, expected)
    # One token of row 1 weighs as much as one of row 0's four (not half the batch).
    assert torch.allclose(lm_loss(logits, labels), expected / 5)


def test_lm_loss_matches_the_transformers_loss() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32))
    input_ids = torch.randint(VOCAB, (3, 7))
    labels = input_ids.clone()
    labels[:, :3] = IGNORE_INDEX
    out = model(input_ids=input_ids, labels=labels)
    assert torch.allclose(lm_loss(out.logits, labels), out.loss, atol=1e-6)


def test_a_batch_without_labels_gives_zero_loss_that_still_backpropagates() -> None:
    logits = _logits(2, 4).requires_grad_(True)
    labels = torch.full((2, 4), IGNORE_INDEX)
    loss = lm_loss(logits, labels)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


def test_sequence_logprobs_sum_the_response_tokens() -> None:
    logits = _logits(1, 5)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 1, IGNORE_INDEX]])
    logprobs = torch.log_softmax(logits, dim=-1)
    expected = logprobs[0, 1, 7] + logprobs[0, 2, 1]
    assert torch.allclose(sequence_logprobs(logits, labels), expected.reshape(1))


def test_dpo_at_the_reference_is_log_2_with_no_accuracy_and_no_margin() -> None:
    same = torch.tensor([-5.0, -7.0])
    terms = dpo_terms(same, same - 1, same, same - 1, beta=0.1)
    assert float(terms.loss) == pytest.approx(math.log(2))
    assert terms.accuracy == 0.0  # a tie is not a win
    assert terms.margin == 0.0


def test_dpo_loss_rewards_and_margin_by_hand() -> None:
    policy_chosen, policy_rejected = torch.tensor([-4.0]), torch.tensor([-9.0])
    reference_chosen, reference_rejected = torch.tensor([-5.0]), torch.tensor([-8.0])
    terms = dpo_terms(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.5)
    # chosen reward 0.5 x 1, rejected reward 0.5 x -1: margin 1
    assert float(terms.chosen_rewards) == pytest.approx(0.5)
    assert float(terms.rejected_rewards) == pytest.approx(-0.5)
    assert terms.margin == pytest.approx(1.0)
    assert terms.accuracy == 1.0
    assert float(terms.loss) == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))


def test_dpo_gradient_raises_the_chosen_and_lowers_the_rejected_side() -> None:
    chosen = torch.tensor([-5.0], requires_grad=True)
    rejected = torch.tensor([-5.0], requires_grad=True)
    reference = torch.tensor([-5.0], requires_grad=True)
    dpo_terms(chosen, rejected, reference, reference, beta=0.1).loss.backward()
    assert chosen.grad is not None and rejected.grad is not None
    assert float(chosen.grad) < 0 < float(rejected.grad)  # descent raises chosen, lowers rejected
    assert reference.grad is None  # the reference is a constant


def test_distillation_with_the_teachers_logits_leaves_only_the_cross_entropy() -> None:
    logits = _logits(2, 5)
    labels = torch.randint(VOCAB, (2, 5))
    labels[0, :2] = IGNORE_INDEX
    ce = lm_loss(logits, labels)
    assert float(distill_loss(logits, logits, labels, temperature=2.0, alpha=1.0)) == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(distill_loss(logits, logits, labels, temperature=2.0, alpha=0.3), 0.7 * ce, atol=1e-6)
    assert torch.allclose(distill_loss(logits, _logits(2, 5, seed=1), labels, temperature=2.0, alpha=0.0), ce)


def test_distillation_kl_by_hand_with_temperature_scaling() -> None:
    student, teacher = _logits(1, 3), _logits(1, 3, seed=1)
    labels = torch.tensor([[IGNORE_INDEX, 4, 2]])  # scores positions 0 and 1
    temperature = 3.0
    kl = 0.0
    for t in (0, 1):
        p = torch.softmax(teacher[0, t] / temperature, -1)
        q = torch.softmax(student[0, t] / temperature, -1)
        kl += float((p * (p.log() - q.log())).sum())
    expected = (kl / 2) * temperature**2
    assert float(distill_loss(student, teacher, labels, temperature, alpha=1.0)) == pytest.approx(expected, rel=1e-5)
    # Logits at positions that score nothing do not count.
    changed = student.clone()
    changed[0, 2] += 5.0
    assert float(distill_loss(changed, teacher, labels, temperature, alpha=1.0)) == pytest.approx(expected, rel=1e-5)


def test_replay_choices_are_a_function_of_seed_micro_batch_and_rank() -> None:
    from kubeforge.finetune.recipe import replay_choices

    first = replay_choices(0, micro_batch=5, rank=1, size=64, fraction=0.25, pool=100)
    assert first == replay_choices(0, micro_batch=5, rank=1, size=64, fraction=0.25, pool=100)
    assert first != replay_choices(0, micro_batch=6, rank=1, size=64, fraction=0.25, pool=100)
    assert first != replay_choices(0, micro_batch=5, rank=0, size=64, fraction=0.25, pool=100)
    share = sum(c is not None for m in range(50) for c in replay_choices(0, m, 0, 64, 0.25, 100)) / (50 * 64)
    assert 0.22 < share < 0.28
    assert all(0 <= c < 100 for c in first if c is not None)
    assert replay_choices(0, 5, 1, 8, fraction=0.0, pool=100) == [None] * 8


def test_pad_batch_pads_right_and_masks_padding_out_of_the_labels() -> None:
    from kubeforge.finetune.recipe import pad_batch

    batch = pad_batch([([5, 6, 7], [IGNORE_INDEX, 6, 7]), ([8], [8])], pad_id=1, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["tokens"] == 4
