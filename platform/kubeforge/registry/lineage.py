"""Registering the models a pipeline produces as versions of its registered MLflow model."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kubeforge import stages
from kubeforge.context import Registered, StageOutput
from kubeforge.registry.client import TAG_LORA_ADAPTER, TAG_PARENT_VERSION
from kubeforge.stages.results import ModelResult
from kubeforge.tracking import TAG_PREFIX

# Run tags copied onto the version, so lineage survives without following run links.
_COPIED_RUN_TAGS = ("pipeline", "stage", "stage_key", "spec_hash", "run", "code_version", "dataset_hash", "namespace")


def version_tags(
    stage: stages.Stage[Any, Any], result: ModelResult, run_tags: Mapping[str, str],
    inputs: Mapping[str, StageOutput[Any]],
) -> dict[str, str]:
    tags = {f"{TAG_PREFIX}{k}": str(run_tags[f"{TAG_PREFIX}{k}"]) for k in _COPIED_RUN_TAGS
            if f"{TAG_PREFIX}{k}" in run_tags}
    parents = {name: out.mlflow_run_id for name, out in inputs.items() if out.mlflow_run_id}
    # The model this one was made from: the latest registered model among its inputs.
    registered = [inputs[s.name].registered for s in reversed(stages.model_stages()) if s.name in inputs]
    parent_version = next((r.version for r in registered if r is not None), None)
    lineage = result.lineage()
    assert stage.model_role is not None  # only model stages register
    tags.update({
        f"{TAG_PREFIX}role": stage.model_role,
        f"{TAG_PREFIX}method": lineage.method,
        f"{TAG_PREFIX}quantization": lineage.quantization,
        f"{TAG_PREFIX}format": lineage.format,
        f"{TAG_PREFIX}parent_runs": json.dumps(parents, sort_keys=True),
    })
    if parent_version is not None:
        tags[TAG_PARENT_VERSION] = parent_version
    if lineage.lora_adapter is not None:
        tags[TAG_LORA_ADAPTER] = lineage.lora_adapter
    return tags


def register_stage_model(
    tracking_uri: str,
    model: str,
    stage: stages.Stage[Any, Any],
    result: ModelResult,
    run_id: str,
    run_tags: Mapping[str, str],
    inputs: Mapping[str, StageOutput[Any]],
) -> Registered | None:
    """Register the stage's model (idempotent per run, so a resumed stage does not add a version)."""
    from kubeforge.registry.client import Registry

    artifact = result.model_artifact()
    if stage.model_role is None or artifact is None:
        return None
    tags = version_tags(stage, result, run_tags, inputs)
    description = f"{stage.model_role} model from stage {stage.name} of pipeline {model}"
    version = Registry(tracking_uri).register(model, run_id=run_id, artifact_path=artifact, tags=tags,
                                             description=description)
    return Registered(model=model, version=str(version.version), source=version.source)
