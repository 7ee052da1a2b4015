"""The manifest: what is accepted, and the one-line errors for what is not."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeforge.errors import SpecError
from kubeforge.spec.load import load_any, load_manifest, parse_manifest
from kubeforge.spec.pipeline import json_schema

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

MINIMAL: dict[str, Any] = {
    "apiVersion": "kubeforge.io/v1alpha1",
    "kind": "ModelPipeline",
    "metadata": {"name": "demo"},
    "spec": {"data": {"sources": [{"type": "python-stdlib"}]}, "pretrain": {}},
}


def manifest(**changes: Any) -> dict[str, Any]:
    """MINIMAL with dotted-path changes applied, e.g. manifest(**{"spec.pretrain.train": {"lr": -1}})."""
    doc = copy.deepcopy(MINIMAL)
    for dotted, value in changes.items():
        node = doc
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return doc


def problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_manifest(doc)
    return [str(p) for p in info.value.problems]


def test_every_example_manifest_validates() -> None:
    found = sorted(EXAMPLES.glob("*.yaml"))
    assert found, "examples/ has no manifests"
    kinds = set()
    for path in found:
        document = load_any(path)
        assert document.metadata.name
        kinds.add(document.kind)
    assert kinds == {"ModelPipeline", "ModelDeployment"}


def test_defaults_fill_a_minimal_manifest() -> None:
    pipeline = parse_manifest(MINIMAL)
    assert pipeline.stage_names() == ["data", "pretrain"]
    assert pipeline.spec.pretrain is not None
    assert pipeline.spec.pretrain.objective == "causal"
    assert pipeline.spec.pretrain.mask_probability == 0.15
    assert pipeline.spec.data.fuzzy_dedup.enabled


def test_negative_learning_rate_names_field_constraint_and_value() -> None:
    assert problems(manifest(**{"spec.pretrain.train": {"lr": -0.1}})) == [
        "spec.pretrain.train.lr: must be > 0 (got -0.1)"
    ]


@pytest.mark.parametrize(
    ("section", "field", "value", "expected"),
    [
        ("spec.pretrain.train", "max_steps", 0, "spec.pretrain.train.max_steps: must be > 0 (got 0)"),
        ("spec.pretrain.train", "batch_size", -4, "spec.pretrain.train.batch_size: must be > 0 (got -4)"),
        (
            "spec.pretrain.train",
            "batch_size",
            "eight",
            "spec.pretrain.train.batch_size: must be an integer (got 'eight')",
        ),
        ("spec.pretrain.resources", "workers", 0, "spec.pretrain.resources.workers: must be > 0 (got 0)"),
        ("spec.data.fuzzy_dedup", "threshold", 1.5, "spec.data.fuzzy_dedup.threshold: must be <= 1 (got 1.5)"),
    ],
)
def test_bad_numbers_and_types(section: str, field: str, value: Any, expected: str) -> None:
    assert problems(manifest(**{section: {field: value}})) == [expected]


def test_misspelled_field_is_rejected_with_a_suggestion() -> None:
    lines = problems(manifest(**{"spec.pretrain.train": {"learning_rate": 0.1}}))
    assert lines == ["spec.pretrain.train.learning_rate: unknown field"]
    lines = problems(manifest(**{"spec.pretrain.train": {"max_step": 10}}))
    assert lines == ["spec.pretrain.train.max_step: unknown field (did you mean 'max_steps'?)"]


def test_every_problem_is_reported_once_per_line() -> None:
    doc = manifest(**{"spec.pretrain.train": {"lr": 0, "batch_size": 0}, "spec.data.packing": {"seq_lne": 64}})
    lines = problems(doc)
    assert sorted(lines) == sorted(
        [
            "spec.pretrain.train.lr: must be > 0 (got 0)",
            "spec.pretrain.train.batch_size: must be > 0 (got 0)",
            "spec.data.packing.seq_lne: unknown field (did you mean 'seq_len'?)",
        ]
    )


def test_unknown_source_type_and_path_inside_list() -> None:
    lines = problems(manifest(**{"spec.data.sources": [{"type": "python-stdlib"}, {"type": "s3"}]}))
    assert len(lines) == 1
    assert lines[0].startswith("spec.data.sources[1]: unknown type 's3'")
    lines = problems(manifest(**{"spec.data.sources": [{"type": "files", "paths": []}]}))
    assert lines == ["spec.data.sources[0].paths: must have at least 1 item(s) (got [])"]


def test_seq_len_above_max_positions_names_the_data_field() -> None:
    doc = manifest(**{"spec.data.packing": {"seq_len": 1024}, "spec.pretrain.model": {"max_position_embeddings": 512}})
    assert problems(doc) == [
        "spec.data.packing.seq_len: must be <= pretrain.model.max_position_embeddings (512) (got 1024)"
    ]


def test_cross_field_rules_of_pretraining() -> None:
    assert problems(manifest(**{"spec.pretrain.strategy": "fsdp"})) == [
        "spec.pretrain: strategy 'fsdp' needs resources.use_gpu: true (use 'ddp' on CPU)"
    ]
    assert problems(manifest(**{"spec.pretrain.mlm": {"mask_probability": 0.2}})) == [
        "spec.pretrain: mlm settings are only used with objective 'mlm' (got objective 'causal')"
    ]
    assert problems(manifest(**{"spec.pretrain.model": {"hidden_size": 100, "num_heads": 3}})) == [
        "spec.pretrain.model: hidden_size must be divisible by num_heads (got 100 and 3)"
    ]


def test_header_fields_are_checked() -> None:
    doc = manifest(apiVersion="kubeforge.io/v2", **{"metadata.name": "Not_A_Name"})
    lines = problems(doc)
    assert "apiVersion: must be one of 'kubeforge.io/v1alpha1' (got 'kubeforge.io/v2')" in lines
    assert any(line.startswith("metadata.name: must be a DNS-1123 label") for line in lines)


def test_missing_required_section() -> None:
    doc = manifest()
    del doc["spec"]["data"]
    assert problems(doc) == ["spec.data: required field is missing"]


def test_missing_source_file_is_named(tmp_path: Path) -> None:
    doc = manifest(**{"spec.data.sources": [{"type": "files", "paths": ["corpus/*.jsonl"]}]})
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError) as info:
        load_manifest(path)
    (problem,) = info.value.problems
    assert problem.where == "spec.data.sources[0].paths[0]"
    assert "no file matches 'corpus/*.jsonl'" in problem.message
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text('{"text": "hello"}\n')
    assert load_manifest(path).spec.data.sources[0].type == "files"


def test_object_store_sources_validate_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubeforge import filesystems

    def no_store() -> None:
        raise AssertionError("validation contacted the object store")

    monkeypatch.setattr(filesystems, "_s3", no_store)
    paths = ["s3://corpus/web/**/*.jsonl", "gs://corpus/a.jsonl", "s3://corpus-*/a.jsonl"]
    doc = manifest(**{"spec.data.sources": [{"type": "files", "paths": paths}]})
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError) as info:
        load_manifest(path)
    assert [str(p) for p in info.value.problems] == [
        "spec.data.sources[0].paths[1]: 'gs://corpus/a.jsonl': unsupported scheme 'gs://' (supported: s3://)",
        "spec.data.sources[0].paths[2]: 's3://corpus-*/a.jsonl': the bucket name cannot be a glob ('corpus-*'); "
        "globs go in the key",
    ]
    doc["spec"]["data"]["sources"][0]["paths"] = paths[:1]
    path.write_text(yaml.safe_dump(doc))
    assert load_manifest(path).spec.data.sources[0].paths == ("s3://corpus/web/**/*.jsonl",)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("apiVersion: kubeforge.io/v1alpha1\nkind: [ModelPipeline\n")
    with pytest.raises(SpecError) as info:
        load_manifest(path)
    assert str(info.value).startswith(f"{path}:")
    assert "not valid YAML" in str(info.value)


def test_json_schema_is_exported_and_strict() -> None:
    schema = json_schema()
    assert schema["title"] == "ModelPipeline"
    defs = schema["$defs"]
    assert defs["TrainSettings"]["properties"]["lr"]["exclusiveMinimum"] == 0
    assert defs["TrainSettings"]["additionalProperties"] is False


def test_manifest_reference_doc_matches_the_models() -> None:
    from kubeforge.spec.reference import render

    doc = Path(__file__).resolve().parents[2] / "docs" / "manifest.md"
    assert doc.read_text() == render(), "regenerate: python -m kubeforge.spec.reference > docs/manifest.md"


def test_set_overrides_fields_before_validation() -> None:
    path = EXAMPLES / "quickstart.yaml"
    pipeline = load_manifest(path, overrides=["finetune.replay_fraction=0.2", "finetune.train.max_steps=160",
                                              "promotion.gates.0.max_regression=0.05"])
    assert pipeline.spec.finetune is not None and pipeline.spec.finetune.replay_fraction == 0.2
    assert pipeline.spec.finetune.train.max_steps == 160
    assert pipeline.spec.promotion is not None and pipeline.spec.promotion.gates[0].max_regression == 0.05
    with pytest.raises(SpecError, match=r"spec.finetune.train.lr: must be > 0 \(got -1\)"):
        load_manifest(path, overrides=["finetune.train.lr=-1"])
    with pytest.raises(SpecError, match=r"--set promotion.gates.9.min=1: spec.promotion.gates.9: no list item 9"):
        load_manifest(path, overrides=["promotion.gates.9.min=1"])
    with pytest.raises(SpecError, match=r"--set finetune: expected path.to.field=value"):
        load_manifest(path, overrides=["finetune"])
    with pytest.raises(SpecError, match=r"spec.finetune.objective.x: its parent is a value"):
        load_manifest(path, overrides=["finetune.objective.x=1"])
