"""Where a training loop runs: a Ray Train worker group or a single Ray Tune trial.

The pretraining and fine-tuning loops are written once against `Session`; the stages run them under
Ray Train (`RayTrainSession`, one per worker) and the `tune` stage runs them as Ray Tune function
trainables (`TuneSession`, one process per trial), where every evaluation is reported so that ASHA
can stop a poor trial early.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module, strategy: str) -> torch.nn.Module: ...

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Path | None]:
        """The checkpoint to resume from (a folder), or None for a fresh start."""
        ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, name: str | None = None) -> None:
        """A checkpoint (with the metrics at that point), or the final metrics."""
        ...

    def report_eval(self, metrics: dict[str, Any]) -> None:
        """Metrics of an evaluation between checkpoints (Tune schedulers decide on these)."""
        ...

    def push(self, message: dict[str, Any]) -> None:
        """A progress message for the driver (progress bars, MLflow, Prometheus)."""
        ...


class RayTrainSession:
    def __init__(self, hub: Any) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.hub = hub

    def prepare_model(self, model: torch.nn.Module, strategy: str) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, parallel_strategy=strategy)

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, name: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def report_eval(self, metrics: dict[str, Any]) -> None:
        pass  # the hub carries evaluations to the driver; Ray Train needs them only with checkpoints

    def push(self, message: dict[str, Any]) -> None:
        if self.hub is not None:
            self.hub.push.remote(message)


class TuneSession:
    """One trial of a Ray Tune search: a single process, no process group."""

    def __init__(self, use_gpu: bool = False) -> None:
        self.rank = 0
        self.world_size = 1
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        # Tune checks every result for the searched metric, so checkpoint reports repeat the last evaluation.
        self.last_eval: dict[str, Any] = {}

    def prepare_model(self, model: torch.nn.Module, strategy: str) -> torch.nn.Module:
        return model.to(self.device)

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Path | None]:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, name: str | None = None) -> None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report({**self.last_eval, **metrics}, checkpoint=checkpoint)

    def report_eval(self, metrics: dict[str, Any]) -> None:
        from ray import tune

        self.last_eval = dict(metrics)
        tune.report(metrics)

    def push(self, message: dict[str, Any]) -> None:
        pass  # the tune stage follows trials through Tune's own results


@contextlib.contextmanager
def checkpoint_dir() -> Iterator[Path]:
    """A scratch folder for one checkpoint; Ray copies it into the run's storage on report."""
    with tempfile.TemporaryDirectory(prefix="kubeforge-ckpt-") as tmp:
        yield Path(tmp)
