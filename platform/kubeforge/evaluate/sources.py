"""The models the evaluate stage scores, and how each is loaded: the candidate (the aligned model, else the
fine-tuned one, else the pretrained one), its base, and the registered champion downloaded from MLflow."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubeforge.context import StageContext, StageOutput
from kubeforge.errors import StageError
from kubeforge.registry.audit import CHAMPION
from kubeforge.spec.evaluate import EvaluateSpec
from kubeforge.stages.evaluate import EVALUATE
from kubeforge.stages.finetune import FinetuneResult
from kubeforge.stages.quantize import QUANTIZE
from kubeforge.stages.rl import RlResult

STAGE = EVALUATE.name


@dataclass
class ModelSource:
    """A model to score: its role in the comparison, where it comes from, and how to load it."""

    name: str
    """candidate | base | champion"""
    location: str
    load: Callable[[], tuple[Any, Any]]
    """() -> (model, tokenizer)"""


def hf_loader(model_dir: Path, objective: str, tokenizer_dir: Path | None = None) -> Callable[[], tuple[Any, Any]]:
    def load() -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

        auto = AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM
        return auto.from_pretrained(str(model_dir)), AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir))

    return load


def finetune_sources(spec: EvaluateSpec, finetune: StageOutput[FinetuneResult]) -> list[ModelSource]:
    result = finetune.result
    # The merged model when there is one; prefix tuning leaves only the adapter (on the base model).
    folder = result.model_artifact()
    if not folder:
        raise StageError(
            STAGE, f"the finetune stage's result in {finetune.directory} names no model_dir or adapter_dir"
        )
    location = finetune.directory / folder
    if not location.is_dir():
        raise StageError(
            STAGE, f"the finetune stage's model folder {location} does not exist; rerun the finetune stage",
        )

    def load_candidate() -> tuple[Any, Any]:
        from kubeforge.engine.model import load_for_inference

        return load_for_inference(finetune.directory, result, device="cpu")

    sources = [ModelSource("candidate", str(location), load_candidate)]
    if spec.compare_base:
        base = result.base_model_dir
        if not base or not Path(base).is_dir():
            raise StageError(
                STAGE,
                f"the finetune stage's base model folder {base!r} does not exist; restore it, or set "
                "spec.evaluate.compare_base: false",
            )
        sources.append(ModelSource("base", str(base), hf_loader(Path(base), "causal")))
    return sources


def rl_sources(spec: EvaluateSpec, rl: StageOutput[RlResult]) -> list[ModelSource]:
    """The aligned policy, and the policy it started from as its base (the fine-tuned model)."""
    location = rl.directory / rl.result.model_dir
    if not (location / "config.json").is_file():
        raise StageError(STAGE, f"the rl stage's model folder {location} holds no model; rerun the rl stage")
    sources = [ModelSource("candidate", str(location), hf_loader(location, "causal"))]
    if spec.compare_base:
        base = Path(rl.result.base_model_dir)
        if not (base / "config.json").is_file():
            raise StageError(
                STAGE, f"the rl stage's starting policy {base} does not exist; restore it, or set "
                "spec.evaluate.compare_base: false",
            )
        sources.append(ModelSource("base", str(base), hf_loader(base, "causal")))
    return sources


def find_model_folder(root: Path) -> tuple[Path, Path] | None:
    """(model folder, tokenizer folder) of a downloaded Hugging Face model, the shallowest ones."""

    def depth(p: Path) -> int:
        return len(p.relative_to(root).parts)

    weights = ("*.safetensors", "pytorch_model*.bin")
    models = sorted(
        (c.parent for c in root.rglob("config.json") if any(any(c.parent.glob(w)) for w in weights)), key=depth
    )
    if not models:
        return None
    model_dir = models[0]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (model_dir / name).is_file():
            return model_dir, model_dir
    tokenizers = sorted({c.parent for n in ("tokenizer.json", "tokenizer_config.json") for c in root.rglob(n)},
                        key=depth)
    return (model_dir, tokenizers[0]) if tokenizers else None


def champion_source(
    spec: EvaluateSpec, ctx: StageContext, objective: str
) -> tuple[ModelSource, str, str] | None:
    """The registered champion, downloaded into the stage folder, with the version behind the alias
    and the version scored; None when there is no champion yet."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    name = spec.champion or ctx.pipeline_name
    try:
        version = ctx.tracker.client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        # MLflow answers RESOURCE_DOES_NOT_EXIST for a missing model, INVALID_PARAMETER_VALUE for a missing alias.
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            ctx.reporter.log(f"{STAGE}: no champion to compare with (registered model '{name}': {exc.message})")
            return None
        raise StageError(STAGE, f"could not read registered model '{name}' from MLflow: {exc.message}") from exc
    alias_version = str(version.version)
    parent = version.tags.get("kubeforge.parent_version")
    if version.tags.get("kubeforge.role") == QUANTIZE.model_role and parent:
        # The candidate scored here is unquantized (the quantize stage gates its own loss), so the
        # like-for-like comparison is with the model the champion was quantized from.
        ctx.reporter.log(f"{STAGE}: champion '{name}' version {version.version} is quantized; scoring the "
                         f"version it was quantized from ({parent})")
        version = ctx.tracker.client.get_model_version(name, parent)
    target = ctx.out_dir / "champion" / f"v{version.version}"
    if target.exists():
        shutil.rmtree(target)  # left by an interrupted attempt: download afresh
    target.mkdir(parents=True)
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=version.source, dst_path=str(target), tracking_uri=ctx.tracker.tracking_uri
            )
        )
    except (MlflowException, OSError) as exc:
        raise StageError(
            STAGE, f"could not download champion '{name}' version {version.version} from {version.source}: {exc}"
        ) from exc
    found = find_model_folder(local if local.is_dir() else target)
    if found is None:
        raise StageError(
            STAGE,
            f"champion '{name}' version {version.version} ({version.source}) holds no Hugging Face model folder "
            "(config.json, weights and a tokenizer); register a model folder, or set spec.evaluate.champion",
        )
    model_dir, tokenizer_dir = found
    ctx.reporter.log(f"{STAGE}: champion is '{name}' version {version.version} ({version.source})")
    loader = hf_loader(model_dir, objective, tokenizer_dir)
    source = ModelSource("champion", f"models:/{name}/{version.version}", loader)
    return source, alias_version, str(version.version)
