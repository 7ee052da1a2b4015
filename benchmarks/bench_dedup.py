"""Fuzzy dedup: KubeForge's MinHash LSH against datatrove's MinHash dedup, on the same corpus.

Corpus: the Python standard library (default excludes, normalised as the data stage does) plus
`--planted` perturbed copies of randomly chosen stdlib modules (outside `encodings/`), each with
`--edit` of its words changed, inserted or deleted. Both tools get word 5-grams, 128 hashes, the
same seed and the same word splitting (datatrove is given a `\\w+` word tokenizer instead of its
English one, and still applies its own text simplification first). The bands differ, because the
tools decide differently: datatrove takes every pair that shares a band as a duplicate, so it gets
14 bands of 9 hashes, the split datasketch derives for threshold 0.7 (balancing false positives
and false negatives); KubeForge checks every candidate pair's exact Jaccard similarity, so it picks
32 bands of 4 (`kubeforge.data.dedup.lsh_bands`), which miss few pairs at the threshold.

Quality is scored against exact Jaccard similarity of the 5-word shingle sets:

* recall: share of planted copies removed; "recall J>=t": the same over the planted copies whose
  exact Jaccard with their original is at least the threshold (the ones a perfect tool removes);
* originals removed: planted copies' originals that were removed (keep-first should keep them);
* precision: share of removed documents whose exact Jaccard with some other document is at
  least the threshold (so the stdlib's own near-duplicates, such as the cp* codecs, count as
  correct removals).

Throughput is documents per second of the whole dedup (signatures, bucketing, clustering,
filtering), single process for both, excluding corpus reading.

Run: .venv/bin/python benchmarks/bench_dedup.py [--planted 100] [--edit 0.02]
"""

from __future__ import annotations

import argparse
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))

from kubeforge.data.dedup import lsh_bands, near_duplicates, shingle_hashes, shingles_of, signatures
from kubeforge.data.normalize import normalize_text
from kubeforge.data.sources import read_documents
from kubeforge.spec.data import NormalizeStep, StdlibSource

THRESHOLD = 0.7
NUM_PERM = 128
SHINGLE = 5
SEED = 1
BANDS, ROWS = 14, 9  # datatrove's, see above


def perturb(text: str, rng: random.Random, fraction: float) -> str:
    words = text.split(" ")
    for _ in range(max(1, int(len(words) * fraction))):
        position = rng.randrange(len(words))
        action = rng.random()
        if action < 1 / 3:
            words[position] = f"edited{rng.randrange(10**6)}"
        elif action < 2 / 3:
            words.insert(position, f"inserted{rng.randrange(10**6)}")
        elif len(words) > 1:
            del words[position]
    return " ".join(words)


def build_corpus(planted: int, edit: float, seed: int) -> tuple[list[str], list[str], dict[int, int]]:
    """(ids, texts, {copy index: original index})."""
    docs = list(read_documents([StdlibSource(type="python-stdlib")], Path(".")))
    texts = [normalize_text(d["text"], NormalizeStep()) for d in docs]
    ids = [d["id"] for d in docs]
    # Exact copies are the exact-dedup step's job; both tools would remove them trivially.
    first_index: dict[str, int] = {}
    for i, t in enumerate(texts):
        first_index.setdefault(t, i)
    unique = sorted(first_index.values())
    ids, texts = [ids[i] for i in unique], [texts[i] for i in unique]
    rng = random.Random(seed)
    eligible = [i for i, t in enumerate(texts) if "encodings/" not in ids[i] and len(t.split()) >= 300]
    chosen = rng.sample(eligible, planted)
    planted_of: dict[int, int] = {}
    for original in chosen:
        planted_of[len(texts)] = original
        ids.append(f"{ids[original]}#copy")
        texts.append(perturb(texts[original], rng, edit))
    return ids, texts, planted_of


def run_ours(texts: list[str]) -> tuple[set[int], float]:
    start = time.perf_counter()
    sigs, has_words = signatures(texts, SHINGLE, NUM_PERM, SEED)
    found = near_duplicates(sigs, has_words, THRESHOLD, shingles_of(texts, SHINGLE))
    elapsed = time.perf_counter() - start
    return set(np.flatnonzero(~found.keep).tolist()), elapsed


