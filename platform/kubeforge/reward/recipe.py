"""The reward model's training recipe every Ray Train worker runs.

The engine's `Recipe` gives it the lifecycle it shares with pretraining and fine-tuning (DDP, gradient
accumulation, schedule, clipping, position-addressed batches, checkpoints and resuming, progress to
the driver). Its own: the model, an `AutoModelForSequenceClassification` with one label over the base
causal LM (whose body it loads; the scalar head `score` is new), with LoRA adapters or fully trained;
the data, preference pairs padded per batch with both sides in one forward pass; the pairwise loss
(`kubeforge.reward.losses`); and the evaluation on the held-out pairs: loss, accuracy and margin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kubeforge.engine.batches import RankSampler, right_pad
from kubeforge.engine.model import with_lora
from kubeforge.engine.recipe import Batch, Recipe
from kubeforge.engine.steps import all_reduce_sum, unwrap
from kubeforge.reward.config import RewardLoop
from kubeforge.reward.losses import pairwise_terms
from kubeforge.spec.reward import RewardSpec

MODEL_SUBDIR = "model"


def load_reward_model(base_model: str, pad_id: int) -> Any:
    """The base causal LM's body under a new one-label head, reading its reward at the last non-pad token."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=1, pad_token_id=pad_id)


def collate(pairs: Sequence[Mapping[str, list[int]]], pad_id: int, device: torch.device) -> dict[str, Any]:
    """Chosen sides then rejected sides, right-padded: one forward pass per micro-batch, as DDP expects."""
    rows = [p["chosen_input_ids"] for p in pairs] + [p["rejected_input_ids"] for p in pairs]
    input_ids, attention_mask = right_pad(rows, pad_id, device)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pairs": len(pairs),
            "tokens": int(attention_mask.sum())}


def rewards(model: torch.nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen and the rejected sides' scalar rewards."""
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    pairs = batch["pairs"]
    return scores[:pairs], scores[pairs:]


class RewardRecipe(Recipe[RewardLoop]):
    @property
    def spec(self) -> RewardSpec:
        return self.config.spec

    def _setup_model(self) -> torch.nn.Module:
        spec = self.spec
        model = load_reward_model(self.config.base_model_dir, self.config.pad_id)
        model.config.use_cache = False
        if spec.method == "lora":
            # SEQ_CLS makes peft train (and save) the new head `score` in full beside the adapters.
            model = with_lora(model, spec.lora_settings, "SEQ_CLS")
            # Checkpoints hold adapters and head only; the frozen body reloads from the base model folder.
            self.trainable_only = True
        model.train()
        if spec.train.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.total_parameters = sum(p.numel() for p in model.parameters())
        return self.session.prepare_model(model, "ddp")

    def _setup_data(self) -> None:
        spec, config = self.spec, self.config
        self.sampler = RankSampler(len(config.train_pairs), self.rank, self.world_size, spec.train.seed)
        mine = list(config.test_pairs[self.rank :: self.world_size])[: spec.train.batch_size * spec.eval.max_batches]
        size = spec.train.batch_size
        self.val_batches = [collate(mine[i : i + size], config.pad_id, self.device) for i in range(0, len(mine), size)]

    def _micro_batches(self, step: int) -> list[Batch]:
        accum, size = self.spec.train.grad_accum_steps, self.spec.train.batch_size
        return [
            collate([self.config.train_pairs[i] for i in self.sampler.batch(step * accum + a, size)],
                    self.config.pad_id, self.device)
            for a in range(accum)
        ]

    def _loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return pairwise_terms(*rewards(model, batch)).loss

    def _tokens(self, micro_batches: Sequence[Batch]) -> int:
        return sum(int(b["tokens"]) for b in micro_batches)

    def _evaluate(self) -> dict[str, float]:
        """Loss, accuracy and margin over every worker's share of the held-out pairs."""
        self.model.eval()
        sums = [0.0, 0.0, 0.0, 0.0]
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            for batch in self.val_batches:
                terms = pairwise_terms(*rewards(self.model, batch))
                sums[0] += float(terms.losses.sum())
                sums[1] += float(terms.correct.sum())
                sums[2] += float(terms.margins.sum())
                sums[3] += batch["pairs"]
        self.model.train()
        loss, correct, margin, count = all_reduce_sum(sums, self.device)
        return {"val_loss": loss / count, "accuracy": correct / count, "margin": margin / count}

    def _final_extras(self) -> dict[str, Any]:
        return {"trainable_parameters": self.trainable_parameters, "total_parameters": self.total_parameters}

    def _save_outputs(self, directory: Path) -> None:
        """`model/`: a plain AutoModelForSequenceClassification folder (LoRA merged into the weights) with
        the tokenizer and the chat template the pairs were formatted with."""
        from transformers import AutoTokenizer

        from kubeforge.formats.chat import chat_template_of

        model: Any = unwrap(self.model)
        if self.spec.method == "lora":
            model = model.merge_and_unload()  # the final checkpoint's state is saved: the last use of the model
        model.config.use_cache = True
        target = directory / MODEL_SUBDIR
        model.save_pretrained(str(target), safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(self.config.base_model_dir)
        tokenizer.chat_template = chat_template_of(tokenizer)
        tokenizer.save_pretrained(str(target))
