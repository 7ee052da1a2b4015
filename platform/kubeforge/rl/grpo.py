"""GRPO's arithmetic on tensors (pure torch): group-relative advantages and the per-token loss.

GRPO (Shao et al. 2024, "DeepSeekMath") samples a group of completions per prompt and scores each one's
reward against its group: no value model. The loss is the policy gradient of those advantages plus a
KL penalty to the reference policy, estimated per token with k3 = exp(d) - d - 1, d = log p_ref - log p
(unbiased and never negative). One optimizer step is taken per batch of rollouts, so the importance
ratio p / p_old is 1 in value; it is kept in the expression (exp(logp - logp.detach())) for its
gradient, as TRL's GRPOTrainer does with one iteration per generation. Token losses are averaged over
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
) -> GrpoTerms:
    """`target_mask` (n, length - 1) marks the completion tokens among the next-token targets."""
    logprobs = token_logprobs(logits, input_ids)
    mask = target_mask.to(logprobs.dtype)
    policy = -torch.exp(logprobs - logprobs.detach()) * advantages.unsqueeze(1)
    delta = reference_logprobs - logprobs
    kl = torch.exp(delta) - delta - 1
    tokens = mask.sum().clamp(min=1)
    loss = ((policy + kl_coef * kl) * mask).sum() / tokens
    with torch.no_grad():
        distribution = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        entropy = -(distribution.exp() * distribution).sum(-1)
        return GrpoTerms(loss, float((kl * mask).sum() / tokens), float((entropy * mask).sum() / tokens))