def run_datatrove(texts: list[str]) -> tuple[set[int], float]:
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class RegexWords(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return re.findall(r"\w+", text.lower())

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    config = MinhashConfig(
        n_grams=SHINGLE, num_buckets=BANDS, hashes_per_bucket=ROWS, seed=SEED, hash_config=HashConfig(precision=64)
    )
    documents = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    kept: list[int] = []

    def collect(data, rank: int = 0, world_size: int = 1):
        for document in data:
            kept.append(int(document.id))
            yield document

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        def logs(step: str) -> dict[str, object]:
            # datatrove writes its logs to ./logs/<timestamp> unless told otherwise.
            return {"logging_dir": str(root / "logs" / step), "skip_completed": False}

        start = time.perf_counter()
        LocalPipelineExecutor(
            pipeline=[documents, MinhashDedupSignature(output_folder=str(root / "sigs"), config=config,
                                                       language=RegexWords())],
            tasks=1, workers=1, **logs("signatures"),
        ).run()
        LocalPipelineExecutor(
            pipeline=[MinhashDedupBuckets(input_folder=str(root / "sigs"), output_folder=str(root / "buckets"),
                                          config=config)],
            tasks=config.num_buckets, workers=1, **logs("buckets"),
        ).run()
        LocalPipelineExecutor(
            pipeline=[MinhashDedupCluster(input_folder=str(root / "buckets"), output_folder=str(root / "remove"),
                                          config=config)],
            tasks=1, workers=1, **logs("clusters"),
        ).run()
        LocalPipelineExecutor(
            pipeline=[documents, MinhashDedupFilter(input_folder=str(root / "remove")), collect],
            tasks=1, workers=1, **logs("filter"),
        ).run()
        elapsed = time.perf_counter() - start
    return set(range(len(texts))) - set(kept), elapsed


def max_jaccard(index: int, shingles: list[np.ndarray]) -> float:
    mine = shingles[index]
    best = 0.0
    for other, theirs in enumerate(shingles):
        if other == index or not len(theirs) or not len(mine):
            continue
        union = len(mine) + len(theirs)
        shared = len(np.intersect1d(mine, theirs, assume_unique=True))
        best = max(best, shared / (union - shared))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planted", type=int, default=100)
    parser.add_argument("--edit", type=float, default=0.02, help="share of words edited in each planted copy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    _ids, texts, planted_of = build_corpus(args.planted, args.edit, args.seed)
    shingles = [shingle_hashes(t, SHINGLE) for t in texts]
    planted_jaccard = []
    for copy, original in planted_of.items():
        a, b = shingles[copy], shingles[original]
        shared = len(np.intersect1d(a, b, assume_unique=True))
        planted_jaccard.append(shared / (len(a) + len(b) - shared))
    print(f"corpus: {len(texts)} documents ({len(planted_of)} planted copies, {args.edit:.0%} of words edited; "
          f"exact Jaccard to original: min {min(planted_jaccard):.2f}, median {np.median(planted_jaccard):.2f}, "
          f"{sum(j >= THRESHOLD for j in planted_jaccard)} at or above {THRESHOLD}), "
          f"{sum(map(len, texts)) / 1e6:.1f} M characters")
    print(f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"threshold {THRESHOLD}, {SHINGLE}-word shingles, bands x rows: kubeforge "
          f"{'x'.join(map(str, lsh_bands(THRESHOLD, NUM_PERM)))}, datatrove {BANDS}x{ROWS}")

    # Planted copies that really are duplicates by the definition both tools approximate.
    above = [c for c, j in zip(planted_of, planted_jaccard, strict=True) if j >= THRESHOLD]
    results = {}
    jaccard_cache: dict[int, float] = {}
    for name, runner in (("kubeforge", run_ours), ("datatrove 0.10.1", run_datatrove)):
        removed, elapsed = runner(texts)
        for index in removed:
            if index not in jaccard_cache:
                jaccard_cache[index] = max_jaccard(index, shingles)
        true_removed = sum(1 for i in removed if jaccard_cache[i] >= THRESHOLD)
        results[name] = {
            "docs_per_s": len(texts) / elapsed,
            "seconds": elapsed,
            "removed": len(removed),
            "recall": sum(1 for c in planted_of if c in removed) / len(planted_of),
            "recall_true": sum(1 for c in above if c in removed) / max(1, len(above)),
            "originals_removed": sum(1 for o in planted_of.values() if o in removed),
            "precision": true_removed / len(removed) if removed else 1.0,
            "false_positives": len(removed) - true_removed,
        }

    header = (
        f"{'':18}{'docs/s':>8}{'seconds':>9}{'removed':>9}{'recall':>8}{'recall J>=t':>12}{'precision':>11}"
        f"{'FP':>5}{'orig. rm':>10}"
    )
    print(header)
    for name, r in results.items():
        print(f"{name:18}{r['docs_per_s']:>8.0f}{r['seconds']:>9.2f}{r['removed']:>9}{r['recall']:>8.3f}"
              f"{r['recall_true']:>12.3f}"
              f"{r['precision']:>11.3f}{r['false_positives']:>5}{r['originals_removed']:>10}")
    ours, theirs = results["kubeforge"], results["datatrove 0.10.1"]
    print(f"throughput ratio kubeforge / datatrove: {ours['docs_per_s'] / theirs['docs_per_s']:.2f}x")


if __name__ == "__main__":
    main()
