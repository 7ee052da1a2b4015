"""Kubernetes structural schemas from pydantic models: what a CRD's `openAPIV3Schema` may say.

The API server accepts only structural schemas: every node typed, no `$ref`, no
`additionalProperties: false`, no types inside `anyOf`/`oneOf`. `structural_schema` turns a model's
JSON schema into one, inlining references and merging unions, and raises `CRDGenerationError` naming
the field for anything that cannot be said that way (unless the caller lists the field as any value).
`kubeforge.spec.crd` builds the CRDs with it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

Schema = dict[str, Any]

# JSON Schema keywords pydantic emits that carry no meaning for validation here.
_IGNORED = frozenset({"title"})
# Value constraints OpenAPI v3 (as Kubernetes reads it) shares with JSON Schema unchanged.
_COPIED = (
    "pattern", "minLength", "maxLength", "minItems", "maxItems",
    "minProperties", "maxProperties", "multipleOf", "minimum", "maximum",
)
_HANDLED = frozenset({
    "$ref", "type", "description", "default", "enum", "const", "exclusiveMinimum", "exclusiveMaximum",
    "items", "prefixItems", "uniqueItems", "properties", "required", "additionalProperties", "anyOf", "oneOf",
    "discriminator", "format", *_COPIED, *_IGNORED,
})
# Formats the API server knows; pydantic's others (`path`, `uri`...) are checked by pydantic alone.
_K8S_FORMATS = frozenset({"int32", "int64", "float", "double", "byte", "date", "date-time", "duration", "uuid"})
_SCALARS = frozenset({"string", "integer", "number", "boolean"})
PRESERVE_UNKNOWN = "x-kubernetes-preserve-unknown-fields"
_INT_OR_STRING = "x-kubernetes-int-or-string"


class CRDGenerationError(ValueError):
    """The models say something a structural CRD schema cannot; the message starts with the field's path."""


