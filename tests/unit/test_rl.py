"""The rl stage's pieces: GRPO's advantages and loss, the rule rewards, which tokens train, and bad input."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kubeforge.errors import SpecError, StageError
from kubeforge.rl.grpo import group_advantages, grpo_loss, token_logprobs
from kubeforge.rl.ppo import gae, ppo_loss, token_rewards, whiten
from kubeforge.rl.recipe import completion_length, target_mask
from kubeforge.rl.rules import Completion, rule_rewards
from kubeforge.spec.rl import RlSpec

pytestmark = pytest.mark.unit

ADD = {
    "instruction": "Write the body of this Python function.",
    "input": 'def add(a, b):\n    """Add.\n\n    >>> add(2, 3)\n    5\n    """\n',
    "entry_point": "add", "qualname": "add", "module": None, "has_doctests": True,
}


def test_advantages_are_relative_to_each_group() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0])
    advantages = group_advantages(rewards, 4)
    # The best of the first group is pushed up and the others down; an all-equal group moves nothing.
    assert advantages[0] > 0 and bool((advantages[1:4] < 0).all())
    assert advantages[:4].sum().item() == pytest.approx(0.0, abs=1e-5)
    assert advantages[4:].tolist() == [0.0] * 4
    # Scaled by the group's spread: the same ranking at ten times the rewards gives the same advantages.
    assert group_advantages(rewards * 10, 4)[:4].tolist() == pytest.approx(advantages[:4].tolist(), rel=1e-3)


def test_the_loss_raises_the_likelihood_of_completions_with_positive_advantage() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, requires_grad=True)
    input_ids = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 0]])
    mask = torch.tensor([[False, True, True], [False, True, True]])
    reference = token_logprobs(logits.detach(), input_ids)
    terms = grpo_loss(logits, input_ids, mask, torch.tensor([1.0, -1.0]), reference, kl_coef=0.1)
    terms.loss.backward()
    assert logits.grad is not None
    # Gradient descent on the loss raises the logit of a rewarded completion's token and lowers the other's.
    assert logits.grad[0, 1, 3] < 0 and logits.grad[1, 1, 5] > 0
    # Prompt targets (mask False) get no gradient; a policy equal to the reference has zero KL.
    assert logits.grad[:, 0].abs().sum() == 0
    assert terms.kl == pytest.approx(0.0, abs=1e-7) and terms.entropy > 0


def test_the_kl_penalty_pulls_towards_the_reference() -> None:
    logits = torch.zeros(1, 3, 4, requires_grad=True)
    input_ids = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[True, True]])
    # The reference is more sure of the completion's tokens than the (uniform) policy.
    reference = torch.full((1, 2), math.log(0.7))
    terms = grpo_loss(logits, input_ids, mask, torch.tensor([0.0]), reference, kl_coef=1.0)
    terms.loss.backward()
    # k3 with d = log p_ref - log p: p_ref / p - log(p_ref / p) - 1, at p = 1/4 and p_ref = 0.7.
    assert terms.kl == pytest.approx(2.8 - math.log(2.8) - 1, rel=1e-5)
    assert logits.grad is not None and logits.grad[0, 0, 1] < 0 and logits.grad[0, 1, 2] < 0


def test_grpo_clips_the_ratio_on_a_later_update() -> None:
    logits = torch.zeros(1, 2, 3, requires_grad=True)
    input_ids, mask = torch.tensor([[0, 1]]), torch.tensor([[True]])
    reference = token_logprobs(logits.detach(), input_ids)
    # The sampling policy gave the token 1/6 (now 1/3: ratio 2): a positive advantage no longer pushes it up.
    old = torch.tensor([[math.log(1 / 6)]])
    grpo_loss(logits, input_ids, mask, torch.tensor([1.0]), reference, 0.0, old, clip_range=0.2).loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() == 0
    # Within the clip range it does.
    logits.grad = None
    old = torch.tensor([[math.log(0.3)]])
    grpo_loss(logits, input_ids, mask, torch.tensor([1.0]), reference, 0.0, old, clip_range=0.2).loss.backward()
    assert logits.grad[0, 0, 1] < 0


def test_ppo_rewards_put_the_score_on_the_last_token_and_the_kl_on_every_one() -> None:
    mask = torch.tensor([[False, True, True, False], [True, True, True, True]])
    old = torch.tensor([[0.0, -1.0, -1.0, 0.0], [-1.0] * 4])
    reference = torch.tensor([[0.0, -2.0, -1.5, 0.0], [-1.0] * 4])
    rewards = token_rewards(torch.tensor([3.0, -1.0]), old, reference, mask, kl_coef=0.1)
    assert rewards.flatten().tolist() == pytest.approx([0.0, -0.1, 3.0 - 0.05, 0.0, 0.0, 0.0, 0.0, -1.0])


def test_gae_sums_rewards_to_go_at_lambda_one_and_bootstraps_at_zero() -> None:
    rewards = torch.tensor([[0.0, 1.0, 2.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 1.0, 9.0]])
    mask = torch.tensor([[False, True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # Rewards to go (3, 2) minus the values; nothing outside the completion.
    assert advantages[0].tolist() == pytest.approx([0.0, 2.5, 1.0, 0.0])
    assert returns[0].tolist() == pytest.approx([0.0, 3.0, 2.0, 0.0])
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=0.0)
    # One-step: r_t + V(t+1) - V(t), with no value after the last token.
    assert advantages[0].tolist() == pytest.approx([0.0, 1.0 + 1.0 - 0.5, 2.0 - 1.0, 0.0])
    assert whiten(torch.tensor([[5.0, 1.0, 3.0, 7.0]]), mask)[0].tolist() == pytest.approx([0.0, -1.0, 1.0, 0.0])


def test_the_ppo_loss_clips_the_policy_and_fits_the_values() -> None:
    logits = torch.zeros(1, 3, 4, requires_grad=True)
    values = torch.tensor([[0.0, 1.0]], requires_grad=True)
    input_ids, mask = torch.tensor([[0, 1, 2]]), torch.tensor([[True, True]])
    # The first token's ratio is 0.25 / 0.1 = 2.5 (clipped at 1.2 for a positive advantage), the second's 1.
    old = torch.tensor([[math.log(0.1), math.log(0.25)]])
    terms = ppo_loss(logits, values, input_ids, mask, old, torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 1.0]]),
                     clip_range=0.2, value_coef=0.5)
    terms.loss.backward()
    assert terms.clipped == pytest.approx(0.5)
    assert logits.grad is not None and logits.grad[0, 0].abs().sum() == 0 and logits.grad[0, 1, 2] < 0
    # 0.5 x mean((0 - 2)^2, (1 - 1)^2) = 1; the value with the error moves towards its return.
    assert terms.value_loss == pytest.approx(1.0)
    assert values.grad is not None and values.grad[0, 0] < 0 and values.grad[0, 1] == 0


def test_completion_tokens_end_at_the_first_end_of_sequence_and_only_they_train() -> None:
    assert completion_length([5, 6, 2, 7, 2], [2]) == (3, True)
    assert completion_length([5, 6, 7], [2]) == (3, False)
    # Prompt of 3 tokens, completion of 2: targets 2 and 3 (predicting tokens 3 and 4); padding never trains.
    mask = target_mask([3, 2], [5, 3], 6)
    assert mask.tolist() == [[False, False, True, True, False], [False, True, False, False, False]]


def test_rule_rewards_check_the_generated_function() -> None:
    completions = [
        Completion(ADD, "    return a + b\n", 6, True),
        Completion(ADD, "    return a - b\n", 6, True),
        Completion(ADD, "    return (a +\n", 20, False),
        Completion(ADD, "", 1, True),
        Completion(ADD, "    # the sum\n", 4, True),
    ]
    scored = rule_rewards(completions, ["doctests", "parses", "short"], max_new_tokens=20, doctest_timeout_s=5)
    assert scored["parses"] == [1.0, 1.0, 0.0, 0.0, 0.0]  # an empty or comment-only body adds no code
    assert scored["doctests"] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert scored["short"] == pytest.approx([0.7, 0.7, 0.0, 0.95, 0.8])  # cut off at the limit: nothing


@pytest.mark.parametrize(("section", "message"), [
    ({"rewards": {}}, r"spec\.rl\.rewards: no reward source"),
    ({"rewards": {"rules": {"passes": 1.0}}}, r"spec\.rl\.rewards\.rules: unknown rule 'passes' \(known: doctests, "),
    ({"rewards": {"rules": {"short": 1.0}}, "lora": {"rank": 4}}, r"spec\.rl\.lora: only used with method lora"),
    ({"rewards": {"rules": {"short": 1.0}}, "ppo": {"lam": 0.9}}, r"spec\.rl\.ppo: only used with algorithm ppo"),
    ({"rewards": {"rules": {"short": 1.0}}, "rollout": {"group_size": 1}},
     r"spec\.rl\.rollout\.group_size: GRPO compares completions of the same prompt"),
    ({"rewards": {"rules": {"short": 1.0}}, "algorithm": "reinforce"}, r"spec\.rl\.algorithm: must be one of"),
])
def test_bad_sections_name_the_field(section: dict[str, Any], message: str) -> None:
    from kubeforge.spec.load import parse_manifest

    manifest = {"apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelPipeline", "metadata": {"name": "p"},
                "spec": {"data": {"sources": [{"type": "python-stdlib"}]}, "pretrain": {}, "finetune": {
                    "task": {"builtin": "python-docstrings"}}, "rl": section}}
    with pytest.raises(SpecError, match=message):
        parse_manifest(manifest)


def _tokenizer(vocab: dict[str, int]) -> Any:
    return SimpleNamespace(get_vocab=lambda: dict(vocab))


def test_a_reward_model_with_another_tokenizer_is_refused() -> None:
    from kubeforge.rl.stage import check_same_tokenizer

    policy = {"a": 0, "b": 1, "c": 2}
    check_same_tokenizer(_tokenizer(policy), _tokenizer(policy), Path("rm"))
    with pytest.raises(StageError, match=r"spec\.rl\.rewards\.model: the reward model's tokenizer \(rm\) differs "
                                         r"from the policy's \(2 of 3 tokens\)"):
        check_same_tokenizer(_tokenizer(policy), _tokenizer({"a": 0, "b": 2, "c": 1}), Path("rm"))
    with pytest.raises(StageError, match=r"\(1 of 3 tokens\)"):
        check_same_tokenizer(_tokenizer(policy), _tokenizer({**policy, "d": 3}), Path("rm"))


def test_a_model_reward_without_a_reward_stage_or_path_is_refused(tmp_path: Path) -> None:
    from kubeforge.rl.stage import resolve_reward_model

    spec = RlSpec.model_validate({"rewards": {"model": {"weight": 1.0}}})
    ctx = SimpleNamespace(input=lambda stage: None, base_dir=tmp_path)
    with pytest.raises(StageError, match=r"spec\.rl\.rewards\.model: no path is set and the pipeline has no reward "
                                         r"stage"):
        resolve_reward_model(spec, ctx)  # type: ignore[arg-type]
    spec = RlSpec.model_validate({"rewards": {"model": {"path": "nowhere"}}})
    with pytest.raises(StageError, match=r"spec\.rl\.rewards\.model\.path: .*nowhere is not a Hugging Face model "
                                         r"folder"):
        resolve_reward_model(spec, ctx)  # type: ignore[arg-type]


def test_lora_targets_the_policy_lacks_are_refused_before_any_worker_starts(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    from kubeforge.engine.model import check_lora_targets

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=100).save_pretrained(str(tmp_path))
    check_lora_targets(tmp_path, ("q_proj", "down_proj"), "rl", "spec.rl.lora.target_modules")
    with pytest.raises(StageError, match=r"spec\.rl\.lora\.target_modules: w_proj not among the base model's linear "
                                         r"layers \(down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, "):
        check_lora_targets(tmp_path, ("q_proj", "w_proj"), "rl", "spec.rl.lora.target_modules")
