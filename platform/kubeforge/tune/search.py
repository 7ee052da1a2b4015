"""The pieces of a search that follow from the manifest alone: the Ray Tune search space, the settings
every trial shares, the Optuna searcher, the scheduler, and the choice of the best and Pareto-optimal
trials. No Ray runtime is needed for any of it (the unit tests call these directly).

Only the tune stage imports this module, so Ray Tune and Optuna are imported at the top.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from kubeforge.spec.tune import Dimension, TuneSpec

TIME_ATTR = "step"
"""What the loops report as progress; ASHA's rungs and the trial budget are counted in optimizer steps."""
JOURNAL_FILE = "optuna.journal"


def param_space(space: Mapping[str, Dimension]) -> dict[str, Any]:
    """The manifest's dimensions as Ray Tune domains, keyed by their dotted paths.

    `int` bounds are inclusive in the manifest; `tune.randint` excludes its upper bound, hence `high + 1`.
    """
    domains: dict[str, Any] = {}
    for path, dim in space.items():
        if dim.type == "choice":
            domains[path] = tune.choice(list(dim.values or []))
            continue
        assert dim.low is not None and dim.high is not None  # the spec guarantees both for ranges
        if dim.type == "loguniform":
            domains[path] = tune.loguniform(dim.low, dim.high)
        elif dim.type == "uniform":
            domains[path] = tune.uniform(dim.low, dim.high)
        else:
            domains[path] = tune.randint(int(dim.low), int(dim.high) + 1)
    return domains


def typed_value(dim: Dimension, value: Any) -> Any:
    """A sampled value as the plain Python type the manifest would hold (Optuna may hand back numpy types)."""
    if dim.type == "int":
        return int(value)
    if dim.type in ("loguniform", "uniform"):
        return float(value)
    for choice in dim.values or []:
        if choice == value:
            return choice
    return value


def in_space(dim: Dimension, value: Any) -> bool:
    if dim.type == "choice":
        return value in (dim.values or [])
    assert dim.low is not None and dim.high is not None
    if dim.type == "int" and value != int(value):
        return False
    return dim.low <= value <= dim.high


def boundary_values(dim: Dimension) -> list[Any]:
    """The values worth validating before any trial starts: each choice, or both ends of a range."""
    if dim.type == "choice":
        return list(dim.values or [])
    assert dim.low is not None and dim.high is not None
    if dim.type == "int":
        return [int(dim.low), int(dim.high)]
    return [dim.low, dim.high]


def trial_budget(spec: TuneSpec, target_max_steps: int) -> int:
    return spec.max_steps or target_max_steps


def trial_settings(
    spec: TuneSpec, target_fields: Sequence[str], max_steps: int, eval_every: int
) -> dict[str, Any]:
    """Settings every trial shares, as dotted-path overrides of the target section.

    A trial is one process (Tune places it with cpus_per_trial/gpus_per_trial), so one worker; it stops at
    the search's step budget and checkpoints at every evaluation, so that a trial a killed search left
    half-way resumes from its last evaluation rather than from scratch.
    """
    settings: dict[str, Any] = {
        "train.max_steps": max_steps,
        "resources.workers": 1,
        "resources.cpus_per_worker": spec.cpus_per_trial,
        "resources.use_gpu": spec.gpus_per_trial > 0,
        "checkpoint.every_steps": min(eval_every, max_steps),
    }
    if "strategy" in target_fields:
        # FSDP shards over several GPUs; a single-process trial has nothing to shard over.
        settings["strategy"] = "ddp"
    return settings


def journal_path(out_dir: Path) -> Path:
    return out_dir / JOURNAL_FILE


def make_storage(url: str | None, out_dir: Path) -> optuna.storages.BaseStorage:
    """The study's persistent home: a database URL when the manifest gives one, else a journal file."""
    if url is None:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(journal_path(out_dir))))
    return optuna.storages.get_storage(url)


class PruneAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna a trial ASHA stopped early was pruned.

    Ray's OptunaSearch records a stopped trial as complete with the value of its last (early) report,
    which puts an under-trained trial on the same footing as finished ones: TPE would then model it as
    a finished configuration and parameter importances would mix short and full runs. Optuna's TPE
    ranks pruned trials below every complete one, which is what an early stop means.
    """

    def __init__(self, *args: Any, max_step: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_step = max_step

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if result is not None and not error and result.get(TIME_ATTR, self.max_step) < self.max_step:
            result = None  # OptunaSearch tells a trial without a result and without an error as PRUNED
        super().on_trial_complete(trial_id, result=result, error=error)


def make_searcher(
    spec: TuneSpec, storage: optuna.storages.BaseStorage, study_name: str, max_step: int
) -> ConcurrencyLimiter:
    """Optuna TPE (multi-objective with several metrics) or random sampling, at most max_concurrent at once."""
    sampler: optuna.samplers.BaseSampler
    if spec.searcher == "tpe":
        sampler = optuna.samplers.TPESampler(seed=spec.seed)
    else:
        sampler = optuna.samplers.RandomSampler(seed=spec.seed)
    metrics, modes = spec.metrics, spec.modes
    searcher = PruneAwareOptunaSearch(
        metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0],
        sampler=sampler,
        study_name=study_name,
        storage=storage,
        max_step=max_step,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent)


def make_scheduler(spec: TuneSpec, max_step: int) -> TrialScheduler:
    """ASHA on the first metric, with rungs counted in optimizer steps; or FIFO (every trial to the end)."""
    if spec.scheduler == "none":
        return FIFOScheduler()
    settings = spec.asha_settings
    return ASHAScheduler(
        time_attr=TIME_ATTR,
        metric=spec.metrics[0],
        mode=spec.modes[0],
        max_t=max_step,
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
    )


def _better(a: float, b: float, mode: str) -> bool:
    return a < b if mode == "min" else a > b


def best_index(values: Sequence[float], mode: str) -> int | None:
    """Index of the best finite value, or None when there is none (NaN losses never win)."""
    best: int | None = None
    for index, value in enumerate(values):
        if not math.isfinite(value):
            continue
        if best is None or _better(value, values[best], mode):
            best = index
    return best


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """`a` is at least as good as `b` in every objective and strictly better in one."""
    strictly = False
    for x, y, mode in zip(a, b, modes, strict=True):
        if _better(y, x, mode):
            return False
        if _better(x, y, mode):
            strictly = True
    return strictly


def pareto_front(points: Sequence[Sequence[float]], modes: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points (points with a non-finite value are left out), in input order."""
    finite = [i for i, p in enumerate(points) if all(math.isfinite(v) for v in p)]
    return [i for i in finite if not any(dominates(points[j], points[i], modes) for j in finite if j != i)]


def running_best(values: Sequence[float], mode: str) -> list[float]:
    """The best value so far after each entry (NaN until a finite value is seen)."""
    out: list[float] = []
    best = math.nan
    for value in values:
        if math.isfinite(value) and (not math.isfinite(best) or _better(value, best, mode)):
            best = value
        out.append(best)
    return out
