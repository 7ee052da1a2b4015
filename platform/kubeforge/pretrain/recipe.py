"""The pretraining recipe every Ray Train worker (or Tune trial) runs: a model built from the
manifest, trained on the data stage's token shards (causal or masked language modelling)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kubeforge.engine.batches import Batcher, RankSampler, TokenShards, validation_batches
from kubeforge.engine.model import build_model, count_parameters
from kubeforge.engine.recipe import Batch, Recipe
from kubeforge.engine.state import STATE_FILE
from kubeforge.engine.steps import evaluate_tokens, peak_flops
from kubeforge.pretrain.config import PretrainLoop
from kubeforge.spec.pretrain import PretrainSpec

MODEL_SUBDIR = "model"


class PretrainRecipe(Recipe[PretrainLoop]):
    @property
    def spec(self) -> PretrainSpec:
        return self.config.spec

    def _setup_model(self) -> torch.nn.Module:
        spec = self.spec
        hf_model = build_model(spec, self.config.vocab_size, self.config.special_tokens)
        self.num_parameters = count_parameters(hf_model)
        if spec.train.activation_checkpointing:
            # Non-reentrant checkpointing works with DDP's hooks and with inputs that need no grad.
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf_model.config.use_cache = False
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        self.peak = peak_flops(device_name, self.bf16) if device_name else None
        return self.session.prepare_model(hf_model, spec.strategy)

    def _setup_data(self) -> None:
        spec, config = self.spec, self.config
        self.shards = TokenShards(config.train_files)
        self.sampler = RankSampler(len(self.shards), self.rank, self.world_size, spec.train.seed)
        self.val_batches = validation_batches(
            TokenShards(config.validation_files), self.rank, self.world_size, spec.train.batch_size,
            spec.eval.max_batches,
        )
        self.batcher = Batcher(spec, config.vocab_size, config.special_tokens)
        # Per-rank stream for MLM masks; the restored RNG state makes it continue where it stopped.
        self.mask_generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
        self.tokens_per_step = spec.train.batch_size * spec.train.grad_accum_steps * self.shards.seq_len
        self.eval_seed = spec.train.seed + 7919 * (self.rank + 1)

    def _micro_batches(self, step: int) -> list[Batch]:
        train, accum = self.spec.train, self.spec.train.grad_accum_steps
        return [
            self.batcher(
                self.shards.rows(self.sampler.batch(step * accum + a, train.batch_size)), self.device,
                self.mask_generator,
            )
            for a in range(accum)
        ]

    def _tokens(self, micro_batches: Sequence[Batch]) -> int:
        return self.tokens_per_step  # packed rows: every position counts, padding included

    def _evaluate(self) -> dict[str, float]:
        loss, perplexity = evaluate_tokens(
            self.model, self.val_batches, self.batcher, self.device, self.bf16, self.eval_seed
        )
        return {"val_loss": loss, "val_perplexity": perplexity}

    def _step_extras(self, tokens_per_second: float) -> dict[str, float]:
        return {} if self.peak is None else {"mfu": 6 * self.num_parameters * tokens_per_second / self.peak}

    def _final_extras(self) -> dict[str, Any]:
        return {"num_parameters": self.num_parameters}

    def _save_outputs(self, directory: Path) -> None:
        """A plain Hugging Face model folder built from the final, unwrapped weights.

        Under FSDP the full state dict was already gathered by `save_state`'s collective; rebuilding a
        CPU model from it keeps this path the same for DDP, FSDP and single-worker runs.
        """
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)["model"]
        fresh = build_model(self.spec, self.config.vocab_size, self.config.special_tokens)
        fresh.load_state_dict(state)
        fresh.config.use_cache = True
        fresh.save_pretrained(str(directory / MODEL_SUBDIR), safe_serialization=True)
