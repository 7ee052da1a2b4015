"""Errors survive the trip through Ray: workers and trials pickle and copy what they raise."""

from __future__ import annotations

import copy
import pickle

import pytest

from kubeforge.errors import Problem, SpecError, StageError

pytestmark = pytest.mark.unit


def test_stage_and_spec_errors_pickle_and_copy_with_their_fields() -> None:
    error = StageError("finetune", "spec.finetune.lora.target_modules: no module 'q'", resumable=True)
    for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert isinstance(clone, StageError)
        assert (clone.stage, clone.message, clone.resumable) == ("finetune", error.message, True)
        assert str(clone) == str(error)

    spec_error = SpecError([Problem("spec.tune.metric", "no stage reports 'bleu'")], source="hpo.yaml")
    clone = pickle.loads(pickle.dumps(spec_error))
    assert clone.problems == spec_error.problems and clone.source == "hpo.yaml"
    assert str(clone) == "spec.tune.metric: no stage reports 'bleu'"
