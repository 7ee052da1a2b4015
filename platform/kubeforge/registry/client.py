"""Registered models, aliases, approvals and their audit trail, all kept in MLflow.

Every model a pipeline produces is a version of the registered model named after the pipeline.
`challenger` is the newest candidate that passed its gates, `champion` is what serves production.

Every alias move and approval leaves an audit record (who, when, why, what moved where) as a
registered-model tag `kubeforge.audit.<zero-padded time_ns>` holding compact JSON. Keeping the trail
in MLflow rather than in a local file means the CLI on a laptop, the operator in the cluster and an
MLflow server all see the same history; the champion history that `rollback` walks is replayed from
these records, so there is no second copy to drift out of step.

MLflow is imported inside the methods: the CLI imports this module and must stay fast.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from kubeforge.registry.audit import (
    APPROVE,
    AUDIT_TAG_PREFIX,
    CHAMPION,
    MAX_USER_CHARS,
    PROMOTE,
    ROLLBACK,
    AuditRecord,
    RegistryError,
    champion_history,
    fit,
    require_reason,
)
from kubeforge.secrets import redact_url, scrub

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel


# Lineage and state tags on model versions (written by the stages that register and gate models).
TAG_ROLE = "kubeforge.role"  # base | finetuned | quantized
TAG_METHOD = "kubeforge.method"  # fine-tuning method (full, lora, qlora, ...)
TAG_QUANTIZATION = "kubeforge.quantization"  # quantization scheme of a quantized version
TAG_PARENT_VERSION = "kubeforge.parent_version"  # the registered version this one was made from
TAG_LORA_ADAPTER = "kubeforge.lora_adapter"  # run artifact folder of a LoRA adapter of this version
TAG_GATES = "kubeforge.gates"  # passed | failed
TAG_APPROVAL = "kubeforge.approval"  # pending | approved | rejected
TAG_APPROVED_BY = "kubeforge.approved_by"
TAG_APPROVED_AT = "kubeforge.approved_at"

@dataclass(frozen=True)
class VersionInfo:
    """One registered model version, with its aliases and tags."""

    model: str
    version: str
    source: str
    run_id: str | None
    created: str
    """ISO-8601 UTC."""
    aliases: tuple[str, ...]
    tags: dict[str, str]

    @property
    def role(self) -> str | None:
        return self.tags.get(TAG_ROLE)

    @property
    def approval(self) -> str | None:
        return self.tags.get(TAG_APPROVAL)

    @property
    def gates(self) -> str | None:
        return self.tags.get(TAG_GATES)

    @property
    def method(self) -> str | None:
        return self.tags.get(TAG_METHOD)

    @property
    def quantization(self) -> str | None:
        return self.tags.get(TAG_QUANTIZATION)

    @property
    def parent_version(self) -> str | None:
        return self.tags.get(TAG_PARENT_VERSION)

    @property
    def lora_adapter(self) -> str | None:
        return self.tags.get(TAG_LORA_ADAPTER)

    @property
    def uri(self) -> str:
        return f"models:/{self.model}/{self.version}"


@dataclass(frozen=True)
class ModelSummary:
    """A registered model as `kubeforge models list` shows it."""

    name: str
    aliases: dict[str, str]
    """alias -> version."""
    latest_version: str | None
    updated: str


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="seconds")


def _quoted(value: str) -> str:
    """A string literal for an MLflow search filter (it accepts single or double quotes, no escapes)."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise RegistryError(f"name {value!r} holds both kinds of quote; MLflow cannot search for it")


