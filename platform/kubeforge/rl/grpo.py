"""GRPO's arithmetic on tensors (pure torch): group-relative advantages and the per-token loss.

GRPO (Shao et al. 2024, "DeepSeekMath") samples a group of completions per prompt and scores each one's
reward against its group: no value model. The loss is the policy gradient of those advantages plus a
KL penalty to the reference policy, estimated per token with k3 = exp(d) - d - 1, d = log p_ref - log p
(unbiased and never negative). The policy term is PPO's clipped surrogate of the ratio p / p_old to the
sampling policy: on the first update of a batch of rollouts the ratio is 1 in value (kept in the
expression for its gradient, as TRL's GRPOTrainer with one iteration per generation), on later ones
(`updates_per_rollout`) the clipping bounds each token's step. Token losses are averaged over
all completion tokens of the micro-batch (TRL's `dapo` normalisation): a long completion is not
down-weighted per token, as the per-sequence mean of the original GRPO would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ADVANTAGE_EPS = 1e-4
"""Added to a group's standard deviation: a group whose rewards are all equal gets advantages of 0."""


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(reward - group mean) / (group std + eps), for rewards laid out group after group."""
    groups = rewards.view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True, unbiased=False)
    return ((groups - mean) / (std + ADVANTAGE_EPS)).view(-1)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next token: (n, length - 1), aligned with `input_ids[:, 1:]`."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class GrpoTerms:
    loss: torch.Tensor
    """The scalar to minimise."""
    kl: float
    """Mean k3 estimate of KL(policy || reference) per completion token."""
    entropy: float
    """Mean entropy of the policy's next-token distribution per completion token."""


def grpo_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    advantages: torch.Tensor,
    reference_logprobs: torch.Tensor,
    kl_coef: float,
    old_logprobs: torch.Tensor | None = None,
    clip_range: float = 0.2,
) -> GrpoTerms:
    """`target_mask` (n, length - 1) marks the completion tokens among the next-token targets.
    `old_logprobs` are the sampling policy's, for a second update on the same rollouts (None: this is the
    first, so the policy is the sampling one)."""
    logprobs = token_logprobs(logits, input_ids)
    mask = target_mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - (logprobs.detach() if old_logprobs is None else old_logprobs))
    advantage = advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    policy = torch.maximum(-ratio * advantage, -clipped * advantage)
    delta = reference_logprobs - logprobs
    kl = torch.exp(delta) - delta - 1
    tokens = mask.sum().clamp(min=1)
    loss = ((policy + kl_coef * kl) * mask).sum() / tokens
    with torch.no_grad():
        distribution = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        entropy = -(distribution.exp() * distribution).sum(-1)
        return GrpoTerms(loss, float((kl * mask).sum() / tokens), float((entropy * mask).sum() / tokens))
