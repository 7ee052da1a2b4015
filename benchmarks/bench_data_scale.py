"""Data stage scaling: wall time, throughput and the driver's peak memory against corpus size.

Corpus: for each `--sizes` entry (MB, 10^6 bytes), a JSONL file of ~1 KB documents (field `text`) of
English-like prose: words from a generated vocabulary of `VOCABULARY` syllable words with Zipf-like
frequencies, sentences of about 12 words, paragraphs of about 5 sentences. Each document is, with
`--duplicates` probability each, an exact copy or a near copy (`NEAR_EDITS` words replaced, 5-word
shingle Jaccard about 0.9) of an earlier one; every document passes the default quality rules. The
generator is numpy only (token ids gathered from a padded byte table: about 20 CPU seconds per GB on
a 2-core laptop) and seeded; a smaller size's corpus is a prefix of a larger one's.

Method: each size gets its own work directory and a manifest with only a `data` section (the
default steps, the corpus as a `files` source), and `python -m kubeforge.cli run MANIFEST --workdir
DIR --no-metrics` runs as a subprocess in its own process group, as a user would run it (local Ray
runtime with all CPUs unless `--num-cpus`, embedded MLflow; RAY_ADDRESS and MLFLOW_TRACKING_URI are
dropped from its environment). Reported per size:

* stage s: the data stage's duration as the executor records it (`_kubeforge.duration_seconds` in
  the stage folder's result.json: the stage function, its MLflow logging included, after Ray has
  started); wall s: the whole subprocess, imports, Ray's start-up and shutdown included;
* MB/s: input file size / stage seconds;
* documents in (read) and out (packed), and the documents the exact, fuzzy and quality steps removed,
  from the result's `funnel`;
* driver peak RSS: the `kubeforge run` process only (the Ray driver, not Ray's workers, raylet or
  GCS), sampled with psutil every 50 ms; "shared" is the shared part (file-backed and shm pages,
  the object store's included) of RSS at that peak sample; the ratio is against the smallest size.

With `--nodes N`, the script starts a Ray cluster of N nodes on this machine first (`ray start
--head` and N-1 `ray start --address`, each with `--num-cpus` CPUs, its own raylet and object store),
runs every size on it (`RAY_ADDRESS`). Every run reports each node's work items and their busy
seconds, from the data card's `work_per_node`.

Run (the defaults take a few minutes on a 2-core machine):

    .venv/bin/python benchmarks/bench_data_scale.py [--sizes 30,121,1000] [--num-cpus N] [--nodes N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml

VOCABULARY = 20_000
WORDS_PER_DOC = (160, 240)  # uniform; ~1 KB of text
SENTENCE_END, PARAGRAPH_END = 1 / 12, 1 / 5  # per word; share of sentence ends that end a paragraph
NEAR_EDITS = 2
MAX_WORD, TOKEN_WIDTH = 11, 16  # letters; bytes of the longest token (a word and `.\\n\\n`)
DOCS_PER_CHUNK = 20_000
SAMPLE_S = 0.05
PIPELINE = "bench-data-scale"
# A token is (capitalised, ending, word): token id = (2 * ending + capitalised) * VOCABULARY + word.
# Endings are already JSON-escaped, so a document's bytes are its tokens' bytes concatenated.
ENDINGS = (b" ", b". ", b".\\n\\n", b".")
DOC_START, DOC_END = 2 * len(ENDINGS) * VOCABULARY, 2 * len(ENDINGS) * VOCABULARY + 1


def vocabulary(rng: np.random.Generator) -> tuple[list[bytes], np.ndarray]:
    """Distinct syllable words, shortest first, and a table to draw them from with Zipf-Mandelbrot
    frequencies (word `r` fills a share of it proportional to 1 / (r + 2.7))."""
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr", "ch", "th"]
    nuclei = ["a", "e", "i", "o", "u", "ea", "ou", "ai"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "ng", "st"]
    words: dict[str, None] = {}
    while len(words) < VOCABULARY:
        syllables = int(rng.choice([1, 2, 3, 4], p=[0.25, 0.4, 0.25, 0.1]))
        parts = rng.integers(0, [len(onsets), len(nuclei), len(codas)], size=(syllables, 3))
        word = "".join(onsets[a] + nuclei[b] + codas[c] for a, b, c in parts)
        if len(word) <= MAX_WORD:
            words.setdefault(word, None)
    weights = 1.0 / (np.arange(VOCABULARY) + 2.7)
    table = np.repeat(np.arange(VOCABULARY, dtype=np.int32), np.round(weights / weights.sum() * 2**22).astype(int))
    return [w.encode() for w in sorted(words, key=len)], table


def token_table(words: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Every token's bytes, padded to `TOKEN_WIDTH`, and which of those bytes are its own, by token id."""
    tokens = [
        (w.capitalize() if capital else w) + ending
        for ending in ENDINGS for capital in (False, True) for w in words
    ] + [b'{"text": "', b'"}\n']
    padded = np.array(tokens, dtype=f"S{TOKEN_WIDTH}").view(np.uint8).reshape(len(tokens), TOKEN_WIDTH)
    lengths = np.array([len(t) for t in tokens])
    return padded, np.arange(TOKEN_WIDTH) < lengths[:, None]


