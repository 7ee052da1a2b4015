"""PPO's arithmetic on tensors (pure torch): per-token rewards, GAE and the clipped actor-critic loss.

As in TRL's PPO trainer (after Ziegler et al. 2019 and Ouyang et al. 2022): the KL penalty is part of
the reward, -kl_coef x (log p_old - log p_ref) on every completion token, and the sequence's reward is
added on its last token; advantages come from generalised advantage estimation (GAE) over a value
head's estimates taken when the completions were sampled, whitened over the micro-batch's tokens; the
policy loss is the clipped surrogate and the value loss the squared error to the returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kubeforge.rl.grpo import token_logprobs


def token_rewards(
    scores: torch.Tensor, old_logprobs: torch.Tensor, reference_logprobs: torch.Tensor, mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """(n, t): the KL penalty on every completion token and the sequence's score on its last one."""
    maskf = mask.to(old_logprobs.dtype)
    rewards = -kl_coef * (old_logprobs - reference_logprobs) * maskf
    last = (mask.cumsum(dim=1) == mask.sum(dim=1, keepdim=True)) & mask
    return rewards + scores.unsqueeze(1) * last.to(rewards.dtype)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns over the masked (completion) positions; the value after the last is 0."""
    maskf = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros(values.shape[0], dtype=values.dtype)
    next_value = torch.zeros(values.shape[0], dtype=values.dtype)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * maskf[:, t] + running * (1 - maskf[:, t])
        next_value = values[:, t] * maskf[:, t] + next_value * (1 - maskf[:, t])
        advantages[:, t] = running * maskf[:, t]
    return advantages, (advantages + values) * maskf


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    maskf = mask.to(values.dtype)
    count = maskf.sum().clamp(min=1)
    mean = (values * maskf).sum() / count
    variance = (((values - mean) * maskf) ** 2).sum() / count
    return (values - mean) * torch.rsqrt(variance + eps) * maskf


@dataclass(frozen=True)
class PpoTerms:
    loss: torch.Tensor
    policy_loss: float
    value_loss: float
    clipped: float
    """Share of completion tokens whose ratio was clipped."""
    entropy: float


def ppo_loss(
    logits: torch.Tensor, values: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
    old_logprobs: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor, clip_range: float,
    value_coef: float,
) -> PpoTerms:
    """`values` (n, t) are the value head's outputs at the targets' positions (aligned with `mask`)."""
    logprobs = token_logprobs(logits, input_ids)
    maskf = mask.to(logprobs.dtype)
    tokens = maskf.sum().clamp(min=1)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    policy = (torch.maximum(unclipped, clipped) * maskf).sum() / tokens
    value = 0.5 * (((values.float() - returns) ** 2) * maskf).sum() / tokens
    loss = policy + value_coef * value
    with torch.no_grad():
        distribution = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        entropy = -(distribution.exp() * distribution).sum(-1)
        share = float((((ratio - 1).abs() > clip_range).to(maskf.dtype) * maskf).sum() / tokens)
    return PpoTerms(loss, float(policy.detach()), float(value.detach()), share, float((entropy * maskf).sum() / tokens))
