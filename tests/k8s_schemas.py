"""Validating Kubernetes objects offline: built-in kinds against the Kubernetes OpenAPI schemas that
`kubernetes-validate` ships, custom resources against the OpenAPI v3 schema of their CRD file.

No API server runs on these machines, so this is what stands in for `kubectl apply --dry-run=server`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.37.0"


class SchemaValidationError(ValueError):
    """An object does not match its schema; the message names the object and the failing path."""


def openapi_to_jsonschema(schema: Mapping[str, Any], strict: bool = True) -> dict[str, Any]:
    """A CRD's OpenAPI v3 schema as a JSON Schema (draft 2020-12) that `jsonschema` checks.

    * `nullable: true` becomes "null is allowed too" (JSON Schema has no `nullable`);
    * `x-kubernetes-int-or-string` becomes integer-or-string; other `x-kubernetes-*` keys go;
    * OpenAPI 3.0's boolean `exclusiveMinimum`/`exclusiveMaximum` become 2020-12's numeric form;
    * with `strict`, an object with `properties` and neither `additionalProperties` nor
      `x-kubernetes-preserve-unknown-fields` rejects unknown fields. The API server would prune
      them silently, dropping a misspelled setting; strict field validation rejects them, and so
      does this.
    """
    return _convert(schema, strict, root=True)


def _convert(node: Any, strict: bool, root: bool = False) -> Any:
    if isinstance(node, list):
        return [_convert(item, strict) for item in node]
    if not isinstance(node, Mapping):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: _convert(sub, strict) for name, sub in value.items()}
            if root and "metadata" in out[key]:
                # The API server checks metadata as ObjectMeta and the CRD schema may only narrow
                # name/generateName; labels, namespace and the rest stay allowed.
                out[key]["metadata"] = {**out[key]["metadata"], "additionalProperties": True}
        elif key in ("items", "additionalProperties", "not") or key in ("allOf", "anyOf", "oneOf"):
            out[key] = _convert(value, strict) if not isinstance(value, bool) else value
        else:
            out[key] = value
    for bound in ("Minimum", "Maximum"):
        # OpenAPI 3.0 marks a bound exclusive with a boolean; JSON Schema 2020-12 names the number.
        flag = out.pop(f"exclusive{bound}", None)
        if flag is True and bound.lower() in out:
            out[f"exclusive{bound}"] = out.pop(bound.lower())
        elif flag not in (None, False, True):
            out[f"exclusive{bound}"] = flag
    if root:
        # apiVersion, kind and metadata belong to every object, whether the CRD lists them or not.
        properties = out.setdefault("properties", {})
        properties.setdefault("apiVersion", {"type": "string"})
        properties.setdefault("kind", {"type": "string"})
        properties.setdefault("metadata", {"type": "object"})
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [*out.get("anyOf", []), {"type": "integer"}, {"type": "string"}]
    if node.get("nullable"):
        if "type" in out:
            types = out["type"] if isinstance(out["type"], list) else [out["type"]]
            out["type"] = [*types, "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    if (
        strict
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def load_crds(crd_path: str | Path) -> list[dict[str, Any]]:
    """Every CustomResourceDefinition in a YAML file (one or several documents)."""
    documents = yaml.safe_load_all(Path(crd_path).read_text(encoding="utf-8"))
    return [doc for doc in documents if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition"]


def crd_schema_for(obj: Mapping[str, Any], crd_path: str | Path) -> dict[str, Any]:
    """The served version's openAPIV3Schema for `obj`'s apiVersion and kind, from `crd_path`."""
    group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
    kind = obj.get("kind")
    for crd in load_crds(crd_path):
        spec = crd["spec"]
        if spec["group"] != group or spec["names"]["kind"] != kind:
            continue
        for served in spec["versions"]:
            if served["name"] == version and served.get("served", False):
                return served["schema"]["openAPIV3Schema"]
        raise SchemaValidationError(f"{crd_path}: {kind} has no served version {version!r}")
    raise SchemaValidationError(f"{crd_path}: no CRD defines {obj.get('apiVersion')} {kind}")


def validate_against_crd(obj: Mapping[str, Any], crd_path: str | Path, strict: bool = True) -> None:
    """Raises `SchemaValidationError` naming the first failing path (best match) in `obj`."""
    schema = openapi_to_jsonschema(crd_schema_for(obj, crd_path), strict=strict)
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if error is not None:
        raise SchemaValidationError(
            f"{_describe(obj)}: {_path(error.absolute_path)}: {error.message} (schema: {crd_path})"
        )


def validate_builtin(obj: Mapping[str, Any]) -> None:
    """Strict validation of a built-in kind against Kubernetes 1.37's OpenAPI schema.

    Strict means unknown fields fail, as with `kubectl apply --validate=strict`. Raises
    `SchemaValidationError` naming the failing path; kinds it has no schema for raise too, since
    passing them would hide a typo in apiVersion or kind.
    """
    try:
        kubernetes_validate.validate(dict(obj), KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise SchemaValidationError(
            f"{_describe(obj)}: {_path(exc.path)}: {exc.message} (Kubernetes {exc.version})"
        ) from None
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise SchemaValidationError(f"{_describe(obj)}: {exc.message}") from None


def _describe(obj: Mapping[str, Any]) -> str:
    metadata = obj.get("metadata") or {}
    where = f"{metadata['namespace']}/" if metadata.get("namespace") else ""
    return f"{obj.get('apiVersion')} {obj.get('kind')} {where}{metadata.get('name')}"


def _path(parts: Any) -> str:
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts)
    return path.lstrip(".") or "<root>"
