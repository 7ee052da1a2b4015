"""The fine-tuning recipe every Ray Train worker (or a Tune trial) runs.

The engine's `Recipe` gives it the lifecycle it shares with pretraining: a `Session`, DDP through
`session.prepare_model`, gradient accumulation, warmup + cosine schedule, clipping, `RankSampler`
batches addressed by position, checkpoints and resuming, and the same progress messages to the hub.
What is its own is the data (encoded task examples, padded per batch) and the loss, which depends on
the objective:

* `sft`: cross-entropy on the response tokens (labels are -100 on the prompt);
* `dpo`: DPO on summed response log-probabilities against the reference model;
* `distill`: KL to the frozen teacher's softened logits plus cross-entropy, for the student.

Replay: each row of a micro-batch is, with probability `replay_fraction`, replaced by a row of the
pretraining corpus that is scored as plain language modelling (for `distill` with the distillation
loss, the teacher knows that text too; for `dpo` as a cross-entropy term added to the DPO loss).
The draw depends only on the seed, the micro-batch number and the rank, so a resumed run sees
exactly the batches the interrupted one would have.

EWC (`kubeforge.finetune.ewc`): the penalty is added to every micro-batch's loss (so the reported
training loss includes it); its Fisher information is estimated once per worker before training.

QAT (`kubeforge.finetune.qat`): the policy trains through torchao's fake quantization; the final
checkpoint's `merged/` holds the trained weights unrounded and `qat/` the converted quantized model.

Validation: `kubeforge.finetune.stage` holds out part of the task's *training* split (10%, at least
one batch) for the evaluations during training; the test split is left for the evaluate stage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kubeforge.engine.batches import RankSampler
from kubeforge.engine.recipe import Batch, Recipe
from kubeforge.engine.steps import all_reduce_sum, unwrap
from kubeforge.finetune import losses, qat
from kubeforge.finetune.config import FinetuneLoop
from kubeforge.finetune.ewc import EWCPenalty
from kubeforge.finetune.methods import Models, build_models, save_merged
from kubeforge.spec.finetune import FinetuneSpec
from kubeforge.stages.finetune import EVAL_METRICS

ADAPTER_SUBDIR = "adapter"
MERGED_SUBDIR = "merged"
QAT_SUBDIR = qat.QAT_SUBDIR
# Separates the replay draws' random stream from every other use of the training seed.
_REPLAY_STREAM = 0x5EED


def replay_choices(seed: int, micro_batch: int, rank: int, size: int, fraction: float, pool: int) -> list[int | None]:
    """Per row of a micro-batch: the replay row that takes its place, or None for a task example."""
    if fraction <= 0 or pool == 0:
        return [None] * size
    rng = np.random.default_rng([seed, _REPLAY_STREAM, micro_batch, rank])
    draws, picks = rng.random(size), rng.integers(pool, size=size)
    return [int(pick) if draw < fraction else None for draw, pick in zip(draws, picks, strict=True)]


def pad_batch(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, device: torch.device) -> dict[str, Any]:
    """Right-padded input ids, attention mask and labels (-100 on the padding) of (ids, labels) rows."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), losses.IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, row_labels) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, : len(ids)] = torch.tensor(row_labels, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": labels.to(device),
        "tokens": int(attention_mask.sum()),
    }


class Collator:
    """Task examples (and replay rows) to padded model inputs.

    For `dpo` the chosen sides, then the rejected sides, then any replay rows form one batch: one
    forward pass per micro-batch, which is what DDP expects before a backward pass.
    """

    def __init__(
        self, spec: FinetuneSpec, pad_id: int, replay_pool: np.ndarray | None, rank: int
    ) -> None:
        self.objective = spec.objective
        self.pad_id = pad_id
        self.max_length = spec.max_length
        self.replay_fraction = spec.replay_fraction
        self.replay_pool = replay_pool if replay_pool is not None else np.empty((0, 0), dtype=np.int64)
        self.seed = spec.train.seed
        self.rank = rank

    def __call__(
        self, examples: Sequence[Mapping[str, list[int]]], device: torch.device, micro_batch: int | None = None
    ) -> dict[str, Any]:
        """`micro_batch` numbers a training micro-batch (which decides its replay rows); None for validation."""
        choices: list[int | None] = [None] * len(examples)
        if micro_batch is not None:
            choices = replay_choices(
                self.seed, micro_batch, self.rank, len(examples), self.replay_fraction, len(self.replay_pool)
            )
        replay = []
        for choice in choices:
            if choice is not None:
                ids = [int(t) for t in self.replay_pool[choice][: self.max_length]]
                replay.append((ids, ids))
        kept = [example for example, choice in zip(examples, choices, strict=True) if choice is None]
        if self.objective == "dpo":
            rows = [(e["chosen_input_ids"], e["chosen_labels"]) for e in kept]
            rows += [(e["rejected_input_ids"], e["rejected_labels"]) for e in kept]
        else:
            rows = [(e["input_ids"], e["labels"]) for e in kept]
        batch = pad_batch(rows + replay, self.pad_id, device)
        batch["pairs"] = len(kept) if self.objective == "dpo" else 0
        return batch


