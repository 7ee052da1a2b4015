"""Credentials on a cluster (issue [9/11], fault 7): they come from Secrets, never sit in plain text in a
manifest, a RayJob or the operator's settings, and are redacted wherever a URL is printed."""

from __future__ import annotations

import pytest

from kubeforge.errors import SpecError, StageError
from kubeforge.secrets import has_password, redact_url
from kubeforge.spec.load import parse_manifest
from kubeforge_operator.config import ConfigError, OperatorConfig
from kubeforge_operator.pipeline import manifest_document, validate
from kubeforge_operator.rayjob import stage_rayjob
from kubeforge_operator.stage_runs import MlflowUnavailable, find_stage_runs
from tests.unit.test_operator_builders import CONFIG, OWNER, build_rayservice, deployment_document
from tests.unit.test_operator_builders import gpu_everywhere as with_tune

pytestmark = pytest.mark.unit

DATABASE = "postgresql://kf:s3cret@db:5432/optuna"


def test_urls_are_redacted() -> None:
    assert redact_url(DATABASE) == "postgresql://kf:***@db:5432/optuna"
    assert redact_url("https://mlflow.example/api?token=abc&x=1") == "https://mlflow.example/api?token=***&x=1"
    assert redact_url("sqlite:////tmp/optuna.db") == "sqlite:////tmp/optuna.db"
    assert has_password(DATABASE) and not has_password("http://kf@mlflow:5000") and not has_password("")


def tune_document(**tune: str) -> dict:
    pipeline = with_tune()
    document = pipeline.model_dump(mode="json", exclude_unset=True)
    document["spec"]["tune"].update(tune)
    return document


def test_a_password_in_tune_storage_is_refused_on_a_cluster() -> None:
    with pytest.raises(SpecError) as caught:
        validate(manifest_document(tune_document(storage=DATABASE)))
    (problem,) = caught.value.problems
    assert problem.where == "spec.tune.storage" and "postgresql://kf:***@db" in problem.message
    assert "s3cret" not in str(caught.value)
    # Without a password, or from a Secret's variable, it runs.
    validate(manifest_document(tune_document(storage="postgresql://db:5432/optuna")))
    document = tune_document(storage_env="OPTUNA_STORAGE")
    document["spec"]["cluster"]["env_secrets"] = ["optuna-db"]
    pipeline = validate(manifest_document(document))
    job = stage_rayjob(pipeline, "tune", OWNER, CONFIG)
    cluster = job["spec"]["rayClusterSpec"]
    for template in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        assert {"secretRef": {"name": "optuna-db"}} in template["spec"]["containers"][0]["envFrom"]
    assert "s3cret" not in str(job)
    with pytest.raises(SpecError, match=r"spec\.tune\.storage_env: set storage or storage_env, not both"):
        parse_manifest(tune_document(storage="sqlite:///x.db", storage_env="OPTUNA_STORAGE"))


def test_the_tune_stage_reads_its_storage_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubeforge.tune.stage import _storage_url

    spec = parse_manifest(tune_document(storage_env="OPTUNA_STORAGE")).section("tune")
    monkeypatch.setenv("OPTUNA_STORAGE", DATABASE)
    assert _storage_url(spec) == DATABASE
    monkeypatch.delenv("OPTUNA_STORAGE")
    with pytest.raises(StageError, match=r"spec\.tune\.storage_env: the environment variable OPTUNA_STORAGE is not set"):
        _storage_url(spec)


def test_the_operator_refuses_a_tracking_uri_with_a_password() -> None:
    env = {"KUBEFORGE_OPERATOR_STAGE_IMAGE": "s:1", "KUBEFORGE_OPERATOR_QUANTIZE_IMAGE": "q:1"}
    with pytest.raises(ConfigError) as caught:
        OperatorConfig.from_env({**env, "KUBEFORGE_OPERATOR_MLFLOW_TRACKING_URI": "http://kf:s3cret@mlflow:5000"})
    assert "KUBEFORGE_OPERATOR_MLFLOW_TRACKING_URI: http://kf:***@mlflow:5000 holds a password" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    assert OperatorConfig.from_env({**env, "KUBEFORGE_OPERATOR_MLFLOW_TRACKING_URI": "http://mlflow:5000"})


def test_serving_pods_take_the_stage_secret_for_mlflows_credentials() -> None:
    from dataclasses import replace

    service = build_rayservice(deployment_document(), 20, replace(CONFIG, stage_env_secret="mlflow-auth"))
    cluster = service["spec"]["rayClusterConfig"]
    for template in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        assert template["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "mlflow-auth", "optional": True}}]


def test_an_unreachable_mlflow_is_reported_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(MlflowUnavailable) as caught:
        find_stage_runs("http://kf:s3cret@127.0.0.1:9", "quickstart", "uid", {"data": "quickstart-data-x-1"})
    assert "http://kf:***@127.0.0.1:9" in str(caught.value) and "s3cret" not in str(caught.value)


def test_error_messages_are_scrubbed_of_the_urls_credentials() -> None:
    from kubeforge.secrets import scrub

    url = "http://kf:s3%2Fcret@mlflow:5000/?token=t0k"
    message = "API request to http://kf:s3%2Fcret@mlflow:5000/api failed (password s3/cret, token t0k)"
    assert scrub(message, url) == "API request to http://kf:***@mlflow:5000/api failed (password ***, token ***)"
    assert scrub("no secret here", "http://mlflow:5000") == "no secret here"
