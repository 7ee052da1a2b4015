"""Reading documents: txt, jsonl with a custom field, parquet, the standard library, and the errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubeforge.data import sources
from kubeforge.data.sources import source_fingerprint, stdlib_files
from kubeforge.errors import KubeForgeError
from kubeforge.spec.data import DataSpec, FilesSource, Source, StdlibSource
from tests.s3_fixtures import ObjectStore

pytestmark = pytest.mark.unit


def files(*paths: str, **options: str) -> FilesSource:
    return FilesSource(type="files", paths=paths, **options)  # type: ignore[arg-type]


def read_documents(source_list: list[Source], base_dir: Path, *field: str) -> list[dict[str, str]]:
    return list(sources.read_documents(source_list, base_dir, *field))


def test_txt_one_document_per_file(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    docs = read_documents([files("*.txt")], tmp_path)
    assert [d["text"] for d in docs] == ["first", "second"]
    assert docs[0]["source"] == str(tmp_path / "a.txt")


def test_jsonl_custom_text_field(tmp_path: Path) -> None:
    lines = [json.dumps({"body": "one", "n": 1}), "", json.dumps({"body": "two"})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    docs = read_documents([files("d.jsonl", text_field="body")], tmp_path)
    assert [d["text"] for d in docs] == ["one", "two"]
    assert [d["id"] for d in docs] == [f"{tmp_path / 'd.jsonl'}:1", f"{tmp_path / 'd.jsonl'}:3"]


def test_parquet_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"content": ["alpha", "beta"], "other": [1, 2]}), tmp_path / "d.parquet")
    docs = read_documents([files("d.parquet", text_field="content")], tmp_path)
    assert [d["text"] for d in docs] == ["alpha", "beta"]


def test_explicit_format_overrides_extension(tmp_path: Path) -> None:
    (tmp_path / "records.data").write_text(json.dumps({"text": "hello"}) + "\n")
    assert [d["text"] for d in read_documents([files("records.data", format="jsonl")], tmp_path)] == ["hello"]
    assert read_documents([files("records.data", format="txt")], tmp_path)[0]["text"].startswith("{")


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    with pytest.raises(KubeForgeError, match=rf"^{path}:2: not valid JSON \("):
        read_documents([files("bad.jsonl")], tmp_path)


def test_missing_text_field_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(KubeForgeError, match=rf"^{path}:2: no field 'text' in the record \(fields: body\)"):
        read_documents([files("d.jsonl")], tmp_path)


def test_non_string_field_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": 5}) + "\n")
    with pytest.raises(KubeForgeError, match=r"d.jsonl:1: field 'text' must be a string \(got int\)"):
        read_documents([files("d.jsonl")], tmp_path)


def test_parquet_missing_column_names_file_and_field(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(KubeForgeError, match=r"d.parquet: no column 'text' \(columns: body\)"):
        read_documents([files("d.parquet")], tmp_path)


def test_vanished_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "gone.txt"
    with pytest.raises(KubeForgeError, match=r"gone\.txt: file vanished"):
        sources._read_whole(str(path))


def test_stdlib_excludes_tests_and_honours_max_files() -> None:
    everything = stdlib_files(StdlibSource(type="python-stdlib"))
    names = [rel for rel, _ in everything]
    assert "encodings/cp437.py" in names and "email/__init__.py" in names
    assert not any(rel.startswith("test/") or "/tests/" in rel for rel in names)
    assert names == sorted(names)
    assert [rel for rel, _ in stdlib_files(StdlibSource(type="python-stdlib", max_files=5))] == names[:5]
    docs = read_documents([StdlibSource(type="python-stdlib", max_files=3)], Path("."))
    assert [d["id"] for d in docs] == [f"stdlib/{rel}" for rel in names[:3]]


def test_same_file_from_two_sources_is_read_once(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    assert len(read_documents([files("a.txt"), files("*.txt")], tmp_path)) == 1


def test_fingerprint_follows_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("one")
    spec = DataSpec(sources=(files("a.txt"),))
    before = source_fingerprint(spec, tmp_path)
    assert source_fingerprint(spec, tmp_path) == before
    path.write_text("longer text")
    assert source_fingerprint(spec, tmp_path) != before
    stdlib = DataSpec(sources=(StdlibSource(type="python-stdlib", max_files=10),))
    assert source_fingerprint(stdlib, tmp_path) == source_fingerprint(stdlib, Path(sys.prefix))


@pytest.mark.parametrize("piece_bytes", [1, 7, 64, 10_000])
def test_a_jsonl_file_read_in_pieces_gives_the_documents_of_reading_it_whole(tmp_path: Path, piece_bytes: int) -> None:
    lines = [json.dumps({"text": f"document {n} " + "é" * (n % 5)}) if n % 4 else "" for n in range(40)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    file = sources.InputFile(0, str(path), "jsonl", "text", path.stat().st_size)
    whole = list(sources.documents_of(file))
    newlines = [sources.count_newlines(str(path), a, b) for a, b in sources.split_into_pieces(file.size, piece_bytes)]
    pieced = [d for piece in sources.pieces(file.size, piece_bytes, newlines) for d in sources.documents_of(file, piece)]
    assert pieced == whole
    assert [row for row, _ in whole] == [n + 1 for n in range(40) if n % 4]


# --- object-store sources (moto's S3 server, tests/s3_fixtures.py) --------------------------------

def _corpus(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.jsonl").write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    pq.write_table(pa.table({"body": ["three", "four"]}), folder / "b.parquet")
    (folder / "c.txt").write_text("five")


def test_object_store_sources_read_like_the_same_local_files(s3_env: ObjectStore, tmp_path: Path) -> None:
    _corpus(tmp_path / "corpus")
    bucket = s3_env.new_bucket()
    s3_env.upload_dir(bucket, tmp_path / "corpus", prefix="corpus/")
    local = read_documents([files("corpus/*", text_field="body")], tmp_path)
    remote = read_documents([files(f"s3://{bucket}/corpus/*", text_field="body")], tmp_path)
    assert [d["text"] for d in remote] == [d["text"] for d in local] == ["one", "two", "three", "four", "five"]
    assert [d["id"] for d in remote] == [
        f"s3://{bucket}/corpus/a.jsonl:1", f"s3://{bucket}/corpus/a.jsonl:3", f"s3://{bucket}/corpus/b.parquet#0",
        f"s3://{bucket}/corpus/b.parquet#1", f"s3://{bucket}/corpus/c.txt",
    ]
    assert {d["source"] for d in remote} == {f"s3://{bucket}/corpus/{n}" for n in ("a.jsonl", "b.parquet", "c.txt")}


def test_an_object_store_glob_that_matches_nothing_names_the_field(s3_env: ObjectStore, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    bucket = s3_env.new_bucket({"corpus/a.jsonl": json.dumps({"text": "x"}) + "\n"})
    with pytest.raises(KubeForgeError, match=(
        rf"^spec\.data\.sources\[1\]\.paths: no file matches 's3://{bucket}/corpus/\*\.parquet', "
        rf"'s3://{bucket}/other/\*'$"
    )):
        read_documents([files("a.txt"), files(f"s3://{bucket}/corpus/*.parquet", f"s3://{bucket}/other/*")], tmp_path)
    with pytest.raises(KubeForgeError, match=r"^spec\.data\.perplexity\.reference\[0\]\.paths: no file matches 'b\.txt' "):
        read_documents([files("b.txt")], tmp_path, "spec.data.perplexity.reference")


def test_fingerprint_of_an_object_store_source_reads_no_contents(
    s3_env: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubeforge import filesystems

    bucket = s3_env.new_bucket({"corpus/a.jsonl": json.dumps({"text": "one"}) + "\n"})
    spec = DataSpec(sources=(files(f"s3://{bucket}/corpus/*.jsonl"),))

    def no_reading(path: str) -> None:
        raise AssertionError(f"the fingerprint opened {path}")

    from kubeforge.data import sources

    monkeypatch.setattr(filesystems, "open_input", no_reading)
    monkeypatch.setattr(sources, "open_input", no_reading)
    before = source_fingerprint(spec, tmp_path)
    assert source_fingerprint(spec, tmp_path) == before
    s3_env.upload(bucket, {"corpus/a.jsonl": json.dumps({"text": "one, longer"}) + "\n"})
    assert source_fingerprint(spec, tmp_path) != before


def test_served_traffic_reads_what_the_capture_wrote_answered_requests_only(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from kubeforge.serve.capture import TrafficLog
    from kubeforge.spec.data import ServedTrafficSource
    from kubeforge.spec.deployment import CaptureSpec

    log = TrafficLog(CaptureSpec(), str(tmp_path / "traffic" / "quickstart"), CollectorRegistry())
    for answered, (prompt, answer, status) in enumerate((("def add(a, b):", "    return a + b", 200), ("boom", "", 503),
                                                        ("mail ada@example.com", "ok", 200)), start=1):
        log.record({"time": float(answered), "request_id": "r", "endpoint": "/v1/completions", "model": "m", "variant": "stable",
                    "version": "1", "status": status, "latency_s": 0.1, "prompt": prompt, "completion": answer})
    log.flush()
    folder = ServedTrafficSource(type="served-traffic", paths=("traffic/quickstart",))
    docs = read_documents([folder], tmp_path)
    assert [d["text"] for d in docs] == ["def add(a, b):\n    return a + b", "mail <EMAIL>\nok"]
    assert docs[1]["id"].endswith("#2")  # the failed request's row is skipped, not renumbered
    answers = ServedTrafficSource(type="served-traffic", paths=("traffic/quickstart",), text="completion")
    assert [d["text"] for d in read_documents([answers], tmp_path)] == ["    return a + b", "ok"]
    # `until` leaves out what was answered after it: the loop's run reads the traffic up to its trigger.
    before = ServedTrafficSource(type="served-traffic", paths=("traffic/quickstart",), text="prompt", until=2.5)
    assert [d["text"] for d in read_documents([before], tmp_path)] == ["def add(a, b):"]
    # Another Parquet file is refused, naming it.
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "traffic" / "quickstart" / "traffic-other.parquet")
    with pytest.raises(KubeForgeError, match=r"traffic-other\.parquet: not a traffic capture file \(no column status, "
                                             r"prompt, completion, time\)"):
        read_documents([folder], tmp_path)


def test_a_served_traffic_folder_without_captures_is_refused_when_the_manifest_loads(tmp_path: Path) -> None:
    from kubeforge.errors import SpecError
    from kubeforge.spec.load import load_manifest

    (tmp_path / "traffic").mkdir()
    manifest = tmp_path / "m.yaml"
    manifest.write_text(json.dumps({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelPipeline", "metadata": {"name": "p"},
        "spec": {"data": {"sources": [{"type": "served-traffic", "paths": ["traffic"]}]}},
    }))
    with pytest.raises(SpecError, match=r"spec\.data\.sources\[0\]\.paths\[0\]: no file matches 'traffic/traffic-\*"):
        load_manifest(manifest)