def chunk_tokens(rng: np.random.Generator, table: np.ndarray, duplicates: float) -> tuple[np.ndarray, ...]:
    """`DOCS_PER_CHUNK` documents as one array of token ids, each document's first token and its
    kind (0 original, 1 exact copy, 2 near copy)."""
    n = DOCS_PER_CHUNK
    counts = rng.integers(WORDS_PER_DOC[0], WORDS_PER_DOC[1] + 1, size=n)
    words = table[rng.integers(0, len(table), size=int(counts.sum()))].astype(np.int64)
    ends = rng.random(len(words))
    ending = np.where(ends < SENTENCE_END * PARAGRAPH_END, 2, np.where(ends < SENTENCE_END, 1, 0))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ending[starts + counts - 1] = 3
    capital = np.ones(len(words), dtype=np.int64)
    capital[1:] = ending[:-1] > 0  # after a sentence end (documents end with one too)
    drawn = (2 * ending + capital) * VOCABULARY + words

    # A copy repeats an earlier original of its chunk (the words drawn at its own place go unused),
    # so any prefix of the corpus holds the originals of its copies.
    kind = rng.choice(3, size=n, p=[1 - 2 * duplicates, duplicates, duplicates])
    kind[0] = 0
    originals = np.flatnonzero(kind == 0)
    before = np.cumsum(kind == 0) - (kind == 0)  # originals before each document
    source = np.where(kind == 0, np.arange(n), originals[(rng.random(n) * before).astype(int)])
    sizes = counts[source] + 2
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    inside = np.arange(int(sizes.sum())) - np.repeat(first, sizes) - 1  # -1 and count: start and end
    tokens = drawn[np.clip(np.repeat(starts[source], sizes) + inside, 0, len(drawn) - 1)]
    tokens[first], tokens[first + sizes - 1] = DOC_START, DOC_END
    near = np.flatnonzero(kind == 2)
    for _ in range(NEAR_EDITS):  # replace a word, keeping its capitalisation and ending
        at = first[near] + 1 + (rng.random(len(near)) * counts[source[near]]).astype(int)
        tokens[at] += rng.integers(0, VOCABULARY, size=len(near)) - tokens[at] % VOCABULARY
    return tokens, first, kind