@dataclass(frozen=True)
class _Converter:
    """Turns one model's JSON schema into a structural OpenAPI v3 schema."""

    defs: Mapping[str, Schema]
    any_value: Mapping[str, str] = field(default_factory=dict)
    no_default: Mapping[str, str] = field(default_factory=dict)

    _expanding: set[str] = field(default_factory=set)

    def convert(self, node: Schema, path: str) -> Schema:
        ref = node.get("$ref")
        if ref is None:
            return self._convert(self._resolve(node, path), path)
        if ref in self._expanding:
            raise CRDGenerationError(f"{path}: {ref} contains itself; a CRD schema cannot be recursive")
        self._expanding.add(ref)
        try:
            return self._convert(self._resolve(node, path), path)
        finally:
            self._expanding.discard(ref)

    def _convert(self, node: Schema, path: str) -> Schema:
        if "anyOf" in node or "oneOf" in node:
            return self._union(node, path)
        unknown = sorted(set(node) - _HANDLED)
        if unknown:
            raise CRDGenerationError(f"{path}: JSON Schema keywords {unknown} have no CRD conversion")
        if "const" in node:
            node = {**{k: v for k, v in node.items() if k != "const"}, "enum": [node["const"]]}
        kind = node.get("type") or _enum_type(node, path)
        if kind is None:
            # `Any`: pydantic emits no constraint at all.
            return _described({PRESERVE_UNKNOWN: True}, node)
        if isinstance(kind, list):
            raise CRDGenerationError(f"{path}: a value of several types {kind} cannot be described structurally")
        out: Schema = {"type": kind}
        if kind == "object":
            self._object(node, path, out)
        elif kind == "array":
            self._array(node, path, out)
        elif kind not in _SCALARS:
            raise CRDGenerationError(f"{path}: type {kind!r} has no CRD equivalent")
        self._constraints(node, path, out)
        self._default(node, path, out)
        return _described(out, node)

    def _resolve(self, node: Schema, path: str) -> Schema:
        """Inline `$ref`; the referring node's keys (a field's description and default) win over the model's."""
        while "$ref" in node:
            ref = node["$ref"]
            name = ref.rpartition("/")[2]
            if not ref.startswith("#/$defs/") or name not in self.defs:
                raise CRDGenerationError(f"{path}: unresolvable reference {ref}")
            node = {**self.defs[name], **{k: v for k, v in node.items() if k != "$ref"}}
        return node

    def _object(self, node: Schema, path: str, out: Schema) -> None:
        properties = node.get("properties")
        extra = node.get("additionalProperties")
        if properties:
            out["properties"] = {name: self.convert(sub, f"{path}.{name}") for name, sub in properties.items()}
            required = sorted(node.get("required", ()))
            if required:
                out["required"] = required
            # `additionalProperties: false` is pydantic's extra="forbid", which Kubernetes does by pruning.
            if extra not in (None, False):
                raise CRDGenerationError(f"{path}: an object cannot have both fixed properties and free keys")
        elif isinstance(extra, dict) and extra:
            out["additionalProperties"] = self.convert(extra, f"{path}.*")
        else:
            out[PRESERVE_UNKNOWN] = True

    def _array(self, node: Schema, path: str, out: Schema) -> None:
        if "prefixItems" in node:
            # A fixed-length tuple: Kubernetes has one item schema per array, so every position must agree.
            items = [self.convert(sub, f"{path}[{i}]") for i, sub in enumerate(node["prefixItems"])]
            if any(item != items[0] for item in items[1:]):
                raise CRDGenerationError(f"{path}: tuple positions of different types cannot share an item schema")
            out["items"] = items[0]
        else:
            out["items"] = self.convert(node.get("items") or {}, f"{path}[]")
        if node.get("uniqueItems"):
            if out["items"].get("type") not in _SCALARS:
                raise CRDGenerationError(f"{path}: unique items must be scalars (x-kubernetes-list-type: set)")
            out["x-kubernetes-list-type"] = "set"

    def _constraints(self, node: Schema, path: str, out: Schema) -> None:
        for key in _COPIED:
            if key in node:
                out[key] = node[key]
        # JSON Schema's numeric exclusive bounds are OpenAPI v3.0's boolean flag on minimum/maximum.
        for exclusive, bound, stricter in (
            ("exclusiveMinimum", "minimum", max),
            ("exclusiveMaximum", "maximum", min),
        ):
            if exclusive not in node:
                continue
            value = node[exclusive]
            if bound in node and stricter(node[bound], value) != value:
                continue  # the inclusive bound already excludes everything the exclusive one would
            out[bound] = value
            out[exclusive] = True
        if "enum" in node:
            out["enum"] = list(node["enum"])
        fmt = node.get("format")
        if fmt in _K8S_FORMATS:
            out["format"] = fmt

    def _default(self, node: Schema, path: str, out: Schema) -> None:
        """Scalar defaults (and lists of them) only: the API server writes defaults into what it stores,
        and whole sections written in would bury what the user actually set."""
        if "default" not in node or path in self.no_default:
            return
        value = node["default"]
        if value is None or isinstance(value, dict):
            return
        if isinstance(value, list) and not all(isinstance(v, str | int | float | bool) for v in value):
            return
        out["default"] = copy.deepcopy(value)

    def _union(self, node: Schema, path: str) -> Schema:
        branches = [self._resolve(b, path) for b in _flatten(node)]
        nullable = any(b.get("type") == "null" for b in branches)
        branches = [b for b in branches if b.get("type") != "null"]
        outer = {k: v for k, v in node.items() if k not in ("anyOf", "oneOf", "discriminator")}
        if path in self.any_value:
            # Anything goes at this node; pydantic checks the value when the operator parses the object.
            return _described({PRESERVE_UNKNOWN: True}, outer)
        if not branches:
            raise CRDGenerationError(f"{path}: a field that can only be null has no CRD equivalent")
        if len(branches) == 1:
            out = self.convert({**branches[0], **outer}, path)
        elif all(_is_object(b) for b in branches):
            out = self._merge_objects(branches, _discriminator(node), path, outer)
        elif sorted(str(b.get("type")) for b in branches) == ["integer", "string"] and all(
            set(b) <= {"type", "title"} for b in branches
        ):
            out = _described({_INT_OR_STRING: True}, outer)
        else:
            kinds = " | ".join(str(b.get("type", "any")) for b in branches)
            raise CRDGenerationError(
                f"{path}: the union {kinds} is not expressible in a structural CRD schema; change the model, or "
                "list the field in kubeforge.spec.crd.ANY_VALUE_FIELDS with the reason it may hold any value"
            )
        if nullable:
            out["nullable"] = True
        return out

    def _merge_objects(self, branches: list[Schema], discriminator: str | None, path: str, outer: Schema) -> Schema:
        """One object with every branch's properties: the discriminator becomes an enum of all the tags.

        Kubernetes forbids properties inside anyOf/oneOf without the same specification outside,
        which leaves nothing to gain from keeping the branches: pydantic checks which combination is valid.
        """
        converted = [self.convert({k: v for k, v in b.items() if k != "default"}, path) for b in branches]
        if discriminator is None:
            # A plain union of tagged models: pydantic picks the branch, the tag still names it in docs.
            shared = set.intersection(*(set(b.get("properties", {})) for b in branches))
            tagged = sorted(n for n in shared if all(_tag(b, n) != "" for b in branches))
            discriminator = tagged[0] if tagged else None
        labels = [_label(discriminator, b) for b in branches]
        names: list[str] = []
        for branch in converted:
            names += [n for n in branch.get("properties", {}) if n not in names]
        properties: Schema = {}
        for name in names:
            present = [(label, b["properties"][name]) for label, b in zip(labels, converted, strict=True)
                       if name in b.get("properties", {})]
            if name == discriminator:
                values = [v for _, sub in present for v in sub.get("enum", ())]
                properties[name] = {**_strip(present[0][1]), "enum": values}
                continue
            shape = _strip(present[0][1])
            for label, sub in present[1:]:
                if _strip(sub) != shape:
                    raise CRDGenerationError(
                        f"{path}.{name}: the union's branches [{present[0][0]}] and [{label}] define it differently; "
                        "give it one schema or rename it in one branch"
                    )
            merged = dict(shape)
            descriptions = {sub.get("description") for _, sub in present} - {None}
            defaults = [sub.get("default") for _, sub in present]
            if len(present) == len(converted) and len(descriptions) <= 1:
                if descriptions:
                    merged["description"] = descriptions.pop()
            else:
                merged["description"] = " ".join(
                    f"[{label}] {sub.get('description', '')}".rstrip() for label, sub in present
                )
            # A default from one branch would be written into objects of the others, which forbid the field.
            if len(present) == len(converted) and defaults[0] is not None and all(d == defaults[0] for d in defaults):
                merged["default"] = defaults[0]
            properties[name] = merged
        out: Schema = {"type": "object", "properties": properties}
        required = sorted(set.intersection(*(set(b.get("required", ())) for b in converted)))
        if required:
            out["required"] = required
        lines = [outer["description"]] if outer.get("description") else []
        lines += [f"[{label}] {b['description']}" for label, b in zip(labels, branches, strict=True)
                  if b.get("description")]
        if lines:
            out["description"] = "\n".join(lines)
        return out


