"""The model registry against a real MLflow store (SQLite): registration, aliases, approvals, the
audit trail kept as registered-model tags, rollback replayed from it, and the `kubeforge models` CLI.

One database serves the whole module (creating one costs seconds); every test works on its own
registered model, named after the test, so the tests do not see each other's versions.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from kubeforge.cli import main
from kubeforge.registry.audit import (
    AUDIT_TAG_PREFIX,
    CHALLENGER,
    CHAMPION,
    MAX_AUDIT_CHARS,
    AuditRecord,
    RegistryError,
    champion_history,
)
from kubeforge.registry.client import Registry, VersionInfo

pytestmark = pytest.mark.integration


@dataclass
class Store:
    uri: str
    client: MlflowClient
    experiment_id: str
    model_dir: Path
    registry: Registry

    def run(self) -> str:
        """A finished run whose artifacts hold a (dummy) model folder under `model/`."""
        run = self.client.create_run(self.experiment_id)
        self.client.log_artifacts(run.info.run_id, str(self.model_dir), "model")
        return run.info.run_id

    def register(self, model: str, tags: Mapping[str, str] | None = None) -> VersionInfo:
        return self.registry.register(model, run_id=self.run(), artifact_path="model", tags=dict(tags or {}))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("registry-tests", artifact_location=(root / "artifacts").as_uri())
    model_dir = root / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "dummy"}))
    return Store(uri, client, experiment_id, model_dir, Registry(uri))


@pytest.fixture
def model(request: pytest.FixtureRequest) -> str:
    return request.node.name.replace("[", "-").replace("]", "")


def test_register_is_idempotent_and_points_at_the_run_artifacts(store: Store, model: str) -> None:
    run_id = store.run()
    first = store.registry.register(model, run_id=run_id, artifact_path="model", tags={"kubeforge.role": "base"})
    again = store.registry.register(model, run_id=run_id, artifact_path="model/", tags={"kubeforge.role": "base"})
    assert (first.version, again.version) == ("1", "1")
    artifact_uri = store.client.get_run(run_id).info.artifact_uri
    assert first.source == f"{artifact_uri}/model"
    assert first.run_id == run_id
    assert first.role == "base"
    # Another artifact of the same run is another model (a quantized copy, say).
    other = store.registry.register(model, run_id=run_id, artifact_path="quantized", tags={})
    assert other.version == "2"
    assert [v.version for v in store.registry.versions(model)] == ["2", "1"]


def test_register_names_a_missing_run(store: Store, model: str) -> None:
    with pytest.raises(RegistryError, match=f"cannot register model '{model}': run 'f00' does not exist"):
        store.registry.register(model, run_id="f00", artifact_path="model", tags={})


def test_versions_of_a_missing_model_lists_the_registered_ones(store: Store, model: str) -> None:
    store.register(model)
    with pytest.raises(RegistryError) as info:
        store.registry.versions("no-such-model")
    message = str(info.value)
    assert message.startswith("no registered model 'no-such-model' in sqlite:///")
    assert "registered models: " in message and model in message


def test_promote_moves_the_alias_and_leaves_an_audit_record(store: Store, model: str) -> None:
    store.register(model)
    store.register(model)
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    first = store.registry.promote(model, "1", reason="first model", user="alice")
    second = store.registry.promote(model, "2", reason="lower perplexity", user="bob")

    assert store.registry.alias(model, CHAMPION).version == "2"  # type: ignore[union-attr]
    assert str(store.client.get_model_version_by_alias(model, CHAMPION).version) == "2"  # int from SQL stores
    assert (first.action, first.alias, first.from_version, first.to_version) == ("promote", CHAMPION, None, "1")
    assert (second.user, second.reason, second.from_version, second.to_version) == ("bob", "lower perplexity", "1", "2")
    assert before <= dt.datetime.fromisoformat(second.time) <= dt.datetime.now(dt.UTC)
    assert second.summary() == "champion: version 1 -> 2 (by bob: lower perplexity)"
    assert first.summary() == "champion: none -> version 1 (by alice: first model)"
    # Stored in MLflow itself, oldest first, one tag per record.
    assert store.registry.audit(model) == [first, second]
    tags = store.client.get_registered_model(model).tags
    keys = sorted(k for k in tags if k.startswith(AUDIT_TAG_PREFIX))
    assert len(keys) == 2 and all(len(k) == len(AUDIT_TAG_PREFIX) + 20 for k in keys)
    assert AuditRecord.from_json(tags[keys[1]]) == second


def test_promote_a_missing_version_names_it_and_lists_the_existing(store: Store, model: str) -> None:
    for _ in range(3):
        store.register(model)
    with pytest.raises(RegistryError, match=rf"^model '{model}' has no version 7 \(versions: 1, 2, 3\)$"):
        store.registry.promote(model, "7", reason="typo", user="alice")
    with pytest.raises(RegistryError, match="version must be a number like 3 or an alias like @champion"):
        store.registry.promote(model, "latest", reason="typo", user="alice")
    assert store.registry.audit(model) == []


def test_promote_refuses_failed_gates_and_pending_approval_unless_forced(store: Store, model: str) -> None:
    store.register(model, {"kubeforge.gates": "failed"})
    store.register(model, {"kubeforge.approval": "pending"})
    store.register(model, {"kubeforge.approval": "rejected"})
    with pytest.raises(RegistryError, match="version 1 failed its promotion gates; pass --force"):
        store.registry.promote(model, "1", reason="ship it", user="alice")
    with pytest.raises(RegistryError, match="version 2 is awaiting approval"):
        store.registry.promote(model, "2", reason="ship it", user="alice")
    with pytest.raises(RegistryError, match="version 3 was rejected at approval"):
        store.registry.promote(model, "3", reason="ship it", user="alice")
    assert store.registry.alias(model, CHAMPION) is None
    record = store.registry.promote(model, "1", reason="gate is too strict", user="alice", force=True)
    assert record.to_version == "1"
    assert store.registry.version(model, "@champion").version == "1"


def test_promote_refuses_the_current_holder_and_a_blank_reason(store: Store, model: str) -> None:
    store.register(model)
    store.registry.promote(model, "1", alias=CHALLENGER, reason="passed gates", user="ci")
    with pytest.raises(RegistryError, match=f"^model '{model}' version 1 is already challenger$"):
        store.registry.promote(model, "1", alias=CHALLENGER, reason="again", user="ci")
    with pytest.raises(RegistryError, match="promote: a reason is required"):
        store.registry.promote(model, "1", reason="   ", user="ci")
    # The challenger move is audited but is not champion history.
    assert [r.alias for r in store.registry.audit(model)] == [CHALLENGER]
    assert store.registry.alias(model, CHAMPION) is None


def test_rollback_walks_back_one_champion_at_a_time(store: Store, model: str) -> None:
    for _ in range(3):
        store.register(model)
    for version in ("1", "2", "3"):
        store.registry.promote(model, version, reason=f"v{version} is better", user="alice")
    store.registry.promote(model, "1", alias=CHALLENGER, reason="canary", user="ci")  # not champion history

    back = store.registry.rollback(model, reason="v3 regressed", user="bob")
    assert (back.action, back.alias, back.from_version, back.to_version) == ("rollback", CHAMPION, "3", "2")
    assert back.summary() == "champion rolled back: version 3 -> 2 (by bob: v3 regressed)"
    assert store.registry.alias(model, CHAMPION).version == "2"  # type: ignore[union-attr]

    further = store.registry.rollback(model, reason="v2 too", user="bob")
    assert (further.from_version, further.to_version) == ("2", "1")
    with pytest.raises(RegistryError, match=f"^model '{model}' has no previous champion to roll back to$"):
        store.registry.rollback(model, reason="and v1", user="bob")
    assert store.registry.alias(model, CHAMPION).version == "1"  # type: ignore[union-attr]

    # History continues after a rollback: promoting again and rolling back returns to 1.
    store.registry.promote(model, "3", reason="fixed", user="alice")
    assert store.registry.rollback(model, reason="not fixed", user="bob").to_version == "1"


def test_rollback_without_champion_history_is_refused(store: Store, model: str) -> None:
    store.register(model)
    with pytest.raises(RegistryError, match=f"^model '{model}' has no previous champion to roll back to$"):
        store.registry.rollback(model, reason="panic", user="bob")
    store.registry.promote(model, "1", reason="first", user="alice")
    with pytest.raises(RegistryError, match="no previous champion"):
        store.registry.rollback(model, reason="panic", user="bob")
    with pytest.raises(RegistryError, match="rollback: a reason is required"):
        store.registry.rollback(model, reason="", user="bob")


def test_rollback_after_the_alias_moved_outside_kubeforge(store: Store, model: str) -> None:
    for _ in range(3):
        store.register(model)
    store.registry.promote(model, "1", reason="first", user="alice")
    store.registry.promote(model, "2", reason="second", user="alice")
    # Someone moves the alias in the MLflow UI: no audit record. Rolling back restores the last
    # champion the audit trail knows, rather than skipping over it.
    store.client.set_registered_model_alias(model, CHAMPION, "3")
    record = store.registry.rollback(model, reason="undo the manual move", user="bob")
    assert (record.from_version, record.to_version) == ("3", "2")
    assert store.registry.rollback(model, reason="and once more", user="bob").to_version == "1"


def test_approve_flips_pending_to_approved_and_refuses_otherwise(store: Store, model: str) -> None:
    store.register(model, {"kubeforge.approval": "pending"})
    store.register(model)
    record = store.registry.approve(model, "1", reason="read the eval report", user="carol")
    assert (record.action, record.alias, record.to_version, record.user) == ("approve", None, "1", "carol")
    assert record.summary() == "version 1 approved (by carol: read the eval report)"
    info = store.registry.version(model, "1")
    assert info.approval == "approved"
    assert info.tags["kubeforge.approved_by"] == "carol"
    assert info.tags["kubeforge.approved_at"] == record.time
    with pytest.raises(RegistryError, match=r"version 1 is not awaiting approval \(already approved by carol at "):
        store.registry.approve(model, "1", reason="again", user="carol")
    with pytest.raises(RegistryError, match=r"version 2 is not awaiting approval \(no approval was requested for it\)"):
        store.registry.approve(model, "2", reason="why not", user="carol")
    with pytest.raises(RegistryError, match="approve: a reason is required"):
        store.registry.approve(model, "1", reason=" ", user="carol")
    # Approved: promotion is no longer refused.
    assert store.registry.promote(model, "1", reason="approved", user="carol").to_version == "1"


def test_alias_lookups(store: Store, model: str) -> None:
    store.register(model)
    store.register(model)
    assert store.registry.alias(model, CHAMPION) is None
    with pytest.raises(RegistryError, match=f"^model '{model}' has no alias 'champion' \\(it has no aliases\\)$"):
        store.registry.version(model, "@champion")
    store.registry.move_alias(model, CHALLENGER, "2", action="promote", reason="passed gates", user="ci")
    store.registry.promote(model, "1", reason="first", user="alice")
    champion = store.registry.version(model, "@champion")
    assert (champion.version, champion.aliases) == ("1", (CHAMPION,))
    assert store.registry.alias(model, CHALLENGER).version == "2"  # type: ignore[union-attr]
    assert [v.aliases for v in store.registry.versions(model)] == [(CHALLENGER,), (CHAMPION,)]
    with pytest.raises(
        RegistryError, match=r"has no alias 'prod' \(aliases: challenger -> version 2, champion -> version 1\)"
    ):
        store.registry.version(model, "@prod")
    summary = next(m for m in store.registry.models() if m.name == model)
    assert (summary.aliases, summary.latest_version) == ({CHALLENGER: "2", CHAMPION: "1"}, "2")


def test_set_tags(store: Store, model: str) -> None:
    store.register(model)
    store.registry.set_tags(model, "1", {"kubeforge.gates": "passed"})
    assert store.registry.version(model, "1").gates == "passed"
    with pytest.raises(RegistryError, match="has no version 2"):
        store.registry.set_tags(model, "2", {"kubeforge.gates": "passed"})


def test_a_long_reason_is_shortened_to_fit_one_tag(store: Store, model: str) -> None:
    store.register(model)
    record = store.registry.promote(model, "1", reason="ü" * 20_000, user="alice")
    assert len(record.to_json()) <= MAX_AUDIT_CHARS
    assert record.reason.endswith("…") and len(record.reason) > 4000
    assert store.registry.audit(model) == [record]


def test_champion_history_replay() -> None:
    def rec(action: str, alias: str, to: str) -> AuditRecord:
        return AuditRecord("t", "u", action, alias, None, to, "r")

    records = [
        rec("promote", CHAMPION, "1"),
        rec("promote", CHAMPION, "2"),
        rec("promote", CHALLENGER, "4"),
        rec("promote", CHAMPION, "3"),
        rec("rollback", CHAMPION, "2"),
        rec("promote", CHAMPION, "4"),
    ]
    assert champion_history(records) == ["1", "2", "4"]
    assert champion_history([]) == []


def test_audit_record_json_round_trip_and_bad_input() -> None:
    record = AuditRecord("2026-01-01T00:00:00+00:00", "ålice", "promote", CHAMPION, None, "3", 'say "why"')
    assert AuditRecord.from_json(record.to_json()) == record
    with pytest.raises(ValueError, match="missing or non-string fields: user, reason"):
        AuditRecord.from_json('{"time": "t", "action": "promote"}')


# -- the CLI -----------------------------------------------------------------------------------


def cli(store: Store, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [*args, "--tracking-uri", store.uri], catch_exceptions=False)
    return result.exit_code, result.output


def test_cli_list_shows_aliases(store: Store, model: str) -> None:
    store.register(model, {"kubeforge.role": "finetuned", "kubeforge.method": "lora"})
    store.register(model, {"kubeforge.role": "quantized", "kubeforge.quantization": "int8"})
    store.registry.promote(model, "1", reason="first", user="alice")
    store.registry.promote(model, "2", alias=CHALLENGER, reason="passed gates", user="ci")

    code, output = cli(store, "models", "list")
    assert code == 0, output
    row = next(line for line in output.splitlines() if line.startswith(model + " "))
    assert row.split()[:4] == [model, "1", "2", "2"]  # model, champion, challenger, latest

    code, output = cli(store, "models", "list", model)
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0].split()[:8] == [
        "version",
        "aliases",
        "role",
        "method",
        "quantization",
        "gates",
        "approval",
        "created",
    ]
    assert lines[1].split()[:5] == ["2", "challenger", "quantized", "-", "int8"]
    assert lines[2].split()[:4] == ["1", "champion", "finetuned", "lora"]


def test_cli_promote_rollback_and_approve_print_the_audit_line(store: Store, model: str) -> None:
    store.register(model)
    store.register(model, {"kubeforge.approval": "pending"})
    code, output = cli(store, "models", "promote", model, "1", "--reason", "first model", "--user", "alice")
    assert (code, output) == (0, "champion: none -> version 1 (by alice: first model)\n")
    code, output = cli(store, "models", "approve", model, "2", "--reason", "looks good", "--user", "carol")
    assert (code, output) == (0, "version 2 approved (by carol: looks good)\n")
    code, output = cli(store, "models", "promote", model, "2", "--reason", "better [rouge]", "--user", "bob")
    assert (code, output) == (0, "champion: version 1 -> 2 (by bob: better [rouge])\n")
    code, output = cli(store, "models", "rollback", model, "--reason", "latency", "--user", "dave")
    assert (code, output) == (0, "champion rolled back: version 2 -> 1 (by dave: latency)\n")

    code, output = cli(store, "models", "show", model, "@champion")
    assert code == 0, output
    assert output.startswith(f"{model} version 1  aliases: champion\nsource:  file://")
    audit = [line.split()[2:6] for line in output.splitlines() if line[:4].isdigit()]
    assert audit == [
        ["alice", "promote", "champion", "-"],
        ["bob", "promote", "champion", "1"],
        ["dave", "rollback", "champion", "2"],
    ]


def test_cli_user_defaults_to_kubeforge_user(store: Store, model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store.register(model)
    monkeypatch.setenv("KUBEFORGE_USER", "pipeline-bot")
    code, output = cli(store, "models", "promote", model, "1", "--alias", "challenger", "--reason", "gates passed")
    assert (code, output) == (0, "challenger: none -> version 1 (by pipeline-bot: gates passed)\n")


def test_cli_errors_are_one_line_and_non_zero(store: Store, model: str, tmp_path: Path) -> None:
    store.register(model)
    code, output = cli(store, "models", "promote", model, "9", "--reason", "typo")
    assert (code, output) == (1, f"error: model '{model}' has no version 9 (versions: 1)\n")
    code, output = cli(store, "models", "rollback", model, "--reason", "panic")
    assert (code, output) == (1, f"error: model '{model}' has no previous champion to roll back to\n")
    code, output = cli(store, "models", "show", "nope", "1")
    assert code == 1 and len(output.splitlines()) == 1 and output.startswith("error: no registered model 'nope' in ")
    # A workdir without an MLflow store is named, instead of MLflow quietly creating an empty one.
    result = CliRunner().invoke(
        main, ["models", "list", "--workdir", str(tmp_path / "work")], env={"MLFLOW_TRACKING_URI": None}
    )
    assert result.exit_code == 1
    assert (
        result.output
        == f"error: no MLflow store at {tmp_path / 'work' / 'mlflow.db'}: run a pipeline first, or pass --tracking-uri / --workdir\n"
    )
    assert not (tmp_path / "work").exists()