def write_corpus(path: Path, megabytes: float, duplicates: float, seed: int) -> dict[str, int]:
    """Write documents until `megabytes` (10^6 bytes) is reached; the last one may go past it."""
    rng = np.random.default_rng(seed)
    words, table = vocabulary(rng)
    padded, own = token_table(words)
    lengths, target, written = own.sum(axis=1), int(megabytes * 1e6), 0
    stats = {"documents": 0, "exact": 0, "near": 0}
    with path.open("wb") as handle:
        while written < target:
            tokens, first, kind = chunk_tokens(rng, table, duplicates)
            ends = np.cumsum(np.add.reduceat(lengths[tokens], first))
            keep = min(len(first), int(np.searchsorted(ends, target - written)) + 1)
            cut = first[keep] if keep < len(first) else len(tokens)
            handle.write(padded[tokens[:cut]][own[tokens[:cut]]].tobytes())
            written += int(ends[keep - 1])
            stats["documents"] += keep
            stats["exact"] += int((kind[:keep] == 1).sum())
            stats["near"] += int((kind[:keep] == 2).sum())
    stats["bytes"] = written
    return stats


def start_cluster(nodes: int, num_cpus: int, root: Path) -> tuple[str, list[str]]:
    """A head node and `nodes - 1` worker nodes on this machine; (address, node ids).

    Ray 2.59+ turns token authentication on for a local head when a token exists (`ray.init()` writes
    one to ~/.ray/auth_token): every process of the benchmark, and the run it starts, sets
    RAY_AUTH_MODE=token so that they all present it.
    """
    os.environ["RAY_AUTH_MODE"] = "token"  # before Ray is imported: its configuration is read then
    import ray

    port = 6390
    ray_cli = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray_cli, "get-auth-token", "--generate"], check=True, capture_output=True)
    common = [f"--num-cpus={num_cpus}", "--disable-usage-stats"]
    subprocess.run([ray_cli, "start", "--head", f"--port={port}", f"--temp-dir={root / 'ray'}", *common],
                   check=True, capture_output=True)
    address = f"127.0.0.1:{port}"
    for _ in range(nodes - 1):
        subprocess.run([ray_cli, "start", f"--address={address}", *common], check=True, capture_output=True)
    try:
        ray.init(address=address, logging_level=logging.ERROR)
        node_ids = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
        ray.shutdown()
    except BaseException:
        stop_cluster(root)
        raise
    return address, node_ids


def stop_cluster(root: Path) -> None:
    """Stop the cluster's processes: those whose command line names its temporary folder (`ray stop`
    would stop every Ray process on the machine, a test run's included)."""
    ours = [p for p in psutil.process_iter(["cmdline"]) if str(root / "ray") in " ".join(p.info["cmdline"] or [])]
    for process in ours:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(ours, timeout=30)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def run_data_stage(root: Path, corpus: Path, num_cpus: int | None, address: str | None = None) -> dict[str, Any]:
    """`kubeforge run` on a data-only manifest in a fresh work directory under `root`, sampling the
    driver's RSS; returns the data stage's result.json with the samples' peak and the wall time."""
    manifest = root / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelPipeline", "metadata": {"name": PIPELINE},
        "spec": {"data": {"sources": [{"type": "files", "paths": [str(corpus)]}]}},
    }))
    workdir = root / "work"
    command = [sys.executable, "-m", "kubeforge.cli", "run", str(manifest), "--workdir", str(workdir), "--no-metrics"]
    if num_cpus and not address:
        command += ["--num-cpus", str(num_cpus)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    if address:
        env["RAY_ADDRESS"] = address
    log = root / "run.log"
    peak_rss = peak_shared = 0
    started = time.monotonic()
    with log.open("wb") as output:
        # Its own process group, which Ray's GCS and raylet join (its workers, in groups of their own,
        # exit with the raylet): a terminal's Ctrl-C reaches only this script, which passes it on.
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        driver = psutil.Process(process.pid)
        while process.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                memory = driver.memory_info()
                if memory.rss > peak_rss:
                    peak_rss, peak_shared = memory.rss, memory.shared
            time.sleep(SAMPLE_S)
    except BaseException:  # KeyboardInterrupt above all: the run records itself interrupted and stops Ray
        stop(process, signal.SIGINT)
        raise
    finally:
        stop(process, signal.SIGKILL)  # whatever of its group outlived it
    wall = time.monotonic() - started
    if process.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"kubeforge run exited with status {process.returncode}; {log} ends with:\n{tail}")
    (stage,) = (workdir / "pipelines" / PIPELINE / "stages").glob("data-*")
    result: dict[str, Any] = json.loads((stage / "result.json").read_text())
    card = json.loads((stage / "card.json").read_text())
    # Versions before the card's `work_per_node` (the "before" of a side-by-side run) report no nodes.
    nodes = card.get("work_per_node", {})
    return result | {"peak_rss": peak_rss, "peak_shared": peak_shared, "wall_seconds": wall, "nodes": nodes}


