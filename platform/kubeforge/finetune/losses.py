"""The fine-tuning objectives' losses, on logits and labels only (pure torch, no model, no Ray).

Labels follow the `transformers` convention: the label of position t is the token at t, -100 marks
positions that are not scored (the prompt, padding), and the logits at t - 1 predict it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at t that predict the label at t + 1, and those labels."""
    return logits[:, :-1, :], labels[:, 1:]


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the scored positions, and their number.

    The sum (not the mean) lets an evaluation average over tokens across batches and workers.
    """
    logits, labels = _shift(logits, labels)
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, int((labels != IGNORE_INDEX).sum())


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-weighted mean cross-entropy: every scored token counts once, whatever row it is in.

    A batch without any scored token gives 0 that still depends on the logits, so that backward and
    DDP's gradient all-reduce run as on any other batch.
    """
    total, count = lm_loss_sum(logits, labels)
    return total / count if count else logits.sum() * 0.0


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: the summed log-probability of its scored tokens (the response, for DPO)."""
    logits, labels = _shift(logits, labels)
    scored = labels != IGNORE_INDEX
    targets = labels.masked_fill(~scored, 0)
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logprobs * scored).sum(dim=-1)


@dataclass(frozen=True)
class DPOTerms:
    """Per-pair DPO quantities; `loss`, `accuracy` and `margin` are the batch means."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    @property
    def correct(self) -> torch.Tensor:
        """1 where the chosen side's implicit reward is strictly higher (a tie, as at the start, is 0)."""
        return (self.chosen_rewards > self.rejected_rewards).float()

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def margin(self) -> float:
        return float(self.margins.mean())


def dpo_terms(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> DPOTerms:
    """DPO (Rafailov et al. 2023) on summed response log-probabilities.

    The implicit reward of a response is beta x (log pi - log pi_ref); the loss is
    -log sigmoid(reward_chosen - reward_rejected). Rewards carry no gradient through the reference.
    """
    chosen_rewards = beta * (policy_chosen - reference_chosen.detach())
    rejected_rewards = beta * (policy_rejected - reference_rejected.detach())
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return DPOTerms(losses, chosen_rewards.detach(), rejected_rewards.detach())


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """alpha x KL(teacher || student, both softened by T) x T^2 + (1 - alpha) x cross-entropy.

    Both terms are token-weighted means over the scored positions. The T^2 factor (Hinton et al.
    2015) keeps the soft term's gradients on the same scale as the hard term's whatever T is.
    """
    student, shifted_labels = _shift(student_logits, labels)
    teacher, _ = _shift(teacher_logits, labels)
    scored = shifted_labels != IGNORE_INDEX
    count = int(scored.sum())
    if count == 0:
        return student_logits.sum() * 0.0
    student_log = torch.log_softmax(student[scored].float() / temperature, dim=-1)
    teacher_log = torch.log_softmax(teacher[scored].float().detach() / temperature, dim=-1)
    kl = F.kl_div(student_log, teacher_log, log_target=True, reduction="sum") / count
    ce = F.cross_entropy(student[scored].float(), shifted_labels[scored], reduction="mean")
    return alpha * kl * temperature**2 + (1 - alpha) * ce
