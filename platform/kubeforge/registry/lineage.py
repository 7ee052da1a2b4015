"""Registering the models a pipeline produces as versions of its registered MLflow model."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kubeforge.context import StageOutput
from kubeforge.tracking import TAG_PREFIX

MODEL_ROLES: dict[str, str] = {"pretrain": "base", "finetune": "finetuned", "quantize": "quantized"}
"""Stages that produce a model, and the role its version plays in the lineage."""
CANDIDATE_ORDER = ("quantize", "finetune", "pretrain")
"""The pipeline's candidate is the last model it produced: quantized, else fine-tuned, else pretrained."""

# Run tags copied onto the version, so lineage survives without following run links.
_COPIED_RUN_TAGS = ("pipeline", "stage", "stage_key", "spec_hash", "run", "code_version", "dataset_hash", "namespace")


def model_artifact(result: Mapping[str, Any]) -> str | None:
    """The run artifact holding the stage's model: merged weights, else the adapter (prefix tuning)."""
    return result.get("model_dir") or result.get("adapter_dir")


def version_tags(
    stage: str, result: Mapping[str, Any], run_tags: Mapping[str, str], inputs: Mapping[str, StageOutput]
) -> dict[str, str]:
    tags = {f"{TAG_PREFIX}{k}": str(run_tags[f"{TAG_PREFIX}{k}"]) for k in _COPIED_RUN_TAGS
            if f"{TAG_PREFIX}{k}" in run_tags}
    parents = {name: out.mlflow_run_id for name, out in inputs.items() if out.mlflow_run_id}
    parent_version = next(
        (str(inputs[s].result["registered"]["version"]) for s in CANDIDATE_ORDER
         if s in inputs and inputs[s].result.get("registered")),
        None,
    )
    finetune = inputs["finetune"].result if "finetune" in inputs else None
    if stage == "pretrain":
        method = f"pretrain-{result.get('objective', 'causal')}"
    elif stage == "finetune":
        method = f"{result.get('objective')}-{result.get('method')}"
    else:
        source = finetune or (inputs["pretrain"].result if "pretrain" in inputs else {})
        method = (f"{source.get('objective')}-{source.get('method')}" if finetune
                  else f"pretrain-{source.get('objective', 'causal')}")
    tags.update({
        f"{TAG_PREFIX}role": MODEL_ROLES[stage],
        f"{TAG_PREFIX}method": method,
        f"{TAG_PREFIX}quantization": str(result.get("scheme", "none")) if stage == "quantize" else "none",
        f"{TAG_PREFIX}format": str(result.get("format", "peft-adapter" if not result.get("model_dir") else "hf")),
        f"{TAG_PREFIX}parent_runs": json.dumps(parents, sort_keys=True),
    })
    if parent_version is not None:
        tags[f"{TAG_PREFIX}parent_version"] = parent_version
    return tags


def register_stage_model(
    tracking_uri: str,
    model: str,
    stage: str,
    result: Mapping[str, Any],
    run_id: str,
    run_tags: Mapping[str, str],
    inputs: Mapping[str, StageOutput],
) -> dict[str, str] | None:
    """Register the stage's model (idempotent per run, so a resumed stage does not add a version)."""
    from kubeforge.registry.client import Registry

    artifact = model_artifact(result)
    if stage not in MODEL_ROLES or artifact is None:
        return None
    tags = version_tags(stage, result, run_tags, inputs)
    description = f"{MODEL_ROLES[stage]} model from stage {stage} of pipeline {model}"
    version = Registry(tracking_uri).register(model, run_id=run_id, artifact_path=artifact, tags=tags,
                                             description=description)
    return {"model": model, "version": version.version, "source": version.source}


def candidate(inputs: Mapping[str, StageOutput]) -> StageOutput | None:
    return next((inputs[s] for s in CANDIDATE_ORDER if s in inputs), None)
