"""The data stage reading its corpus from an object store: `kubeforge run` on a JSONL corpus in a bucket of
moto's S3 server, configured only through the AWS environment variables its process (and its local Ray
runtime's workers) inherit, against the same corpus read from local disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from kubeforge.spec.data import stdlib_dir
from tests.s3_fixtures import AWS_VARIABLES, ObjectStore, isolated_aws_env

pytestmark = pytest.mark.integration

# Real text that exercises the document steps: three near-duplicate codecs (cp037, cp500, cp1026), an
# e-mail address to redact (codecs.py), and one module listed twice (an exact duplicate).
MODULES = ["textwrap.py", "string.py", "bisect.py", "glob.py", "codecs.py",
           "encodings/cp037.py", "encodings/cp500.py", "encodings/cp1026.py", "bisect.py"]
DOCUMENT_STEPS = ("read", "normalize", "exact_dedup", "fuzzy_dedup", "quality", "perplexity", "redact")


def _write_corpus(folder: Path) -> None:
    folder.mkdir(parents=True)
    records = [{"body": (stdlib_dir() / name).read_text(encoding="utf-8"), "module": name} for name in MODULES]
    (folder / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:5]))
    (folder / "part-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[5:]))
    (folder / "README.md").write_text("not part of the corpus: the glob takes *.jsonl only")


def _manifest(path: Path, name: str, paths: list[str]) -> Path:
    path.write_text(json.dumps({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelPipeline", "metadata": {"name": name},
        "spec": {"data": {
            "sources": [{"type": "files", "paths": paths, "text_field": "body"}],
            "tokenizer": {"vocab_size": 400},
            "packing": {"seq_len": 32, "validation_fraction": 0.2, "test_fraction": 0.2},
        }},
    }))
    return path


def _kubeforge_run(manifest: Path, workdir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("kubeforge")), "run", str(manifest), "--workdir", str(workdir),
               "--no-metrics"]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def _stage_folder(workdir: Path, name: str) -> Path:
    (folder,) = [p for p in (workdir / "pipelines" / name / "stages").glob("data-*") if not p.name.endswith(".partial")]
    return folder


@pytest.fixture(scope="module")
def runs(object_store: ObjectStore, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same corpus through `kubeforge run`: once from the bucket, once from local disk."""
    tmp = tmp_path_factory.mktemp("s3-data")
    _write_corpus(tmp / "corpus")
    bucket = object_store.new_bucket()
    object_store.upload_dir(bucket, tmp / "corpus", prefix="corpora/code/")
    plain = {k: v for k, v in os.environ.items() if k not in AWS_VARIABLES}
    env = {**plain, **isolated_aws_env(tmp, object_store.env()), "COLUMNS": "400"}
    remote = _kubeforge_run(_manifest(tmp / "remote.yaml", "remote", [f"s3://{bucket}/corpora/**/*.jsonl"]),
                            tmp / "work", env)
    assert remote.returncode == 0, remote.stderr[-4000:]
    local = _kubeforge_run(_manifest(tmp / "local.yaml", "local", ["corpus/*.jsonl"]), tmp / "work",
                           {**plain, "COLUMNS": "400"})
    assert local.returncode == 0, local.stderr[-4000:]
    return {"tmp": tmp, "bucket": bucket, "env": env, "store": object_store,
            "remote": _stage_folder(tmp / "work", "remote"), "local": _stage_folder(tmp / "work", "local")}


def test_a_bucket_corpus_goes_through_the_funnel_like_the_same_local_files(runs: dict[str, Any]) -> None:
    remote, local = (json.loads((runs[k] / "result.json").read_text()) for k in ("remote", "local"))
    counts = ("enabled", "documents_in", "documents_out", "characters_in", "characters_out", "changed")
    rows = {name: {r["step"]: {c: r[c] for c in counts} for r in result["funnel"] if r["step"] in DOCUMENT_STEPS}
            for name, result in (("remote", remote), ("local", local))}
    assert rows["remote"] == rows["local"]
    by_step = rows["remote"]
    assert by_step["read"]["documents_in"] == len(MODULES)
    assert by_step["exact_dedup"]["documents_in"] - by_step["exact_dedup"]["documents_out"] == 1
    assert by_step["fuzzy_dedup"]["documents_in"] - by_step["fuzzy_dedup"]["documents_out"] == 2
    assert by_step["redact"]["changed"] >= 1
    documents = {k: pd.read_parquet(runs[k] / "documents") for k in ("remote", "local")}
    assert sorted(documents["remote"]["text"]) == sorted(documents["local"]["text"])
    bucket = runs["bucket"]
    assert sorted(documents["remote"]["source"].unique()) == [
        f"s3://{bucket}/corpora/code/part-0.jsonl", f"s3://{bucket}/corpora/code/part-1.jsonl",
    ]
    assert set(documents["remote"]["id"].str.replace(f"s3://{bucket}/corpora/code/", "", regex=False)) == set(
        documents["local"]["id"].str.replace(f"{runs['tmp'] / 'corpus'}/", "", regex=False)
    )


def test_a_bucket_glob_that_matches_nothing_and_refused_credentials_are_one_line(runs: dict[str, Any]) -> None:
    tmp, bucket, store = runs["tmp"], runs["bucket"], runs["store"]
    empty = _kubeforge_run(_manifest(tmp / "empty.yaml", "empty", [f"s3://{bucket}/corpora/**/*.parquet"]),
                           tmp / "work", runs["env"])
    assert empty.returncode != 0
    assert f"error: spec.data.sources[0].paths: no file matches 's3://{bucket}/corpora/**/*.parquet'\n" in (
        empty.stderr), empty.stderr[-4000:]
    assert "Traceback" not in empty.stderr
    stranger = {**runs["env"], **store.env(store.stranger)}
    denied = _kubeforge_run(tmp / "remote.yaml", tmp / "work-denied", stranger)
    assert denied.returncode != 0
    assert (f"error: s3://{bucket}/corpora/**/*.jsonl: access denied (ACCESS_DENIED during ListObjectsV2): the "
            "credentials are wrong or may not list it\n") in denied.stderr, denied.stderr[-4000:]
    assert "Traceback" not in denied.stderr


def test_a_ray_worker_lists_and_reads_objects_with_the_variables_it_is_given(
    ray_local: Any, object_store: ObjectStore, tmp_path: Path
) -> None:
    """What the stage's readers do in Ray workers: each process builds its own client from its environment.
    The session's runtime started before this test, so the variables go in the task's runtime environment."""
    bucket = object_store.new_bucket({"corpus/a.jsonl": '{"text": "one"}\n', "corpus/b.jsonl": '{"text": "two"}\n'})

    @ray_local.remote
    def read(pattern: str) -> list[tuple[str, bytes]]:
        from kubeforge.filesystems import list_files, open_input

        out = []
        for found in list_files([pattern], Path(".")):
            with open_input(found.path) as file:
                out.append((found.path, file.read()))
        return out

    env = isolated_aws_env(tmp_path, object_store.env())
    task = read.options(runtime_env={"env_vars": env})
    assert ray_local.get(task.remote(f"s3://{bucket}/corpus/*.jsonl"), timeout=120) == [
        (f"s3://{bucket}/corpus/a.jsonl", b'{"text": "one"}\n'), (f"s3://{bucket}/corpus/b.jsonl", b'{"text": "two"}\n'),
    ]
