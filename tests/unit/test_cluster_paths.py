"""Paths and volumes on a cluster (issue [9/11], fault 6): a manifest's relative paths name files on the
work volume, absolute ones must lie on a volume the stage pods mount, and `spec.cluster.volumes` mounts
further claims in every stage pod."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeforge import entrypoint
from kubeforge.errors import SpecError
from kubeforge.spec.load import parse_manifest
from kubeforge_operator.pipeline import manifest_document, validate
from kubeforge_operator.rayjob import stage_rayjob
from tests.unit.test_operator_builders import CONFIG, OWNER, quickstart_document

pytestmark = pytest.mark.unit

DATASET = {"name": "corpus", "claim": "team-corpus", "mount_path": "/data/corpus"}


def with_files(*paths: str, **cluster: Any) -> dict[str, Any]:
    doc = quickstart_document(**cluster)
    doc["spec"]["data"]["sources"] = [{"type": "files", "paths": list(paths)}]
    return doc


def test_absolute_paths_must_lie_on_a_mounted_volume() -> None:
    # Relative (the work volume), on the work volume, on a mounted claim, in an object store: all fine.
    validate(manifest_document(with_files("corpus/*.txt", "/kubeforge/work/extra.txt", "/data/corpus/a/*.jsonl",
                                          "s3://bucket/k*.txt", volumes=[DATASET])))
    with pytest.raises(SpecError) as caught:
        validate(manifest_document(with_files("/home/me/corpus.txt", "/data/corpusX/b.txt", volumes=[DATASET])))
    assert [p.where for p in caught.value.problems] == ["spec.data.sources[0].paths[0]", "spec.data.sources[0].paths[1]"]
    assert "is on no volume the stage pods mount" in str(caught.value.problems[0])
    doc = quickstart_document()
    doc["spec"]["finetune"]["base_model"] = "/models/llama"
    with pytest.raises(SpecError, match=r"spec.finetune.base_model: '/models/llama' is on no volume"):
        validate(manifest_document(doc))


def test_volumes_are_mounted_in_every_stage_pod() -> None:
    pipeline = parse_manifest(with_files("corpus/*.txt", volumes=[DATASET, {
        "name": "cache", "claim": "model-cache", "mount_path": "/models", "read_only": False}]))
    job = stage_rayjob(pipeline, "data", OWNER, CONFIG)
    cluster = job["spec"]["rayClusterSpec"]
    for template in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["corpus"]["persistentVolumeClaim"] == {"claimName": "team-corpus", "readOnly": True}
        assert volumes["cache"]["persistentVolumeClaim"] == {"claimName": "model-cache", "readOnly": False}
        mounts = {m["mountPath"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["/data/corpus"] == {"name": "corpus", "mountPath": "/data/corpus", "readOnly": True}
        assert mounts["/models"]["readOnly"] is False
    # Relative paths resolve on the work volume, not in the ConfigMap's folder.
    assert "--base-dir /kubeforge/work" in job["spec"]["entrypoint"]


@pytest.mark.parametrize(("volume", "message"), [
    ({"name": "work", "claim": "c", "mount_path": "/data"}, "volumes[0].name: 'work' is taken"),
    ({"name": "x", "claim": "c", "mount_path": "/kubeforge/work/in"}, "volumes[0].mount_path: /kubeforge/work/in overlaps /kubeforge/work"),
    ({"name": "x", "claim": "c", "mount_path": "/etc"}, "volumes[0].mount_path: /etc overlaps /etc/kubeforge"),
    ({"name": "x", "claim": "c", "mount_path": "data"}, "spec.cluster.volumes[0].mount_path: must match ^/"),
])
def test_a_volume_may_not_shadow_what_the_pods_mount(volume: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_manifest(with_files("a.txt", volumes=[volume]))


def test_the_job_entrypoint_resolves_relative_paths_against_its_base_dir(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    manifest_dir, volume = tmp_path / "configmap", tmp_path / "work"
    (volume / "corpus").mkdir(parents=True)
    (volume / "corpus" / "a.txt").write_text("hello\n")
    manifest_dir.mkdir()
    doc = with_files("corpus/*.txt")
    manifest = manifest_dir / "manifest.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    seen: list[Path] = []

    def run_stage(pipeline: Any, stage: str, options: Any, reporter: Any) -> Any:
        seen.append(options.base_dir)
        raise SpecError([])

    monkeypatch.setattr("kubeforge.executor.run_stage", run_stage)
    args = ["data", "--manifest", str(manifest), "--workdir", str(volume)]
    # Next to the manifest there is no corpus: the file check names the source.
    assert entrypoint.main(args) == 2 and seen == []
    assert entrypoint.main([*args, "--base-dir", str(volume)]) == 2 and seen == [volume]
