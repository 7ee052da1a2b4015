"""Registered model URIs (`models:/name@alias`, `models:/name/3`) to local, servable model folders."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kubeforge.errors import KubeForgeError
from kubeforge.quantize.serving import require_servable
from kubeforge.registry.audit import RegistryError
from kubeforge.registry.client import Registry, VersionInfo
from kubeforge.spec.deployment import parse_model_uri

COMPLETE = ".kubeforge-complete"
"""Written last into a cache entry: a folder without it is a download that was interrupted."""


@dataclass(frozen=True)
class ResolvedModel:
    """A registered model version and the local folder vLLM loads it from."""

    model: str
    version: str
    path: Path
    uri: str
    """What the manifest named (`models:/quickstart@champion`), for messages."""


def find_model_folder(root: Path) -> Path | None:
    """The shallowest folder under `root` holding config.json, weights and a tokenizer (what vLLM loads)."""
    candidates = sorted((c.parent for c in root.rglob("config.json")), key=lambda p: len(p.relative_to(root).parts))
    for folder in candidates:
        has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
        has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
        if has_weights and has_tokenizer:
            return folder
    return None


def resolve_model(uri: str, registry: Registry, cache_dir: Path, engine: str, device: str,
                  dtype: str = "auto") -> ResolvedModel:
    """Look `uri` up in the registry, download its artifact into `cache_dir/<name>/<version>` (once: a
    complete cache entry is reused, since a registered version's files never change) and check that
    `engine` on `device` can serve it with `dtype`."""
    info = _version(uri, registry)
    entry = _download(uri, info.source, cache_dir / info.model / info.version, registry)
    folder = find_model_folder(entry)
    if folder is None:
        raise KubeForgeError(
            f"{uri}: version {info.version} ({info.source}) holds no model folder with config.json, weights and a "
            "tokenizer side by side; register such a folder"
        )
    require_servable(folder, engine, device, dtype)
    return ResolvedModel(info.model, info.version, folder, uri)


@dataclass(frozen=True)
class ResolvedAdapter:
    """A registered version's LoRA adapter, the local folder holding it, and the version it adapts."""

    model: str
    version: str
    path: Path
    base_version: str
    uri: str


def resolve_adapter(uri: str, registry: Registry, cache_dir: Path, max_rank: int) -> ResolvedAdapter:
    """The LoRA adapter that the fine-tuning behind `uri` registered with its version (the run artifact named
    by its `kubeforge.lora_adapter` tag), downloaded into `cache_dir/<name>/<version>-lora` and checked
    against `max_rank`."""
    info = _version(uri, registry)
    if info.lora_adapter is None or info.run_id is None:
        raise KubeForgeError(
            f"{uri}: version {info.version} carries no LoRA adapter (only fine-tuning with method lora or qlora "
            "registers one, as tag kubeforge.lora_adapter); serve it without spec.lora"
        )
    if info.parent_version is None:
        raise KubeForgeError(
            f"{uri}: version {info.version} names no base version (tag kubeforge.parent_version): its base model "
            "was never registered, so there is nothing to serve the adapter over; serve it without spec.lora"
        )
    entry = _download(uri, f"runs:/{info.run_id}/{info.lora_adapter}",
                      cache_dir / info.model / f"{info.version}-lora", registry)
    configs = sorted(entry.rglob("adapter_config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise KubeForgeError(f"{uri}: version {info.version}'s {info.lora_adapter}/ holds no adapter_config.json")
    config = json.loads(configs[0].read_text())
    if config.get("peft_type") != "LORA":
        raise KubeForgeError(f"{uri}: version {info.version}'s adapter is {config.get('peft_type')}, not LORA; "
                             "vLLM serves LoRA adapters only")
    rank = max([int(config.get("r", 0)), *(int(r) for r in (config.get("rank_pattern") or {}).values())])
    if rank > max_rank:
        raise KubeForgeError(f"spec.lora.max_rank: {uri} (version {info.version}) has rank {rank}, above max_rank "
                             f"{max_rank}; raise max_rank to at least {rank}")
    return ResolvedAdapter(info.model, info.version, configs[0].parent, info.parent_version, uri)


def _version(uri: str, registry: Registry) -> VersionInfo:
    from mlflow.exceptions import MlflowException

    name, selector = parse_model_uri(uri)
    try:
        return registry.version(name, selector)
    except (RegistryError, MlflowException) as exc:
        raise KubeForgeError(f"{uri}: {exc}") from exc


def _download(uri: str, artifact_uri: str, entry: Path, registry: Registry) -> Path:
    """`artifact_uri` downloaded into the cache entry `entry` once; the entry afterwards."""
    import mlflow
    from mlflow.exceptions import MlflowException

    entry.parent.mkdir(parents=True, exist_ok=True)
    # Replicas on one node share the cache: one downloads while the others wait, then all reuse it.
    with open(entry.parent / f".{entry.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (entry / COMPLETE).is_file():
            if entry.exists():
                shutil.rmtree(entry)  # an interrupted download: start again
            entry.mkdir()
            try:
                mlflow.artifacts.download_artifacts(
                    artifact_uri=artifact_uri, dst_path=str(entry), tracking_uri=registry.tracking_uri
                )
            except (MlflowException, OSError) as exc:
                raise KubeForgeError(f"{uri}: could not download {artifact_uri}: {exc}") from exc
            (entry / COMPLETE).write_text(artifact_uri + "\n")
    return entry


MODEL_CACHE_ENV = "KUBEFORGE_MODEL_CACHE"
DEFAULT_REPLICA_CACHE = Path("/tmp/kubeforge-models")


def replica_model_folder(source: str, engine: str, device: str, dtype: str = "auto") -> Path:
    """The folder a variant replica loads: `source` itself when it is a local folder (`kubeforge serve`
    resolves models before the application starts), or a `models:/name/version` URI that the replica
    downloads itself from $MLFLOW_TRACKING_URI (a RayService on Kubernetes, whose pods share no disk
    with the operator) into $KUBEFORGE_MODEL_CACHE."""
    if not source.startswith("models:/"):
        return Path(source)
    return resolve_model(source, *_replica_registry(source), engine, device, dtype).path


def replica_adapter_folder(source: str, max_rank: int) -> Path:
    """`replica_model_folder` for a LoRA adapter (`resolve_adapter`)."""
    if not source.startswith("models:/"):
        return Path(source)
    return resolve_adapter(source, *_replica_registry(source), max_rank).path


def _replica_registry(source: str) -> tuple[Registry, Path]:
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise KubeForgeError(f"{source}: MLFLOW_TRACKING_URI is not set in the replica; the operator sets it from "
                             "its KUBEFORGE_OPERATOR_MLFLOW_TRACKING_URI")
    return Registry(tracking_uri), Path(os.environ.get(MODEL_CACHE_ENV, str(DEFAULT_REPLICA_CACHE)))