def stop(process: subprocess.Popen[bytes], sig: int, grace_s: float = 60.0) -> None:
    """Send `sig` to the process group of `process` and wait for it; SIGKILL after `grace_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="30,121", help="corpus sizes in MB (10^6 bytes), comma-separated")
    parser.add_argument("--duplicates", type=float, default=0.05, help="share of exact copies, and of near copies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray runtime (default: all)")
    parser.add_argument("--keep", type=Path, help="keep corpora, manifests, logs and work directories here")
    parser.add_argument("--nodes", type=int, help="run on a Ray cluster of this many nodes on this machine")
    args = parser.parse_args()
    sizes = sorted(float(s) for s in args.sizes.split(","))

    print(f"machine: {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), Python "
          f"{platform.python_version()}, Ray {importlib.metadata.version('ray')}")
    with tempfile.TemporaryDirectory(prefix="bench-data-scale-") as tmp:
        base = args.keep or Path(tmp)
        address = None
        if args.nodes:
            address, node_ids = start_cluster(args.nodes, args.num_cpus or 1, Path(tmp))
            print(f"cluster: {len(node_ids)} nodes of {args.num_cpus or 1} CPUs at {address}")
        rows = []
        try:
            rows = run_sizes(sizes, base, args, address)
        finally:
            if args.nodes:
                stop_cluster(Path(tmp))

    print(f"{'MB':>7}{'docs in':>10}{'docs out':>10}{'exact rm':>9}{'near rm':>8}{'qual rm':>8}{'stage s':>9}"
          f"{'wall s':>8}{'MB/s':>7}{'peak RSS MiB':>13}{'shared':>8}{'RSS ratio':>10}")
    for r in rows:
        print(f"{r['mb']:>7.1f}{r['docs_in']:>10,}{r['docs_out']:>10,}{r['exact']:>9,}{r['near']:>8,}"
              f"{r['quality']:>8,}{r['stage_s']:>9.1f}{r['wall_s']:>8.1f}{r['mb'] / r['stage_s']:>7.2f}"
              f"{r['rss']:>13.0f}{r['shared']:>8.0f}{r['rss'] / rows[0]['rss']:>10.2f}")
        for node, work in r["nodes"].items():
            print(f"        node {node}: {work['items']} work items, {work['seconds']:.1f} s busy")


def run_sizes(sizes: list[float], base: Path, args: argparse.Namespace, address: str | None) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        root = base / f"{size:g}MB"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        corpus = root / "corpus.jsonl"
        cpu = time.process_time()
        made = write_corpus(corpus, size, args.duplicates, args.seed)
        print(f"{size:g} MB: {made['documents']:,} documents ({made['exact']:,} exact and {made['near']:,} "
              f"near copies) generated in {time.process_time() - cpu:.1f} CPU s; running the data stage")
        result = run_data_stage(root, corpus, args.num_cpus, address)
        removed = {row["step"]: row["removed"] for row in result["funnel"]}
        rows.append({
            "mb": made["bytes"] / 1e6, "docs_in": result["funnel"][0]["documents_in"],
            "docs_out": result["funnel"][-1]["documents_out"], "exact": removed["exact_dedup"],
            "near": removed["fuzzy_dedup"], "quality": removed["quality"],
            "stage_s": result["_kubeforge"]["duration_seconds"], "wall_s": result["wall_seconds"],
            "rss": result["peak_rss"] / 2**20, "shared": result["peak_shared"] / 2**20, "nodes": result["nodes"],
        })
        if not args.keep:
            shutil.rmtree(root)
    return rows


if __name__ == "__main__":
    main()
