"""The operator's lookup of stage runs in MLflow, when MLflow cannot answer."""

from __future__ import annotations

import pytest

from kubeforge_operator.stage_runs import MlflowUnavailable, find_stage_runs
from tests.helpers import free_port


def test_an_unreachable_mlflow_is_an_error_to_retry_not_an_empty_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(MlflowUnavailable, match=f"MLflow at {uri}"):
        find_stage_runs(uri, "quickstart", "uid-1", {"data": "quickstart-data-1"})


def test_nothing_wanted_asks_nothing() -> None:
    # No server at this address: asking anything would raise.
    assert find_stage_runs("http://127.0.0.1:9", "quickstart", "uid-1", {}) == {}