def _flatten(node: Schema) -> list[Schema]:
    """The branches of nested unions (`Annotated[A | B, discriminator] | None` nests one in another)."""
    branches: list[Schema] = []
    for branch in node.get("anyOf", []) + node.get("oneOf", []):
        if ("anyOf" in branch or "oneOf" in branch) and set(branch) <= {"anyOf", "oneOf", "discriminator"}:
            branches += _flatten(branch)
        else:
            branches.append(branch)
    return branches


def _discriminator(node: Schema) -> str | None:
    """pydantic's discriminator, which sits on the inner union when the field is also optional."""
    found = node.get("discriminator", {}).get("propertyName")
    for branch in node.get("anyOf", []) + node.get("oneOf", []):
        found = found or _discriminator(branch)
    return found


def _is_object(node: Schema) -> bool:
    return node.get("type") == "object" and "properties" in node


def _tag(branch: Schema, discriminator: str | None) -> str:
    """The branch's value of the discriminator; empty when it has no single one."""
    if discriminator is None:
        return ""
    prop = branch.get("properties", {}).get(discriminator, {})
    values = [prop["const"]] if "const" in prop else prop.get("enum", [])
    return str(values[0]) if len(values) == 1 else ""


def _label(discriminator: str | None, branch: Schema) -> str:
    """How docs and errors name a union branch: `strategy: canary`, or the model's name without a tag."""
    tag = _tag(branch, discriminator)
    return f"{discriminator}: {tag}" if discriminator and tag else str(branch.get("title", "?"))


def _strip(node: Schema) -> Schema:
    """A property's shape, without what may legitimately differ between branches."""
    return {k: v for k, v in node.items() if k not in ("description", "default")}


def _enum_type(node: Schema, path: str) -> str | None:
    values = node.get("enum")
    if not values:
        return None
    kinds = {_json_type(v) for v in values}
    if len(kinds) != 1:
        raise CRDGenerationError(f"{path}: enum values of mixed types {sorted(kinds)} cannot share one type")
    return kinds.pop()


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    raise CRDGenerationError(f"enum value {value!r} is not a scalar")


def _described(out: Schema, node: Schema) -> Schema:
    description = node.get("description")
    if description:
        out["description"] = description
    return out


def structural_schema(
    model: type[BaseModel],
    path: str = "spec",
    any_value: Mapping[str, str] | None = None,
    no_default: Mapping[str, str] | None = None,
) -> Schema:
    """The structural OpenAPI v3 schema of `model`, whose fields sit at `path` in the object.

    Raises `CRDGenerationError`, starting with the field's path, for what a structural schema cannot say.
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})
    return _Converter(defs, any_value or {}, no_default or {}).convert(schema, path)
