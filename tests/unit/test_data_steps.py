"""The data stage's work on one part, as a Ray worker runs it, on small frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kubeforge.data import dedup_steps, step_io, steps, tasks
from kubeforge.data.perplexity import train
from kubeforge.spec.data import NormalizeStep, QualityStep, RedactStep

pytestmark = pytest.mark.unit

PROSE = (
    "The quiet river runs past the old stone mill, and the morning light falls on the water. Children walk "
    "to school along its bank, counting boats; a heron waits in the reeds while the baker opens his shop. "
    "By noon the market square is full of voices, carts and the smell of bread."
)


def part(tmp_path: Path, texts: list[str], first: int = 0, name: str = "part-a.parquet") -> Path:
    path = tmp_path / "in" / name
    tasks.write_part(pd.DataFrame({
        "idx": range(first, first + len(texts)), "id": [f"d{first + n}" for n in range(len(texts))],
        "source": "s", "text": texts,
    }), path)
    return path


def test_a_part_is_transformed_into_a_part_of_the_same_name_with_its_counts(tmp_path: Path) -> None:
    path = part(tmp_path, ["a  \r\nb", "clean", "x\t \n"])
    counts = step_io.transform_part({"part": str(path)}, steps._normalize, {"step": NormalizeStep()}, str(tmp_path / "out"))
    assert counts == {"documents_in": 3, "documents_out": 3, "characters_in": 15, "characters_out": 10, "changed": 2}
    assert list(tasks.read_part(tmp_path / "out" / path.name)["text"]) == ["a\nb", "clean", "x\n"]


def test_a_part_that_keeps_nothing_writes_nothing(tmp_path: Path) -> None:
    path = part(tmp_path, ["short", "tiny"])
    counts = step_io.transform_part({"part": str(path)}, steps._quality, {"step": QualityStep()}, str(tmp_path / "out"))
    assert (counts["documents_out"], counts["removed_by_rule"]) == (0, {"min_chars": 2})
    assert not (tmp_path / "out").exists()


def test_quality_keeps_good_documents_and_counts_removals_by_rule(tmp_path: Path) -> None:
    frame = tasks.read_part(part(tmp_path, [PROSE, PROSE[:90] * 4, "1234 " * 80, PROSE + " 42"]))
    kept, counts = steps._quality(frame, QualityStep())
    assert list(kept["id"]) == ["d0", "d3"]
    assert counts["removed_by_rule"] == {"max_digit_ratio": 1, "max_top_ngram_fraction[3]": 1}


def test_redaction_counts_documents_changed_and_replacements(tmp_path: Path) -> None:
    frame = tasks.read_part(part(tmp_path, ["mail me at ann@example.org or bob@example.org", "nothing here"]))
    out, counts = steps._redact(frame, RedactStep())
    assert out["text"].iat[0] == "mail me at <EMAIL> or <EMAIL>" and out["text"].iat[1] == "nothing here"
    assert counts["changed"] == 1 and counts["replacements"]["emails"] == 2


def test_exact_duplicates_across_parts_are_grouped_by_partition_keeping_the_first(tmp_path: Path) -> None:
    first = part(tmp_path, ["alpha", "beta", "alpha"], 0, "part-a.parquet")
    second = part(tmp_path, ["beta", "gamma", "alpha"], 10, "part-b.parquet")
    work = tmp_path / "work"
    work.mkdir()
    for path in (first, second):
        dedup_steps._emit_keys({"part": str(path)}, "exact", {}, 3, str(work))
    pairs = np.concatenate([
        np.load(work / f"pairs-{b:05d}.npy") if dedup_steps._group_partition(
            {"bucket": b}, [first.stem, second.stem], False, str(work))["pairs"] else np.empty((0, 2), dtype=np.int64)
        for b in range(3)
    ])
    assert sorted(map(tuple, pairs.tolist())) == [(0, 2), (0, 12), (1, 10)]


def test_drop_removes_the_given_documents_and_workers_log_each_with_the_one_it_duplicates(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    np.save(work / "drop.npy", np.array([1, 3, 11]))
    np.save(work / "look_up.npy", np.array([0, 1, 3, 11]))
    options = {"drop": str(work / "drop.npy"), "look_up": str(work / "look_up.npy"), "names": str(work / "names")}
    first = tasks.read_part(part(tmp_path, ["a", "b", "c", "d"], 0, "part-a.parquet"))
    second = tasks.read_part(part(tmp_path, ["e", "f"], 10, "part-b.parquet"))
    assert list(dedup_steps._drop(first, **options)[0]["idx"]) == [0, 2]
    assert list(dedup_steps._drop(second, **options)[0]["idx"]) == [10]
    # Given out of corpus order, as clustering gives them; one kept document is in the other part.
    links = np.array([(11, 0, 0.75), (1, 0, 1.0), (3, 1, 0.8)], dtype=dedup_steps._LINK)
    np.save(work / "links-00000.npy", np.sort(links, order="removed"))
    assert dedup_steps._log_removed({"chunk": 0}, "near", str(work)) == {"entries": 3}
    log = [json.loads(line) for line in (work / "removed-00000.jsonl").read_text().splitlines()]
    assert [(e["id"], e["duplicate_of"], e["similarity"]) for e in log] == [
        ("d1", "d0", 1.0), ("d3", "d1", 0.8), ("d11", "d0", 0.75)
    ]
    assert log[0] == {"kind": "near", "id": "d1", "source": "s", "duplicate_of": "d0", "duplicate_of_source": "s",
                      "similarity": 1.0}


def test_perplexity_is_reported_as_a_histogram_whose_median_is_close(tmp_path: Path) -> None:
    model = train([PROSE] * 5, order=3, max_chars=10_000)
    texts = [PROSE[: 40 + 17 * n] for n in range(9)] + ["qzx vvk ЖЖЖ " * 5]
    frame = tasks.read_part(part(tmp_path, texts))
    kept, counts = steps._perplexity(frame, model, limit=50.0)
    assert list(kept["id"]) == [f"d{n}" for n in range(9)]
    exact = float(np.median([model.perplexity(t) for t in texts]))
    assert steps._median_of_bins(counts["log_perplexity_bins"]) == pytest.approx(exact, rel=0.01)
    assert steps._median_of_bins({}) is None
