"""The lifecycle every training loop follows, in the shape of torchtune's recipes.

A stage that trains subclasses `Recipe` with what is its own (the model it builds, the batches it
draws, how it evaluates, what it saves at the end) and inherits the rest:

    setup()            seed → _setup_model() → _setup_optimizer() → restore a checkpoint → _setup_data()
    train()            the initial evaluation, then optimizer steps with progress messages, an evaluation
                       every `eval.every_steps` and a checkpoint every `checkpoint.every_steps`
    save_checkpoint()  the state that resumes the run; the final one also holds the stage's outputs

The same recipe runs as a Ray Train worker (`kubeforge.engine.fit`), as a Ray Tune trial (the tune
stage) and in this process (`LocalSession`: benchmarks, GPU checks): the `Session` decides where.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch

from kubeforge.engine.config import LoopConfig
from kubeforge.engine.optim import build_optimizer, build_scheduler
from kubeforge.engine.session import RayTrainSession, Session, checkpoint_dir
from kubeforge.engine.state import report_checkpoint, restore, save_state, seed_everything
from kubeforge.engine.steps import all_reduce_sum, resolve_bf16, train_step
from kubeforge.faults import hold_after_checkpoint
from kubeforge.spec.pretrain import CheckpointSettings, EvalSettings, Resources, TrainSettings


class TrainingSection(Protocol):
    """The settings of a manifest section that trains (`spec.pretrain`, `spec.finetune`)."""

    @property
    def train(self) -> TrainSettings: ...

    @property
    def eval(self) -> EvalSettings: ...

    @property
    def checkpoint(self) -> CheckpointSettings: ...

    @property
    def resources(self) -> Resources: ...

    @property
    def max_failures(self) -> int: ...

    def model_dump(self, *, mode: str = "python") -> dict[str, Any]: ...


ConfigT = TypeVar("ConfigT", bound=LoopConfig)
Batch = Mapping[str, Any]


class Recipe(ABC, Generic[ConfigT]):
    trainable_only = False
    """Checkpoints hold only the parameters that train (adapters); the frozen rest reloads from its folder."""
    updates_per_step = 1
    """Optimizer steps taken on each step's micro-batches (the rl stage's updates per batch of rollouts); the
    learning-rate schedule counts optimizer steps, so a recipe that sets this builds its scheduler to match."""

    def __init__(self, config: ConfigT, session: Session) -> None:
        self.config = config
        self.session = session
        self.rank, self.world_size, self.device = session.rank, session.world_size, session.device
        self.bf16 = resolve_bf16(self.spec.train.precision, self.device)
        self.step = 0
        self.resumed_from = 0
        self.tokens_seen = 0
        self.train_loss = math.nan
        self.initial: dict[str, float] = {}
        """The evaluation before the first step (`initial_<metric>`), carried through resumes."""

    # --- what a stage's recipe provides ----------------------------------------------------------

    @property
    @abstractmethod
    def spec(self) -> TrainingSection: ...

    @abstractmethod
    def _setup_model(self) -> torch.nn.Module:
        """The model to train, already placed by `self.session.prepare_model`."""

    @abstractmethod
    def _setup_data(self) -> None:
        """What `_micro_batches` and `_evaluate` draw from (after the restore: RNG streams continue)."""

    @abstractmethod
    def _micro_batches(self, step: int) -> list[Batch]:
        """This rank's micro-batches of optimizer step `step` (0-based), addressed by position."""

    @abstractmethod
    def _evaluate(self) -> dict[str, float]:
        """Validation metrics over every rank's held-out batches (a collective: every rank calls it)."""

    @abstractmethod
    def _save_outputs(self, directory: Path) -> None:
        """Rank 0, with the final checkpoint: what the stage hands on (a model folder, an adapter)."""

    def _loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The training loss of one micro-batch; the model's own unless a stage says otherwise."""
        loss: torch.Tensor = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
        return loss

    @abstractmethod
    def _tokens(self, micro_batches: Sequence[Batch]) -> int:
        """The tokens this rank trained on in one step."""

    def _step_extras(self, tokens_per_second: float) -> dict[str, float]:
        """More figures for a step's progress message (pretraining's MFU)."""
        return {}

    def _final_extras(self) -> dict[str, Any]:
        """More figures for the final report (parameter counts)."""
        return {}

    # --- the lifecycle ---------------------------------------------------------------------------

    def run(self) -> None:
        self.setup()
        self.train()

    def setup(self) -> None:
        seed_everything(self.spec.train.seed + self.rank)
        self.model = self._setup_model()
        self.optimizer, self.scheduler = self._setup_optimizer()
        restored = restore(
            self.session, self.config.fallback_checkpoint, self.model, self.optimizer, self.scheduler,
            self.trainable_only,
        )
        if restored is not None:
            self.step = self.resumed_from = int(restored["step"])
            self.tokens_seen = int(restored.get("tokens_seen", 0))
            self.initial = {k: float(v) for k, v in restored.items() if k.startswith("initial_")}
        self._setup_data()

    def _setup_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        optimizer = build_optimizer(self.model, self.spec.train)
        return optimizer, build_scheduler(optimizer, self.spec.train)

    def train(self) -> None:
        train, spec = self.spec.train, self.spec
        if not self.initial:
            evaluation = self._evaluate()
            self.initial = {f"initial_{k}": v for k, v in evaluation.items()}
            self._push_eval(evaluation)
        last_eval: dict[str, float] | None = None
        train_seconds, train_tokens = 0.0, 0
        while self.step < train.max_steps:
            started = time.perf_counter()
            micro_batches = self._micro_batches(self.step)
            lr = self.scheduler.get_last_lr()[0]
            local_loss = sum(
                train_step(
                    self.model, self.optimizer, self.scheduler, micro_batches, train.grad_clip, self.bf16,
                    self.device, self._loss,
                )
                for _ in range(self.updates_per_step)
            ) / self.updates_per_step
            step_tokens = self._tokens(micro_batches)
            # One small all-reduce per step gives the global training loss and tokens (and syncs the timing).
            loss_sum, all_tokens = all_reduce_sum([local_loss, step_tokens], self.device)
            self.train_loss = loss_sum / self.world_size
            elapsed = time.perf_counter() - started
            self.step += 1
            train_seconds += elapsed
            train_tokens += step_tokens
            self.tokens_seen += int(all_tokens)
            tokens_per_second = step_tokens / elapsed
            self.session.push({
                "event": "step", "rank": self.rank, "step": self.step, "train_loss": self.train_loss, "lr": lr,
                "tokens_per_second": tokens_per_second, "tokens": self.tokens_seen,
                **self._step_extras(tokens_per_second),
            })
            final = self.step == train.max_steps
            if self.step % spec.eval.every_steps == 0 or final:
                last_eval = self._evaluate()
                self._push_eval(last_eval)
            if self.step % spec.checkpoint.every_steps == 0 and not final:
                self.save_checkpoint()

        if last_eval is None:
            # Nothing left to train (a rerun after the last checkpoint was the final one): score it anyway.
            last_eval = self._evaluate()
        # Aggregate throughput: the sum of every worker's own average over the steps it trained.
        own_rate = train_tokens / train_seconds if train_seconds else 0.0
        total_rate = all_reduce_sum([own_rate], self.device)[0]
        self.save_checkpoint({
            "step": self.step, "train_loss": self.train_loss, **last_eval, "tokens_per_second": total_rate,
            "tokens_seen": self.tokens_seen, "resumed_from_step": self.resumed_from, **self._final_extras(),
            **self.initial,
        })

    def save_checkpoint(self, final_metrics: dict[str, Any] | None = None) -> None:
        """Hand the session the state that resumes the run at this step. The final checkpoint (with
        `final_metrics`, the run's report) also holds the stage's outputs."""
        extra = {"tokens_seen": self.tokens_seen, **self.initial}
        if final_metrics is None:
            report_checkpoint(
                self.session, self.model, self.optimizer, self.scheduler, self.step, extra,
                {"step": self.step, "train_loss": self.train_loss, "resumed_from_step": self.resumed_from},
                self.trainable_only,
            )
            hold_after_checkpoint(self.step)
            return
        with checkpoint_dir() as directory:
            save_state(
                directory, self.model, self.optimizer, self.scheduler, self.step, self.rank, extra, self.trainable_only
            )
            if self.rank == 0:
                self._save_outputs(directory)
            # A unique name: a rerun of a finished run reports its final checkpoint once more.
            name = f"checkpoint_{self.step:08d}_final_{time.strftime('%Y%m%d-%H%M%S')}"
            self.session.report(final_metrics, directory, name)

    def _push_eval(self, evaluation: Mapping[str, float]) -> None:
        message = {"step": self.step, **evaluation}
        if self.rank == 0:
            self.session.push({"event": "eval", **message})
        self.session.report_eval(message)


def train_worker(recipe: type[Recipe[Any]], config: LoopConfig) -> None:
    """A Ray Train worker's entry point: `recipe` on this worker's session."""
    recipe(config, RayTrainSession(config.hub)).run()