class Objective:
    """The training loss and the evaluation of one objective, over a policy model that may be DDP-wrapped."""

    def __init__(
        self, spec: FinetuneSpec, models: Models, device: torch.device, bf16: bool, ewc: EWCPenalty | None = None
    ) -> None:
        self.spec = spec
        self.models = models
        self.device = device
        self.bf16 = bf16
        self.ewc = ewc

    def _logits(self, model: torch.nn.Module, batch: Mapping[str, Any], rows: slice = slice(None)) -> torch.Tensor:
        return model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows]).logits

    def _reference_logits(self, model: torch.nn.Module, batch: Mapping[str, Any], rows: slice) -> torch.Tensor:
        """The model before fine-tuning: the frozen copy (full) or this model with its adapters off."""
        with torch.no_grad():
            if self.models.reference is not None:
                return self._logits(self.models.reference, batch, rows)
            inner: Any = unwrap(model)
            with inner.disable_adapter():
                return self._logits(inner, batch, rows)

    def _dpo(self, model: torch.nn.Module, batch: Mapping[str, Any], logits: torch.Tensor) -> losses.DPOTerms:
        pairs = batch["pairs"]
        sides = slice(0, 2 * pairs)
        labels = batch["labels"][sides]
        policy = losses.sequence_logprobs(logits[sides], labels)
        reference = losses.sequence_logprobs(self._reference_logits(model, batch, sides), labels)
        beta = self.spec.dpo_settings.beta
        return losses.dpo_terms(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], beta)

    def loss(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        loss = self._objective_loss(model, batch)
        if self.ewc is not None:
            loss = loss + self.ewc.penalty(unwrap(model))
        return loss

    def _objective_loss(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        logits = self._logits(model, batch)
        labels = batch["labels"]
        if self.spec.objective == "sft":
            return losses.lm_loss(logits, labels)
        if self.spec.objective == "distill":
            assert self.models.teacher is not None and self.spec.distill is not None
            with torch.no_grad():
                teacher = self._logits(self.models.teacher, batch)
            return losses.distill_loss(
                logits, teacher, labels, self.spec.distill.temperature, self.spec.distill.alpha
            )
        pairs = batch["pairs"]
        loss = self._dpo(model, batch, logits).loss if pairs else logits.sum() * 0.0
        if len(labels) > 2 * pairs:  # replay rows
            loss = loss + losses.lm_loss(logits[2 * pairs :], labels[2 * pairs :])
        return loss

    def evaluate(self, model: torch.nn.Module, batches: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """The evaluation metrics, averaged over every worker's validation examples (tokens for the
        cross-entropy, pairs for DPO)."""
        model.eval()
        sums = [0.0, 0.0, 0.0, 0.0]
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            for batch in batches:
                logits = self._logits(model, batch)
                if self.spec.objective == "dpo":
                    terms = self._dpo(model, batch, logits)
                    sums[0] += float(terms.losses.sum())
                    sums[1] += float(terms.correct.sum())
                    sums[2] += float(terms.margins.sum())
                    sums[3] += batch["pairs"]
                else:
                    total, tokens = losses.lm_loss_sum(logits, batch["labels"])
                    sums[0] += float(total)
                    sums[3] += tokens
        model.train()
        loss_sum, correct, margin_sum, count = all_reduce_sum(sums, self.device)
        if not count:
            return dict.fromkeys(EVAL_METRICS[self.spec.objective], math.nan)
        loss = loss_sum / count
        if self.spec.objective == "dpo":
            return {"val_loss": loss, "reward_accuracy": correct / count, "reward_margin": margin_sum / count}
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


def validation_batches(
    examples: Sequence[Mapping[str, list[int]]], collator: Collator, device: torch.device,
    rank: int, world_size: int, batch_size: int, max_batches: int,
) -> list[dict[str, Any]]:
    """This rank's fixed validation batches: a strided share of the held-out examples, no replay."""
    mine = list(examples[rank::world_size])[: batch_size * max_batches]
    return [collator(mine[i : i + batch_size], device) for i in range(0, len(mine), batch_size)]


class FinetuneRecipe(Recipe[FinetuneLoop]):
    @property
    def spec(self) -> FinetuneSpec:
        return self.config.spec

    def _setup_model(self) -> torch.nn.Module:
        spec, config = self.spec, self.config
        student_path = config.student_path
        self.models = build_models(
            spec, Path(config.base_model_dir), Path(student_path) if student_path else None, self.device
        )
        # PEFT checkpoints hold the adapters only: the frozen base is reloaded from the base model folder.
        self.trainable_only = self.models.is_peft
        policy = self.models.policy
        policy_config: Any = policy.config
        policy_config.use_cache = False
        if spec.train.activation_checkpointing and spec.method != "qlora":  # qlora turns it on itself
            policy.gradient_checkpointing_enable(  # type: ignore[operator]
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        ewc = None
        if spec.ewc is not None:
            if config.ewc_rows is None:
                raise ValueError("spec.finetune.ewc is set but the loop was given no rows to estimate the Fisher on")
            rows = np.asarray(config.ewc_rows, dtype=np.int64)[:, : spec.max_length]
            # Before DDP wraps the model (its gradient hooks would sync these backward passes).
            ewc = EWCPenalty.estimate(policy, rows, spec.ewc.strength, self.device)
        model = self.session.prepare_model(policy, "ddp")
        self.objective = Objective(spec, self.models, self.device, self.bf16, ewc)
        return model

    def _setup_data(self) -> None:
        spec, config = self.spec, self.config
        replay_pool = np.asarray(config.replay_rows, dtype=np.int64) if config.replay_rows is not None else None
        self.collator = Collator(spec, config.pad_id, replay_pool, self.rank)
        self.sampler = RankSampler(len(config.train_examples), self.rank, self.world_size, spec.train.seed)
        self.val_batches = validation_batches(
            config.validation_examples, self.collator, self.device, self.rank, self.world_size,
            spec.train.batch_size, spec.eval.max_batches,
        )

    def _micro_batches(self, step: int) -> list[Batch]:
        accum, batch_size = self.spec.train.grad_accum_steps, self.spec.train.batch_size
        batches: list[Batch] = []
        for a in range(accum):
            micro_batch = step * accum + a
            rows = [self.config.train_examples[i] for i in self.sampler.batch(micro_batch, batch_size)]
            batches.append(self.collator(rows, self.device, micro_batch))
        return batches

    def _loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.objective.loss(model, batch)

    def _tokens(self, micro_batches: Sequence[Batch]) -> int:
        return sum(int(b["tokens"]) for b in micro_batches)  # real tokens: batches are padded per batch

    def _evaluate(self) -> dict[str, float]:
        return self.objective.evaluate(self.model, self.val_batches)

    def _final_extras(self) -> dict[str, Any]:
        return {
            "trainable_parameters": self.models.trainable_parameters,
            "total_parameters": self.models.total_parameters,
        }

    def _save_outputs(self, directory: Path) -> None:
        """`adapter/` (PEFT methods) and `merged/` (a plain model folder; not for prefix tuning, whose
        prefixes are extra attention inputs and cannot be folded into weights), each with the tokenizer
        and the chat template the examples were formatted with."""
        if not self.config.save_outputs:
            return
        from transformers import AutoTokenizer

        from kubeforge.formats.chat import chat_template_of

        spec, models = self.spec, self.models
        policy = unwrap(self.model)
        tokenizer = AutoTokenizer.from_pretrained(self.config.base_model_dir)
        tokenizer.chat_template = chat_template_of(tokenizer)  # a base model's own template is kept
        base_model = Path(self.config.base_model_dir)
        policy_config: Any = policy.config
        policy_config.use_cache = True  # off during training (no generation); on for whoever loads the output
        if models.is_peft:
            adapter = directory / ADAPTER_SUBDIR
            policy.save_pretrained(str(adapter))  # type: ignore[operator]
            tokenizer.save_pretrained(str(adapter))
            if spec.method == "prefix":
                return
            save_merged(spec, policy, base_model, adapter, directory / MERGED_SUBDIR)
        elif spec.qat is not None:
            plain = qat.without_fake_quantizers(policy, spec.qat)
            plain.save_pretrained(str(directory / MERGED_SUBDIR), safe_serialization=True)  # type: ignore[operator]
            qat.save_quantized(qat.convert(plain, spec.qat), spec.qat, directory / QAT_SUBDIR)
            tokenizer.save_pretrained(str(directory / QAT_SUBDIR))
        else:
            policy.save_pretrained(str(directory / MERGED_SUBDIR), safe_serialization=True)  # type: ignore[operator]
        tokenizer.save_pretrained(str(directory / MERGED_SUBDIR))
