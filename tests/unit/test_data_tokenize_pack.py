"""Tokenizer training and round trip, document-level splits and packing into shards."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kubeforge.data import tasks
from kubeforge.data.packing import (
    assign_splits,
    plan_shards,
    shard_pieces,
    split_of,
    split_position,
    tokenize_part,
    write_shard,
)
from kubeforge.data.perplexity import train
from kubeforge.data.tokenizer import sample, special_token_ids, train_tokenizer
from kubeforge.spec.data import PackingSpec, TokenizerSpec

pytestmark = pytest.mark.unit

CORPUS = [
    f"def handler_{i}(request):\n    \"\"\"Handle request number {i}.\"\"\"\n    return request.reply({i}, 'ok')\n"
    for i in range(200)
]


def test_bpe_tokenizer_round_trip_and_autotokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    trained = train_tokenizer(CORPUS, TokenizerSpec(type="bpe", vocab_size=400, min_frequency=2), tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = "def handler_7(request):\n\treturn  'ünïcode ok' \n"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text
    assert len(loaded) == len(trained) <= 400
    assert loaded.eos_token == loaded.bos_token == "<|endoftext|>"
    assert (loaded.pad_token, loaded.mask_token, loaded.unk_token) == ("<|pad|>", "<|mask|>", "<|unk|>")
    assert special_token_ids(loaded) == {"bos_id": 0, "eos_id": 0, "pad_id": 1, "mask_id": 2, "unk_id": 3}


def test_bpe_min_frequency_limits_merges(tmp_path: Path) -> None:
    loose = train_tokenizer(CORPUS, TokenizerSpec(vocab_size=2000, min_frequency=1), tmp_path / "a")
    strict = train_tokenizer(CORPUS, TokenizerSpec(vocab_size=2000, min_frequency=150), tmp_path / "b")
    assert len(strict) < len(loose)


def test_unigram_tokenizer_round_trip(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    train_tokenizer(CORPUS, TokenizerSpec(type="unigram", vocab_size=300, min_frequency=1), tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = "return request.reply(7, 'ok')\n    return handler_3\n"
    assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text
    # No byte fallback in a unigram model: a character never seen in training is <|unk|>.
    assert 3 in loaded("a\tb", add_special_tokens=False)["input_ids"]
    assert loaded.convert_tokens_to_ids("<|unk|>") == 3


def test_unigram_min_frequency_drops_rare_words() -> None:
    from kubeforge.data.tokenizer import _unigram_corpus

    texts = ["common word rare1", "common word", "common rare2 word"]
    assert list(_unigram_corpus(texts, 2)) == ["common word", "common word", "common word"]
    assert list(_unigram_corpus(texts, 4)) == ["", "", ""]
    assert list(_unigram_corpus(texts, 1)) == texts


def test_splits_are_by_document_stable_and_seeded() -> None:
    ids = [f"doc-{i}" for i in range(2000)]
    spec = PackingSpec(validation_fraction=0.1, test_fraction=0.2, seed=3)
    splits = assign_splits(ids, spec)
    share = {name: splits.count(name) / len(ids) for name in ("train", "validation", "test")}
    assert share["validation"] == pytest.approx(0.1, abs=0.03)
    assert share["test"] == pytest.approx(0.2, abs=0.03)
    # A document's split does not depend on the other documents.
    assert assign_splits(ids[::7], spec) == splits[::7]
    assert assign_splits(ids, PackingSpec(validation_fraction=0.1, test_fraction=0.2, seed=4)) != splits
    assert 0 <= split_position("x", 0) < 1


def test_tiny_corpus_still_fills_requested_splits() -> None:
    splits = assign_splits(["a", "b", "c"], PackingSpec(validation_fraction=0.01, test_fraction=0.01))
    assert sorted(splits) == ["test", "train", "validation"]
    assert assign_splits(["a", "b", "c"], PackingSpec(validation_fraction=0.0, test_fraction=0.0)) == ["train"] * 3


def test_tiny_corpus_the_hash_puts_out_of_training_still_trains() -> None:
    # At 99 % test, all four documents hash into test: training and validation each take the test
    # document nearest them, the one of largest position, and test keeps the other two.
    ids = ["a", "b", "c", "d"]
    spec = PackingSpec(validation_fraction=0.005, test_fraction=0.99)
    assert [split_of(i, spec) for i in ids] == ["test"] * 4
    splits = assign_splits(ids, spec)
    by_position = sorted(ids, key=lambda i: split_position(i, spec.seed))
    assert [splits[ids.index(i)] for i in by_position] == ["test", "test", "validation", "train"]
    # Two documents cannot fill three splits: training comes first.
    assert sorted(assign_splits(["a", "b"], spec)) == ["test", "train"]


def test_token_streams_are_cut_into_shards_across_parts_and_the_last_row_padded(tmp_path: Path) -> None:
    # Three parts' streams (documents already followed by eos 0): 4 + 2 + 7 tokens, shards of 2 rows of 4.
    streams = [[5, 6, 7, 0], [8, 0], [10, 11, 12, 13, 14, 0, 9]]
    for n, stream in enumerate(streams):
        np.save(tmp_path / f"p{n}.npy", np.array(stream, dtype=np.int32))
    pieces = shard_pieces([len(s) for s in streams], 8)
    assert pieces == [[(0, 0, 4), (1, 0, 2), (2, 0, 2)], [(2, 2, 7)]]
    rows = [
        write_shard({"path": f"s{k}.npy", "pieces": [[f"p{n}.npy", a, b] for n, a, b in shard]}, str(tmp_path),
                    seq_len=4, pad_id=1, out=str(tmp_path))["rows"]
        for k, shard in enumerate(pieces)
    ]
    shards = [np.load(tmp_path / f"s{k}.npy") for k in range(2)]
    assert all(shard.dtype == np.int32 for shard in shards)
    assert [shard.tolist() for shard in shards] == [[[5, 6, 7, 0], [8, 0, 10, 11]], [[12, 13, 14, 0], [9, 1, 1, 1]]]
    assert rows == [2, 2]
    assert shard_pieces([], 8) == [] and shard_pieces([0, 0], 8) == []


def test_parts_are_packed_by_split_without_sharing_documents(tmp_path: Path) -> None:
    tokenizer = train_tokenizer(CORPUS, TokenizerSpec(vocab_size=400), tmp_path / "tok")
    ids = special_token_ids(tokenizer)
    spec = PackingSpec(seq_len=16, sequences_per_shard=50, validation_fraction=0.2, test_fraction=0.2, seed=1)
    doc_ids = [f"d{i}" for i in range(len(CORPUS))]
    splits = assign_splits(doc_ids, spec)
    halves = [(0, 120), (120, len(CORPUS))]
    stems = []
    for n, (start, end) in enumerate(halves):
        stems.append(f"part-{n}")
        tasks.write_part(pd.DataFrame({
            "idx": range(start, end), "id": doc_ids[start:end], "source": "s", "text": CORPUS[start:end],
        }), tmp_path / f"part-{n}.parquet")
    (tmp_path / "work").mkdir()
    tokenized = [
        tokenize_part({"part": str(tmp_path / f"{stem}.parquet")}, str(tmp_path / "tok"), spec, {}, ids["eos_id"],
                      str(tmp_path / "documents"), str(tmp_path / "work"))
        for stem in stems
    ]
    shards, writes = plan_shards(stems, tokenized, spec)
    for item in writes:
        write_shard(item, str(tmp_path / "work"), spec.seq_len, ids["pad_id"], str(tmp_path))
    documents = pd.read_parquet(tmp_path / "documents")
    assert list(documents["id"]) == doc_ids and list(documents["split"]) == splits
    decoded: dict[str, str] = {}
    for split in ("train", "validation", "test"):
        arrays = [np.load(tmp_path / p) for p in shards[split]]
        assert all(a.dtype == np.int32 and a.shape[1] == 16 and a.shape[0] <= 50 for a in arrays)
        tokens = np.concatenate(arrays).ravel()
        assert len(arrays) == -(-len(tokens) // 16 // 50)
        assert int((tokens != ids["pad_id"]).sum()) == sum(part["tokens"][split] for part in tokenized)
        assert int((tokens == ids["eos_id"]).sum()) == splits.count(split)
        decoded[split] = tokenizer.decode(tokens[tokens != ids["pad_id"]].tolist())
    for i, text in enumerate(CORPUS):
        homes = [split for split in decoded if text in decoded[split]]
        assert homes == [splits[i]], f"document {i} found in {homes}"
    order = [decoded["train"].index(CORPUS[i]) for i in range(len(CORPUS)) if splits[i] == "train"]
    assert order == sorted(order), "documents keep corpus order across parts"


def test_kneser_ney_is_a_distribution_and_ranks_text() -> None:
    model = train(CORPUS, order=3, max_chars=5000)
    alphabet = set("".join(CORPUS)) | {"\u0416"}
    assert sum(model.char_probability("re", c) for c in alphabet) == pytest.approx(1.0, abs=1e-9)
    in_domain = model.perplexity("def handler_3(request):\n    return request.reply(3, 'ok')\n")
    out_of_domain = model.perplexity("Жизнь прекрасна, qzx vvk!")
    assert 1 < in_domain < 5 < out_of_domain
    assert model.perplexity("") == 1.0


def test_reference_model_respects_max_chars() -> None:
    small = train(CORPUS, order=2, max_chars=10)
    assert sum(small.counts[1].values()) == 10


def test_the_tokenizer_learns_from_a_sample_of_about_the_asked_size_the_same_on_every_run() -> None:
    rng = random.Random(0)
    ids = [f"doc-{i}" for i in range(400)]
    texts = [f"{doc_id} " + "x" * rng.randrange(50, 150) for doc_id in ids]
    total = sum(map(len, texts))
    assert all(map(sample(total, None), ids)) and all(map(sample(total, total), ids))
    keep = sample(total, total // 4)
    drawn = [text for doc_id, text in zip(ids, texts, strict=True) if keep(doc_id)]
    assert 0.15 * total < sum(map(len, drawn)) < 0.35 * total
    assert [doc_id for doc_id in ids if sample(total, total // 4)(doc_id)] == [d for d in ids if keep(d)], (
        "the same documents on every run"
    )
