"""Where a training loop runs: a Ray Train worker group or a single Ray Tune trial.

The pretraining and fine-tuning loops are written once against `Session`; the stages run them under
Ray Train (`RayTrainSession`, one per worker) and the `tune` stage runs them as Ray Tune function
trainables (`TuneSession`, one process per trial), where every evaluation is reported so that ASHA
can stop a poor trial early. `LocalSession` runs them in this process (benchmarks, tests) and
`ProcessGroupSession` as one rank of a process group started without Ray (the FSDP tests on CPU).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from kubeforge.engine.fsdp import shard_model


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module, strategy: str) -> torch.nn.Module: ...

    def restored_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
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

        if strategy == "fsdp":
            # Ray's own FSDP wraps the whole model as one unit (see kubeforge.engine.fsdp): Ray only
            # places it on this worker's device, and the layers are sharded here.
            placed = ray.train.torch.prepare_model(model, parallel_strategy=None)
            return shard_model(placed, self.device, self.world_size)
        return ray.train.torch.prepare_model(model, parallel_strategy=strategy)

    def restored_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        import ray.train

        return _as_directory(ray.train.get_checkpoint())

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
        return _place(model, self.device, strategy, self.world_size)

    def restored_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        from ray import tune

        return _as_directory(tune.get_checkpoint())

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


class LocalSession:
    """The loop in this process without Ray (the benchmark and some tests): rank 0 of 1, no resume.

    It keeps what the loop reports; `keep_checkpoints` copies every reported checkpoint folder there
    (the final one holds the outputs)."""

    rank = 0
    world_size = 1

    def __init__(self, device: str = "cpu", keep_checkpoints: Path | None = None) -> None:
        self.device = torch.device(device)
        self.keep_checkpoints = keep_checkpoints
        self.evaluations: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}
        self.last_checkpoint: Path | None = None

    def prepare_model(self, model: torch.nn.Module, strategy: str) -> torch.nn.Module:
        return _place(model, self.device, strategy, self.world_size)

    def restored_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        return contextlib.nullcontext()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, name: str | None = None) -> None:
        self.final = dict(metrics)
        if checkpoint_dir is not None and self.keep_checkpoints is not None:
            self.last_checkpoint = self.keep_checkpoints / (name or "checkpoint")
            shutil.copytree(checkpoint_dir, self.last_checkpoint, dirs_exist_ok=True)

    def report_eval(self, metrics: dict[str, Any]) -> None:
        self.evaluations.append(dict(metrics))

    def push(self, message: dict[str, Any]) -> None:
        pass  # no driver to show progress to: callers read `evaluations` and `final`


class ProcessGroupSession(LocalSession):
    """The loop in this process as one rank of a `torch.distributed` process group that the caller
    started, without Ray (the sharding tests, on CPU with gloo). Every rank copies its checkpoint
    folders into `keep_checkpoints`, as Ray Train merges the workers' folders into one checkpoint."""

    def __init__(self, device: str = "cpu", keep_checkpoints: Path | None = None) -> None:
        import torch.distributed as dist

        super().__init__(device, keep_checkpoints)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()


def _place(model: torch.nn.Module, device: torch.device, strategy: str, world_size: int) -> torch.nn.Module:
    """`model` on `device`, sharded under `fsdp` (which refuses one process: nothing to shard across),
    in DistributedDataParallel under `ddp` with more than one process."""
    model = model.to(device)
    if strategy == "fsdp":
        return shard_model(model, device, world_size)
    if strategy == "ddp" and world_size > 1:
        return torch.nn.parallel.DistributedDataParallel(model)
    return model


@contextlib.contextmanager
def checkpoint_dir() -> Iterator[Path]:
    """A scratch folder for one checkpoint; Ray copies it into the run's storage on report."""
    with tempfile.TemporaryDirectory(prefix="kubeforge-ckpt-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def _as_directory(checkpoint: Any) -> Iterator[Path | None]:
    """A Ray (Train or Tune) checkpoint as a local folder while the context lasts; None for no checkpoint."""
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as directory:
        yield Path(directory)
