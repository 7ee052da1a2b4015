"""Registered model URIs (`models:/name@alias`, `models:/name/3`) to local, servable model folders."""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kubeforge.errors import KubeForgeError
from kubeforge.quantize.serving import require_servable
from kubeforge.registry.audit import RegistryError
from kubeforge.registry.client import Registry
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


def resolve_model(uri: str, registry: Registry, cache_dir: Path, engine: str, device: str) -> ResolvedModel:
    """Look `uri` up in the registry, download its artifact into `cache_dir/<name>/<version>` (once: a
    complete cache entry is reused, since a registered version's files never change) and check that
    `engine` on `device` can serve it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name, selector = parse_model_uri(uri)
    try:
        info = registry.version(name, selector)
    except (RegistryError, MlflowException) as exc:
        raise KubeForgeError(f"{uri}: {exc}") from exc
    entry = cache_dir / name / info.version
    entry.parent.mkdir(parents=True, exist_ok=True)
    # Replicas on one node share the cache: one downloads while the others wait, then all reuse it.
    with open(entry.parent / f".{info.version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (entry / COMPLETE).is_file():
            if entry.exists():
                shutil.rmtree(entry)  # an interrupted download: start again
            entry.mkdir()
            try:
                mlflow.artifacts.download_artifacts(
                    artifact_uri=info.source, dst_path=str(entry), tracking_uri=registry.tracking_uri
                )
            except (MlflowException, OSError) as exc:
                raise KubeForgeError(
                    f"{uri}: could not download version {info.version} from {info.source}: {exc}"
                ) from exc
            (entry / COMPLETE).write_text(info.source + "\n")
    folder = find_model_folder(entry)
    if folder is None:
        raise KubeForgeError(
            f"{uri}: version {info.version} ({info.source}) holds no model folder with config.json, weights and a "
            "tokenizer side by side; register such a folder"
        )
    require_servable(folder, engine, device)
    return ResolvedModel(name, info.version, folder, uri)


MODEL_CACHE_ENV = "KUBEFORGE_MODEL_CACHE"
DEFAULT_REPLICA_CACHE = Path("/tmp/kubeforge-models")


def replica_model_folder(source: str, engine: str, device: str) -> Path:
    """The folder a variant replica loads: `source` itself when it is a local folder (`kubeforge serve`
    resolves models before the application starts), or a `models:/name/version` URI that the replica
    downloads itself from $MLFLOW_TRACKING_URI (a RayService on Kubernetes, whose pods share no disk
    with the operator) into $KUBEFORGE_MODEL_CACHE."""
    if not source.startswith("models:/"):
        return Path(source)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise KubeForgeError(f"{source}: MLFLOW_TRACKING_URI is not set in the replica; the operator sets it from "
                             "its KUBEFORGE_OPERATOR_MLFLOW_TRACKING_URI")
    cache = Path(os.environ.get(MODEL_CACHE_ENV, str(DEFAULT_REPLICA_CACHE)))
    return resolve_model(source, Registry(tracking_uri), cache, engine, device).path
