"""The tune stage's pure parts: search-space translation, searcher and scheduler settings, best and
Pareto-optimal trials, and the manifest checks that reject searches that cannot work."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from kubeforge.errors import SpecError
from kubeforge.spec.load import parse_manifest
from kubeforge.spec.pretrain import PretrainSpec
from kubeforge.spec.tune import Dimension, TuneSpec, field_paths
from kubeforge.tune import search

pytestmark = pytest.mark.unit




def _tune(**fields: Any) -> TuneSpec:
    return TuneSpec.model_validate({
        "target": "pretrain", "search_space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}, **fields
    })


def _manifest(tune: dict[str, Any], pretrain: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"data": {"sources": [{"type": "python-stdlib", "max_files": 5}]}, "tune": tune}
    spec["pretrain"] = pretrain if pretrain is not None else {}
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelPipeline", "metadata": {"name": "t"}, "spec": spec}


# --- translation -------------------------------------------------------------------------------------


def test_each_dimension_becomes_the_matching_tune_domain() -> None:
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Uniform

    space = search.param_space({
        "train.lr": Dimension(type="loguniform", low=1e-4, high=1e-2),
        "train.weight_decay": Dimension(type="uniform", low=0.0, high=0.2),
        "model.num_layers": Dimension(type="int", low=1, high=3),
        "train.batch_size": Dimension(type="choice", values=[4, 8]),
    })
    lr, wd, layers, batch = (space[k] for k in ("train.lr", "train.weight_decay", "model.num_layers", "train.batch_size"))
    assert isinstance(lr, Float) and isinstance(lr.get_sampler(), LogUniform)
    assert (lr.lower, lr.upper) == (1e-4, 1e-2)
    assert isinstance(wd, Float) and isinstance(wd.get_sampler(), Uniform)
    assert (wd.lower, wd.upper) == (0.0, 0.2)
    # tune.randint excludes its upper bound; the manifest's int bounds are inclusive.
    assert isinstance(layers, Integer) and (layers.lower, layers.upper) == (1, 4)
    assert isinstance(batch, Categorical) and batch.categories == [4, 8]


def test_inclusive_int_bounds_survive_the_translation_to_optuna() -> None:
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    converted = OptunaSearch.convert_search_space(search.param_space({
        "model.num_layers": Dimension(type="int", low=1, high=3),
        "train.lr": Dimension(type="loguniform", low=1e-4, high=1e-2),
    }))
    assert converted["model.num_layers"] == optuna.distributions.IntDistribution(1, 3)
    assert converted["train.lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)


def test_sampled_values_come_back_as_manifest_types() -> None:
    import numpy as np

    assert search.typed_value(Dimension(type="int", low=1, high=3), np.int64(2)) == 2
    assert type(search.typed_value(Dimension(type="int", low=1, high=3), np.int64(2))) is int
    assert type(search.typed_value(Dimension(type="uniform", low=0, high=1), np.float32(0.5))) is float
    assert search.in_space(Dimension(type="int", low=1, high=3), 3)
    assert not search.in_space(Dimension(type="int", low=1, high=3), 4)
    assert search.in_space(Dimension(type="choice", values=["a", "b"]), "b")
    assert search.boundary_values(Dimension(type="int", low=1, high=3)) == [1, 3]


def test_trials_are_single_process_with_the_search_budget_and_a_checkpoint_per_evaluation() -> None:
    spec = _tune(cpus_per_trial=2, gpus_per_trial=0)
    settings = search.trial_settings(spec, list(PretrainSpec.model_fields), max_steps=30, eval_every=5)
    assert settings == {
        "train.max_steps": 30, "resources.workers": 1, "resources.cpus_per_worker": 2.0, "resources.use_gpu": False,
        "checkpoint.every_steps": 5, "strategy": "ddp",
    }
    # Every key is a settable path of the target section.
    assert set(settings) <= set(field_paths(PretrainSpec))
    assert search.trial_budget(_tune(max_steps=40), 200) == 40
    assert search.trial_budget(_tune(), 200) == 200


# --- searcher, scheduler, storage --------------------------------------------------------------------


def test_tpe_searcher_with_journal_storage_and_concurrency_limit(tmp_path: Path) -> None:
    import optuna

    spec = _tune(max_concurrent=3, seed=7)
    storage = search.make_storage(None, tmp_path)
    assert isinstance(storage, optuna.storages.JournalStorage)
    limiter = search.make_searcher(spec, storage, "p-tune", max_step=20)
    assert limiter.max_concurrent == 3
    inner = limiter.searcher
    assert isinstance(inner, search.PruneAwareOptunaSearch)
    assert isinstance(inner._sampler, optuna.samplers.TPESampler)
    assert (inner.metric, inner.mode) == ("val_loss", "min")


def test_random_searcher_and_multi_objective_modes(tmp_path: Path) -> None:
    import optuna

    spec = TuneSpec.model_validate({
        "target": "finetune", "search_space": {"train.lr": {"type": "uniform", "low": 0.1, "high": 0.2}},
        "metric": ["val_loss", "reward_accuracy"], "mode": ["min", "max"], "searcher": "random",
    })
    inner = search.make_searcher(spec, search.make_storage(None, tmp_path), "p-tune", max_step=20).searcher
    assert isinstance(inner._sampler, optuna.samplers.RandomSampler)
    assert (inner.metric, inner.mode) == (["val_loss", "reward_accuracy"], ["min", "max"])


def test_a_trial_asha_stopped_is_told_to_optuna_as_pruned(tmp_path: Path) -> None:
    import optuna

    storage = search.make_storage(None, tmp_path)
    limiter = search.make_searcher(_tune(seed=1), storage, "p-tune", max_step=20)
    limiter.set_search_properties(None, None, search.param_space(_tune().search_space))
    for trial_id in ("a", "b"):
        assert limiter.suggest(trial_id) is not None
    limiter.on_trial_complete("a", {"step": 20, "val_loss": 2.0, "training_iteration": 5})
    limiter.on_trial_complete("b", {"step": 8, "val_loss": 3.0, "training_iteration": 2})
    study = optuna.load_study(study_name="p-tune", storage=search.make_storage(None, tmp_path))
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "PRUNED"]
    assert (tmp_path / search.JOURNAL_FILE).is_file()


def test_asha_prunes_on_the_first_metric_in_steps() -> None:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    spec = TuneSpec.model_validate({
        "target": "finetune", "search_space": {"train.lr": {"type": "uniform", "low": 0.1, "high": 0.2}},
        "metric": ["reward_accuracy", "val_loss"], "mode": ["max", "min"], "asha": {"grace_period": 5,
                                                                                   "reduction_factor": 3},
    })
    scheduler = search.make_scheduler(spec, max_step=50)
    assert isinstance(scheduler, ASHAScheduler)
    assert (scheduler._metric, scheduler._mode, scheduler._time_attr) == ("reward_accuracy", "max", "step")
    assert scheduler._max_t == 50 and scheduler._reduction_factor == 3
    # Rungs at grace_period x reduction_factor^k steps, below max_t.
    assert sorted(milestone for milestone, _ in scheduler._brackets[0]._rungs) == [5, 15, 45]
    assert isinstance(search.make_scheduler(_tune(scheduler="none"), max_step=50), FIFOScheduler)


# --- best and Pareto-optimal trials --------------------------------------------------------------------


def test_pareto_front_keeps_the_non_dominated_points() -> None:
    points = [[1.0, 0.5], [2.0, 0.9], [1.5, 0.4], [0.9, 0.2], [1.0, 0.5], [math.nan, 1.0]]
    # (min loss, max accuracy): [1.5, 0.4] is dominated by [1.0, 0.5]; the NaN point is left out;
    # equal points do not dominate each other.
    assert search.pareto_front(points, ["min", "max"]) == [0, 1, 3, 4]
    assert search.pareto_front([[1.0, 1.0], [2.0, 2.0]], ["min", "min"]) == [0]
    assert search.pareto_front([[1.0, 1.0], [2.0, 2.0]], ["max", "max"]) == [1]
    assert search.pareto_front([], ["min"]) == []


def test_best_index_and_running_best_skip_non_finite_values() -> None:
    assert search.best_index([3.0, math.nan, 1.0, 2.0], "min") == 2
    assert search.best_index([3.0, math.inf, 1.0], "max") == 0
    assert search.best_index([math.nan], "min") is None
    best = search.running_best([math.nan, 3.0, 4.0, 1.0], "min")
    assert math.isnan(best[0]) and best[1:] == [3.0, 3.0, 1.0]


# --- manifest checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({}, "search_space"),
        ({"train.lr": {"type": "uniform", "low": 0.1, "high": 0.1}}, "low must be < high"),
        ({"train.lr": {"type": "loguniform", "low": 0.0, "high": 0.1}}, "loguniform dimension needs low > 0"),
        ({"model.num_layers": {"type": "int", "low": 1.5, "high": 3}}, "whole-number bounds"),
        ({"train.batch_size": {"type": "choice", "values": [8]}}, "at least two different values"),
        ({"train.batch_size": {"type": "choice", "values": [8, 8]}}, "at least two different values"),
        ({"train.betas": {"type": "choice", "values": [[0.9, 0.95], [0.9, 0.99]]}}, "numbers, strings, booleans"),
        ({"train.lr": {"type": "choice", "low": 0.1, "high": 0.2}}, "a choice takes values"),
        ({"train.lr": {"type": "uniform", "values": [1, 2]}}, "takes low and high"),
        ({"train.no_such_thing": {"type": "uniform", "low": 0, "high": 1}}, "not a setting of spec.pretrain"),
    ],
)
def test_empty_or_degenerate_search_spaces_are_rejected(space: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message) as raised:
        parse_manifest(_manifest({"target": "pretrain", "search_space": space}))
    assert "spec.tune.search_space" in str(raised.value)


def test_a_metric_no_stage_reports_is_rejected() -> None:
    with pytest.raises(SpecError, match="no stage reports 'accuracy'; pretrain reports val_loss, val_perplexity"):
        parse_manifest(_manifest({"target": "pretrain", "metric": "accuracy",
                                  "search_space": {"train.lr": {"type": "uniform", "low": 0.1, "high": 0.2}}}))


def test_mode_count_and_asha_budget_are_checked() -> None:
    space = {"train.lr": {"type": "uniform", "low": 0.1, "high": 0.2}}
    with pytest.raises(SpecError, match="one mode per metric"):
        parse_manifest(_manifest({"target": "pretrain", "search_space": space, "metric": ["val_loss", "val_perplexity"],
                                  "mode": ["min", "min", "max"]}))
    with pytest.raises(SpecError, match=r"must exceed asha.grace_period"):
        parse_manifest(_manifest({"target": "pretrain", "search_space": space, "max_steps": 10,
                                  "asha": {"grace_period": 10}}))
    with pytest.raises(SpecError, match="no pretrain section to search over"):
        parse_manifest({**_manifest({"target": "pretrain", "search_space": space}),
                        "spec": {"data": {"sources": [{"type": "python-stdlib"}]},
                                 "tune": {"target": "pretrain", "search_space": space}}})


def test_a_target_too_short_for_asha_fails_before_any_trial(tmp_path: Path) -> None:
    from kubeforge.context import StageContext
    from kubeforge.errors import StageError
    from kubeforge.tune.stage import run

    # tune.max_steps is unset, so the budget is the target's train.max_steps (10), within the grace period (20).
    pipeline = parse_manifest(_manifest({"target": "pretrain", "search_space": {
        "train.lr": {"type": "uniform", "low": 0.1, "high": 0.2}}}, {"train": {"max_steps": 10}}))
    ctx = StageContext(pipeline=pipeline, stage="tune", out_dir=tmp_path, base_dir=tmp_path, tracker=None,  # type: ignore[arg-type]
                       reporter=None)  # type: ignore[arg-type]
    with pytest.raises(StageError, match=r"spec\.tune\.asha\.grace_period: \(20\) must be below the trials' 10 steps"):
        run(pipeline.spec.tune, ctx)  # type: ignore[arg-type]


def test_a_trials_error_is_told_by_its_last_line() -> None:
    from kubeforge.tune.recorder import error_line

    assert error_line("Traceback (most recent call last):\n  File x\nTrialError: stage pretrain: bad\n\n") == (
        "TrialError: stage pretrain: bad")
    assert error_line(None) is None
