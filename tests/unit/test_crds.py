"""The generated CRDs: in sync with kubeforge.spec, structural, valid Kubernetes objects, and accepting
exactly what the example manifests say."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from kubeforge.spec.crd import (
    KINDS,
    REGENERATE,
    all_crds,
    crd,
    main,
    rendered,
)
from kubeforge.spec.deployment import ModelDeployment
from kubeforge.spec.pipeline import pipeline_model
from kubeforge.spec.structural import CRDGenerationError, structural_schema

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "charts" / "kubeforge" / "crds"
EXAMPLES = REPO / "examples"
MODELS: dict[str, type[BaseModel]] = {"ModelPipeline": pipeline_model(), "ModelDeployment": ModelDeployment}
JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
PRESERVE = "x-kubernetes-preserve-unknown-fields"
INT_OR_STRING = "x-kubernetes-int-or-string"


@functools.cache
def root_schema(kind: str) -> dict[str, Any]:
    return crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def examples() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") in KINDS:
                found.append((path.name, doc))
    return found


# --- a structural-schema checker, after the Kubernetes rules --------------------------------------

def structural_problems(node: Any, path: str = "", in_junctor: bool = False) -> list[str]:
    """What makes `node` non-structural, one line per problem (empty when it is structural)."""
    if not isinstance(node, dict):
        return [f"{path}: schema node is {type(node).__name__}, not an object"]
    problems = [f"{path}: has {key}" for key in ("$ref", "$defs", "definitions") if key in node]
    if node.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties: false")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: both properties and additionalProperties")
    if in_junctor:
        # Inside a logical junctor only value validations are allowed: no shape of its own.
        for key in ("type", "properties", "additionalProperties", "items", "description", "default", "nullable"):
            if key in node and not (key == "type" and node.get("type") in ("integer", "string")
                                    and set(node) == {"type"}):
                problems.append(f"{path}: {key} inside a junctor")
    elif "type" not in node and not node.get(INT_OR_STRING) and not node.get(PRESERVE):
        problems.append(f"{path}: no type")
    if node.get("default", 0) is None and not node.get("nullable"):
        problems.append(f"{path}: default null without nullable")
    for name, sub in node.get("properties", {}).items():
        problems += structural_problems(sub, f"{path}.{name}", in_junctor)
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{path}.*", in_junctor)
    if "items" in node:
        problems += structural_problems(node["items"], f"{path}[]", in_junctor)
    for junctor in JUNCTORS:
        branches = [node[junctor]] if junctor == "not" and "not" in node else node.get(junctor, [])
        for i, branch in enumerate(branches):
            problems += structural_problems(branch, f"{path}.{junctor}[{i}]", True)
    if node.get("x-kubernetes-list-type") == "map":
        required = set(node.get("items", {}).get("required", ()))
        missing = set(node.get("x-kubernetes-list-map-keys", ())) - required
        problems += [f"{path}: list-map key {key} is not required" for key in sorted(missing)]
    return problems


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}}, ".a: has $ref"),
        ({"type": "object", "properties": {"a": {"description": "untyped"}}}, ".a: no type"),
        ({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False},
         ": additionalProperties: false"),
        ({"type": "object", "anyOf": [{"type": "object", "properties": {"a": {"type": "string"}}}]},
         ".anyOf[0]: type inside a junctor"),
        ({"type": "array", "items": {"type": "string", "default": None}}, "[]: default null without nullable"),
    ],
)
def test_the_structural_checker_finds_what_kubernetes_rejects(schema: dict[str, Any], problem: str) -> None:
    assert problem in structural_problems(schema)


@pytest.mark.parametrize("kind", KINDS)
def test_the_crd_schema_is_structural(kind: str) -> None:
    assert structural_problems(root_schema(kind), kind) == []


@pytest.mark.parametrize("kind", KINDS)
def test_metadata_restricts_only_the_name(kind: str) -> None:
    metadata = root_schema(kind)["properties"]["metadata"]
    assert metadata["type"] == "object"
    assert set(metadata.get("properties", {})) <= {"name", "generateName"}


# --- the CRDs as Kubernetes objects ---------------------------------------------------------------

def test_checked_in_crds_match_the_models() -> None:
    for name, text in rendered().items():
        path = CRD_DIR / name
        assert path.is_file(), f"{path} is missing; regenerate with {REGENERATE}"
        assert path.read_text() == text, f"{path} is stale; regenerate with {REGENERATE}"
    # The YAML says exactly what the objects say (quoting of "True", block scalars...).
    assert [yaml.safe_load(text) for text in rendered().values()] == all_crds()


@pytest.mark.parametrize("path", [CRD_DIR / name for name in sorted(rendered())], ids=lambda p: p.name)
def test_crd_files_are_valid_kubernetes_objects(path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    assert kubernetes_validate.validate(obj, "1.37.0", strict=True) == "1.37"


def test_strict_kubernetes_validation_catches_a_misspelt_field() -> None:
    obj = copy.deepcopy(crd("ModelPipeline"))
    obj["spec"]["versions"][0]["subresource"] = {"status": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, "1.37.0", strict=True)


def test_names_short_names_and_printer_columns() -> None:
    by_kind = {obj["spec"]["names"]["kind"]: obj for obj in all_crds()}
    assert by_kind["ModelPipeline"]["metadata"]["name"] == "modelpipelines.kubeforge.io"
    assert by_kind["ModelPipeline"]["spec"]["names"]["shortNames"] == ["mp"]
    assert by_kind["ModelDeployment"]["spec"]["names"]["shortNames"] == ["md"]
    columns = {k: [(c["name"], c["jsonPath"], c["type"]) for c in o["spec"]["versions"][0]["additionalPrinterColumns"]]
               for k, o in by_kind.items()}
    assert columns["ModelPipeline"] == [
        ("Phase", ".status.phase", "string"),
        ("Stage", ".status.currentStage", "string"),
        ("Version", ".status.modelVersion", "string"),
        ("Age", ".metadata.creationTimestamp", "date"),
    ]
    assert columns["ModelDeployment"] == [
        ("Phase", ".status.phase", "string"),
        ("Model", ".spec.model", "string"),
        ("Version", ".status.servedVersion", "string"),
        ("Candidate-Weight", ".status.weight", "integer"),
        ("Age", ".metadata.creationTimestamp", "date"),
    ]
    for obj in by_kind.values():
        version = obj["spec"]["versions"][0]
        assert (version["served"], version["storage"], version["subresources"]) == (True, True, {"status": {}})
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
        # Each printer column must point at a field the schema defines.
        for column in version["additionalPrinterColumns"]:
            section, _, leaf = column["jsonPath"].lstrip(".").partition(".")
            if section == "status":
                assert leaf in status["properties"], column


def test_check_mode_names_the_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path), "--check"]) == 1
    assert "modelpipelines.kubeforge.io.yaml: differs" in capsys.readouterr().err
    assert main(["--out", str(tmp_path)]) == 0
    assert main(["--out", str(tmp_path), "--check"]) == 0
    stale = tmp_path / "modeldeployments.kubeforge.io.yaml"
    stale.write_text(stale.read_text() + "# edited\n")
    assert main(["--out", str(tmp_path), "--check"]) == 1
    err = capsys.readouterr().err
    assert "modeldeployments.kubeforge.io.yaml: differs" in err and "modelpipelines" not in err


# --- what the schema accepts ----------------------------------------------------------------------

def to_json_schema(node: dict[str, Any], closed: bool = True) -> dict[str, Any]:
    """OpenAPI v3 (as Kubernetes reads it) to JSON Schema. With `closed`, objects reject fields the schema
    does not name: the API server would prune them silently, which a manifest must never rely on."""
    out = {k: v for k, v in node.items()
           if not k.startswith("x-kubernetes-") and k not in ("nullable", "exclusiveMinimum", "exclusiveMaximum")}
    if node.get(INT_OR_STRING):
        out["type"] = ["integer", "string"]
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(exclusive):
            out[exclusive] = out.pop(bound)
    if "properties" in node:
        out["properties"] = {k: to_json_schema(v, closed) for k, v in node["properties"].items()}
        if closed and not node.get(PRESERVE):
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(node["additionalProperties"], closed)
    if "items" in node:
        out["items"] = to_json_schema(node["items"], closed)
    if node.get("nullable"):
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


@functools.cache
def validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = to_json_schema(root_schema(kind))
    schema["properties"]["metadata"] = to_json_schema(root_schema(kind)["properties"]["metadata"], closed=False)
    return jsonschema.Draft202012Validator(schema)


def error_paths(kind: str, doc: dict[str, Any]) -> list[str]:
    return [".".join(str(p) for p in e.absolute_path) for e in validator(kind).iter_errors(doc)]


def test_to_json_schema_keeps_nullable_and_exclusive_bounds() -> None:
    schema = to_json_schema({"type": "integer", "minimum": 0, "exclusiveMinimum": True, "nullable": True})
    check = jsonschema.Draft202012Validator(schema)
    assert check.is_valid(None) and check.is_valid(1)
    assert not check.is_valid(0)


def test_there_are_examples_of_both_kinds() -> None:
    assert {doc["kind"] for _, doc in examples()} == set(KINDS)


@pytest.mark.parametrize(("name", "doc"), examples(), ids=[name for name, _ in examples()])
def test_examples_validate_against_the_crd(name: str, doc: dict[str, Any]) -> None:
    assert error_paths(doc["kind"], doc) == []


def _example(kind: str) -> dict[str, Any]:
    return copy.deepcopy(next(doc for _, doc in examples() if doc["kind"] == kind))


def _set(doc: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    *parents, leaf = dotted.split(".")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return doc


@pytest.mark.parametrize(
    ("kind", "dotted", "value", "where"),
    [
        ("ModelPipeline", "spec.pretrain.train.lr", "fast", "spec.pretrain.train.lr"),
        ("ModelPipeline", "spec.data.packing.seq_len", 4, "spec.data.packing.seq_len"),
        ("ModelPipeline", "spec.quantize.scheme", "int3", "spec.quantize.scheme"),
        ("ModelPipeline", "spec.data.sources", [], "spec.data.sources"),
        ("ModelPipeline", "spec.data.sources", [{"type": "hdfs"}], "spec.data.sources.0.type"),
        ("ModelDeployment", "spec.rollout.strategy", "bluegreen", "spec.rollout.strategy"),
        ("ModelDeployment", "spec.replicas", 0, "spec.replicas"),
        ("ModelDeployment", "spec.model", "quickstart", "spec.model"),
        ("ModelDeployment", "spec.rollout.steps", [{"weight": 101}], "spec.rollout.steps.0.weight"),
    ],
)
def test_bad_manifests_are_rejected_at_their_path(kind: str, dotted: str, value: Any, where: str) -> None:
    paths = error_paths(kind, _set(_example(kind), dotted, value))
    assert where in paths, paths


def test_an_unknown_field_would_be_pruned() -> None:
    doc = _set(_example("ModelPipeline"), "spec.data.tokenizer.vocabulary", 100)
    assert error_paths("ModelPipeline", doc) == ["spec.data.tokenizer"]


def test_union_branches_accept_their_own_fields() -> None:
    ab = {"strategy": "ab", "candidate": "models:/quickstart@challenger", "weight": 20,
          "prometheus": "http://prometheus:9090", "metric": "ttft"}
    assert error_paths("ModelDeployment", _set(_example("ModelDeployment"), "spec.rollout", ab)) == []
    files = [{"type": "files", "paths": ["corpus/*.txt"], "format": "txt"}]
    assert error_paths("ModelPipeline", _set(_example("ModelPipeline"), "spec.data.sources", files)) == []


# --- defaults the API server writes in ------------------------------------------------------------

def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """What the API server stores: missing fields get their schema's default, recursively."""
    if isinstance(value, dict):
        out = dict(value)
        for name, sub in schema.get("properties", {}).items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = apply_defaults(sub, out[name])
        if isinstance(schema.get("additionalProperties"), dict):
            out = {k: apply_defaults(schema["additionalProperties"], v) for k, v in out.items()}
        return out
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], v) for v in value]
    return value


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _nodes(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from _nodes(node["items"], f"{path}[]")


@pytest.mark.parametrize("kind", KINDS)
def test_every_default_is_valid_where_it_sits(kind: str) -> None:
    defaults = [(path, node) for path, node in _nodes(root_schema(kind), kind) if "default" in node]
    assert defaults, "expected scalar defaults in the schema"
    for path, node in defaults:
        errors = list(jsonschema.Draft202012Validator(to_json_schema(node)).iter_errors(node["default"]))
        assert not errors, f"{path}: default {node['default']!r}: {errors[0].message}"


def _variants() -> list[tuple[str, dict[str, Any]]]:
    """The examples, plus the union branches they do not use, so defaults of every branch are exercised."""
    docs = examples()
    pipeline = _example("ModelPipeline")
    docs.append(("files-source", _set(pipeline, "spec.data.sources", [{"type": "files", "paths": ["a.txt"]}])))
    deployment = _example("ModelDeployment")
    ab = {"strategy": "ab", "candidate": "models:/quickstart@challenger", "prometheus": "http://p:9090"}
    docs.append(("ab-rollout", _set(deployment, "spec.rollout", ab)))
    return docs


@pytest.mark.parametrize(("name", "doc"), _variants(), ids=[name for name, _ in _variants()])
def test_server_side_defaults_do_not_change_the_manifest(name: str, doc: dict[str, Any]) -> None:
    model = MODELS[doc["kind"]]
    stored = apply_defaults(root_schema(doc["kind"]), doc)
    assert model.model_validate(stored).model_dump() == model.model_validate(doc).model_dump()


# --- what generation refuses ----------------------------------------------------------------------

class _Scalar(BaseModel):
    value: int | list[int]


class _A(BaseModel):
    kind: Literal["a"]
    size: int


class _B(BaseModel):
    kind: Literal["b"]
    size: str


class _Clash(BaseModel):
    item: _A | _B


class _Port(BaseModel):
    port: int | str = 8080


class _Tree(BaseModel):
    children: list[_Tree] = []


def test_a_recursive_model_fails_generation_naming_the_field() -> None:
    with pytest.raises(CRDGenerationError, match=r"^spec\.children\[\]: .* contains itself"):
        structural_schema(_Tree)


def test_an_unsupported_union_fails_generation_naming_the_field() -> None:
    with pytest.raises(CRDGenerationError, match=r"^spec\.value: the union integer \| array is not expressible"):
        structural_schema(_Scalar)


def test_union_branches_that_disagree_fail_generation_naming_the_field() -> None:
    with pytest.raises(CRDGenerationError, match=r"^spec\.item\.size: the union's branches \[kind: a\] and \[kind: b\]"):
        structural_schema(_Clash)


def test_a_listed_union_is_accepted_as_any_value() -> None:
    schema = structural_schema(_Scalar, any_value={"spec.value": "tested"})
    assert schema["properties"]["value"] == {PRESERVE: True}


def test_int_or_string() -> None:
    assert structural_schema(_Port)["properties"]["port"] == {INT_OR_STRING: True}