class Registry:
    """The registered models of one MLflow tracking/registry URI."""

    def __init__(self, tracking_uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # -- reading -----------------------------------------------------------------------------
    def models(self) -> list[ModelSummary]:
        """Every registered model, by name."""
        found = []
        with self._mlflow("listing registered models"):
            token = None
            while True:
                page = self.client.search_registered_models(max_results=1000, page_token=token)
                for rm in page:
                    latest = max((int(v.version) for v in rm.latest_versions or []), default=None)
                    found.append(
                        ModelSummary(
                            name=rm.name,
                            aliases={a: str(v) for a, v in rm.aliases.items()},
                            latest_version=None if latest is None else str(latest),
                            updated=_iso(rm.last_updated_timestamp / 1000),
                        )
                    )
                token = page.token
                if not token:
                    break
        return sorted(found, key=lambda m: m.name)

    def versions(self, model: str) -> list[VersionInfo]:
        """Every version of `model`, newest first."""
        rm = self._model(model)
        result: list[VersionInfo] = []
        with self._mlflow(f"listing versions of model '{model}'"):
            token = None
            while True:
                page = self.client.search_model_versions(
                    f"name = {_quoted(model)}", max_results=10000, order_by=["version_number DESC"], page_token=token
                )
                result.extend(self._info(mv, rm) for mv in page)
                token = page.token
                if not token:
                    break
        return sorted(result, key=lambda v: int(v.version), reverse=True)

    def version(self, model: str, version: str) -> VersionInfo:
        """Version `"3"` of `model`, or the version an alias points to with `"@champion"`."""
        ref = str(version).strip()
        if ref.startswith("@"):
            alias = ref[1:]
            found = self.alias(model, alias)
            if found is None:
                raise RegistryError(f"model '{model}' has no alias '{alias}' ({self._describe_aliases(model)})")
            return found
        if not ref.isdigit():
            raise RegistryError(
                f"model '{model}': version must be a number like 3 or an alias like @champion (got '{ref}')"
            )
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(model, ref)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise self._error(f"reading model '{model}' version {ref}", exc) from None
            existing = self.versions(model)  # names the registered models when the model itself is missing
            listed = ", ".join(v.version for v in reversed(existing)) or "none yet"
            raise RegistryError(f"model '{model}' has no version {ref} (versions: {listed})") from None
        return self._info(mv, self._model(model))

    def alias(self, model: str, alias: str) -> VersionInfo | None:
        """The version `alias` points to, or None when the alias is unset."""
        # Read from the registered model's alias map rather than `get_model_version_by_alias`, whose
        # "alias not found" shares its error code (INVALID_PARAMETER_VALUE) with a malformed alias name.
        rm = self._model(model)
        target = rm.aliases.get(alias)
        if target is None:
            return None
        with self._mlflow(f"reading model '{model}' version {target}"):
            mv = self.client.get_model_version(model, str(target))
        return self._info(mv, rm)

    def audit(self, model: str) -> list[AuditRecord]:
        """Every audit record of `model`, oldest first."""
        return [record for _, record in self._audit(self._model(model))]

    # -- writing -----------------------------------------------------------------------------
    def register(
        self, model: str, *, run_id: str, artifact_path: str, tags: Mapping[str, str], description: str | None = None
    ) -> VersionInfo:
        """A new version of `model` from `artifact_path` in run `run_id`'s artifacts.

        Idempotent: a version of the same run and source is returned instead of registering again,
        so a resumed stage does not add a second version of the same model.
        """
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise RegistryError(f"cannot register model '{model}': run '{run_id}' does not exist") from None
            raise self._error(f"reading run '{run_id}'", exc) from None
        # The run's artifact URI, not a local path: an MLflow server only accepts a source inside
        # the artifact root of the run named by run_id (mlflow.server.handlers._validate_source_run).
        source = run.info.artifact_uri.rstrip("/")
        if artifact_path.strip("/"):
            source = f"{source}/{artifact_path.strip('/')}"
        with self._mlflow(f"registering model '{model}'"):
            try:
                self.client.create_registered_model(model)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            existing = self.client.search_model_versions(f"name = {_quoted(model)} and run_id = {_quoted(run_id)}")
            for mv in sorted(existing, key=lambda v: int(v.version)):
                if mv.source == source:
                    return self._info(mv, self._model(model))
            mv = self.client.create_model_version(
                model, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()}, description=description
            )
        return self._info(mv, self._model(model))

    def set_tags(self, model: str, version: str, tags: Mapping[str, str]) -> None:
        info = self.version(model, version)
        with self._mlflow(f"tagging model '{model}' version {info.version}"):
            for key, value in tags.items():
                self.client.set_model_version_tag(model, info.version, key, str(value))

    def move_alias(self, model: str, alias: str, version: str, *, action: str, reason: str, user: str) -> AuditRecord:
        """Point `alias` at `version` and record who moved it from where, and why."""
        reason = require_reason(action, reason)
        info = self.version(model, version)
        return self._move(model, alias, info.version, action=action, reason=reason, user=user)

    def promote(
        self, model: str, version: str, *, alias: str = CHAMPION, reason: str, user: str, force: bool = False
    ) -> AuditRecord:
        """Give `version` the alias, unless its gates failed or it still awaits (or was refused) approval."""
        reason = require_reason(PROMOTE, reason)
        info = self.version(model, version)
        if alias in info.aliases:
            raise RegistryError(f"model '{model}' version {info.version} is already {alias}")
        if not force:
            if info.gates == "failed":
                raise RegistryError(
                    f"model '{model}' version {info.version} failed its promotion gates; "
                    "pass --force to promote it anyway"
                )
            if info.approval == "pending":
                raise RegistryError(
                    f"model '{model}' version {info.version} is awaiting approval; approve it first "
                    f"(kubeforge models approve {model} {info.version} --reason ...) or pass --force"
                )
            if info.approval == "rejected":
                raise RegistryError(
                    f"model '{model}' version {info.version} was rejected at approval; "
                    "pass --force to promote it anyway"
                )
        return self._move(model, alias, info.version, action=PROMOTE, reason=reason, user=user)

    def rollback(self, model: str, *, reason: str, user: str) -> AuditRecord:
        """Give `champion` back to the version that held it before the current one."""
        reason = require_reason(ROLLBACK, reason)
        rm = self._model(model)
        history = champion_history([record for _, record in self._audit(rm)])
        current = rm.aliases.get(CHAMPION)
        current = None if current is None else str(current)
        if history and current != history[-1]:
            # The alias was moved or removed outside KubeForge (MLflow UI, API): go back to the last
            # champion the audit trail knows, which is the one that served before that move.
            target = history[-1]
        elif len(history) >= 2:
            target = history[-2]
        else:
            raise RegistryError(f"model '{model}' has no previous champion to roll back to")
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_model_version(model, target)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise RegistryError(
                    f"model '{model}': the previous champion, version {target}, no longer exists; "
                    f"promote a version instead (kubeforge models promote {model} VERSION --reason ...)"
                ) from None
            raise self._error(f"reading model '{model}' version {target}", exc) from None
        return self._move(model, CHAMPION, target, action=ROLLBACK, reason=reason, user=user, rm=rm)

    def approve(self, model: str, version: str, *, reason: str, user: str) -> AuditRecord:
        """Sign off a version that awaits approval (tag kubeforge.approval=pending)."""
        reason = require_reason(APPROVE, reason)
        info = self.version(model, version)
        state = info.approval
        if state != "pending":
            if state is None:
                why = "no approval was requested for it"
            elif state == "approved":
                by = info.tags.get(TAG_APPROVED_BY, "?")
                when = info.tags.get(TAG_APPROVED_AT, "?")
                why = f"already approved by {by} at {when}"
            else:
                why = f"its approval state is '{state}'"
            raise RegistryError(f"model '{model}' version {info.version} is not awaiting approval ({why})")
        record, stamp = self._new_record(
            self._model(model),
            action=APPROVE,
            alias=None,
            from_version=None,
            to_version=info.version,
            reason=reason,
            user=user,
        )
        with self._mlflow(f"approving model '{model}' version {info.version}"):
            # The approval tag is what a waiting promotion stage polls; the audit record follows it.
            self.client.set_model_version_tag(model, info.version, TAG_APPROVED_BY, record.user)
            self.client.set_model_version_tag(model, info.version, TAG_APPROVED_AT, record.time)
            self.client.set_model_version_tag(model, info.version, TAG_APPROVAL, "approved")
        return self._write_audit(model, record, stamp)

    # -- internals ---------------------------------------------------------------------------
    def _move(
        self,
        model: str,
        alias: str,
        version: str,
        *,
        action: str,
        reason: str,
        user: str,
        rm: RegisteredModel | None = None,
    ) -> AuditRecord:
        rm = rm or self._model(model)
        previous = rm.aliases.get(alias)
        record, stamp = self._new_record(
            rm,
            action=action,
            alias=alias,
            from_version=None if previous is None else str(previous),
            to_version=version,
            reason=reason,
            user=user,
        )
        with self._mlflow(f"setting alias '{alias}' of model '{model}'"):
            # Alias first: if MLflow refuses it there is no record of a move that did not happen.
            self.client.set_registered_model_alias(model, alias, version)
        return self._write_audit(model, record, stamp)

    def _new_record(
        self,
        rm: RegisteredModel,
        *,
        action: str,
        alias: str | None,
        from_version: str | None,
        to_version: str | None,
        reason: str,
        user: str,
    ) -> tuple[AuditRecord, int]:
        """The record and its tag key's timestamp, not yet written."""
        record = AuditRecord(
            time="",
            user=(user or "").strip()[:MAX_USER_CHARS] or "unknown",
            action=action,
            alias=alias,
            from_version=from_version,
            to_version=to_version,
            reason=reason,
        )
        # The key orders the replay; it must sort after every existing record even when this
        # machine's clock is behind the one that wrote the last record.
        last = max((int(key) for key, _ in self._audit_keys(rm)), default=0)
        stamp = max(time.time_ns(), last + 1)
        return fit(replace(record, time=_iso(stamp / 1e9))), stamp

    def _write_audit(self, model: str, record: AuditRecord, stamp: int) -> AuditRecord:
        with self._mlflow(f"writing the audit record of model '{model}'"):
            self.client.set_registered_model_tag(model, f"{AUDIT_TAG_PREFIX}{stamp:020d}", record.to_json())
        return record

    @staticmethod
    def _audit_keys(rm: RegisteredModel) -> Iterator[tuple[str, str]]:
        for key, value in (rm.tags or {}).items():
            suffix = key[len(AUDIT_TAG_PREFIX) :]
            if key.startswith(AUDIT_TAG_PREFIX) and suffix.isdigit():
                yield suffix, value

    def _audit(self, rm: RegisteredModel) -> list[tuple[int, AuditRecord]]:
        records = []
        for suffix, value in self._audit_keys(rm):
            try:
                records.append((int(suffix), AuditRecord.from_json(value)))
            except (ValueError, TypeError) as exc:
                # Refuse rather than skip: rollback replays these records, and a silently dropped
                # one would send the champion to the wrong version.
                raise RegistryError(
                    f"model '{rm.name}': audit tag {AUDIT_TAG_PREFIX}{suffix} is not a valid record ({exc}); "
                    "restore or delete that tag"
                ) from None
        return sorted(records, key=lambda item: item[0])

    def _model(self, model: str) -> RegisteredModel:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(model)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise self._error(f"reading registered model '{model}'", exc) from None
        names = [m.name for m in self.models()]
        listed = f"registered models: {', '.join(names)}" if names else "no models are registered yet"
        raise RegistryError(f"no registered model '{model}' in {redact_url(self.tracking_uri)} ({listed})")

    def _describe_aliases(self, model: str) -> str:
        aliases = self._model(model).aliases
        if not aliases:
            return "it has no aliases"
        return "aliases: " + ", ".join(f"{a} -> version {v}" for a, v in sorted(aliases.items()))

    def _info(self, mv: ModelVersion, rm: RegisteredModel) -> VersionInfo:
        # Search results may leave `aliases` empty (MlflowClient.search_model_versions says so);
        # the registered model's alias map is authoritative.
        aliases = sorted(a for a, v in rm.aliases.items() if str(v) == str(mv.version))
        return VersionInfo(
            model=mv.name,
            version=str(mv.version),
            source=mv.source or "",
            run_id=mv.run_id or None,
            created=_iso((mv.creation_timestamp or 0) / 1000),
            aliases=tuple(aliases),
            tags=dict(mv.tags or {}),
        )

    def _error(self, doing: str, exc: Exception) -> RegistryError:
        message = getattr(exc, "message", None) or str(exc)
        first = (message.strip().splitlines() or [type(exc).__name__])[0]
        return RegistryError(f"{doing} in MLflow at {redact_url(self.tracking_uri)}: {scrub(first, self.tracking_uri)}")

    @contextmanager
    def _mlflow(self, doing: str) -> Iterator[None]:
        """Turn MLflow's exceptions into one clear line; ours pass through unchanged."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MlflowException as exc:
            raise self._error(doing, exc) from None
