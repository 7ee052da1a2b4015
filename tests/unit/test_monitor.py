"""The deployment monitor: its windows over capture files, its signals, what it exports, and its manifest."""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubeforge import metrics
from kubeforge.errors import KubeForgeError
from kubeforge.monitor.check import Monitor, Scorer
from kubeforge.monitor.runner import MonitorRunner
from kubeforge.monitor.window import TrafficWindows
from kubeforge.serve.capture import SCHEMA
from kubeforge.spec.load import SpecError, parse_deployment
from kubeforge.spec.monitor import MonitorSpec

pytestmark = pytest.mark.unit

WORDS = [f"w{i}" for i in range(40)]


def write_capture(folder: Path, name: str, rows: list[tuple[str, int, str]]) -> None:
    """A capture file of (version, status, prompt) rows, as the router writes it."""
    table = pa.Table.from_pylist([
        {"time": float(i), "request_id": f"{name}-{i}", "endpoint": "/v1/completions", "model": "m",
         "variant": "stable", "version": version, "status": status, "latency_s": 0.1, "prompt": prompt,
         "completion": "x"}
        for i, (version, status, prompt) in enumerate(rows)
    ], schema=SCHEMA)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / f"traffic-{name}.parquet")


def test_the_reference_is_the_versions_first_prompts_and_the_current_the_latest_after_them(tmp_path: Path) -> None:
    folder = tmp_path / "traffic"
    write_capture(folder, "20260101T000000Z-a", [
        ("1", 200, "p0"), ("2", 200, "other version"), ("1", 500, "failed"), ("1", 200, "p1"), ("1", 200, "p2"),
    ])
    write_capture(folder, "20260101T000100Z-b", [("1", 200, f"p{i}") for i in range(3, 9)])
    windows = TrafficWindows(str(folder), size=3)
    seen, problems = windows.update("1")
    assert problems == []
    assert seen.reference == ["p0", "p1", "p2"]  # only version 1's answered prompts, in time order
    assert list(seen.current) == ["p6", "p7", "p8"]  # the latest three after the reference
    # A later file is read on the next update; earlier files are not read again.
    write_capture(folder, "20260101T000200Z-c", [("1", 200, "p9")])
    (folder / "traffic-20260101T000000Z-a.parquet").write_bytes(b"not parquet any more")
    seen, problems = windows.update("1")
    assert problems == [] and list(seen.current) == ["p7", "p8", "p9"] and seen.reference == ["p0", "p1", "p2"]
    # Another version starts over from the first file; a damaged file is named and skipped.
    seen, problems = windows.update("2")
    assert len(problems) == 1 and "traffic-20260101T000000Z-a.parquet" in problems[0]
    assert seen.reference == [] and list(seen.current) == []


class WordScorer(Scorer):
    """Whitespace words as tokens, and a fixed per-word loss: no model needed for the statistics' wiring."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir

    def tokens(self, prompts: Any) -> list[list[int]]:
        return [[int(word[1:]) for word in prompt.split()] for prompt in prompts]

    def nll(self, rows: Any) -> list[float]:
        # Words w20 and above are "unfamiliar": a loss of 3 nats against 1.
        return [sum(3.0 if t >= 20 else 1.0 for t in row) / len(row) for row in rows if len(row) >= 2]


def prompts(rng: random.Random, n: int, words: list[str], lengths: tuple[int, int]) -> list[str]:
    return [" ".join(rng.choice(words) for _ in range(rng.randint(*lengths))) for _ in range(n)]


THRESHOLDS = {"prompt_length_psi": 0.25, "prompt_length_ks": 0.3, "token_js": 0.2, "loglik_shift": 0.5}


def monitor_over(tmp_path: Path, current: list[str], reference: list[str], **spec: Any) -> Monitor:
    write_capture(tmp_path / "t", "1", [("1", 200, p) for p in reference + current])
    monitor_spec = MonitorSpec.model_validate({"window_requests": 200, "min_requests": 50,
                                               "thresholds": THRESHOLDS, **spec})
    return Monitor(monitor_spec, "m", str(tmp_path / "t"), None, scorer=WordScorer)


def test_same_traffic_crosses_nothing_and_a_planted_shift_crosses_every_traffic_signal(tmp_path: Path) -> None:
    rng = random.Random(0)
    reference = prompts(rng, 200, WORDS[:20], (4, 12))
    same = monitor_over(tmp_path / "same", prompts(rng, 200, WORDS[:20], (4, 12)), reference)
    reading = same.check("1", tmp_path)
    assert {s.name for s in reading.signals} == set(THRESHOLDS) and reading.missing == {}
    assert reading.crossed == [], reading.to_dict()
    # Longer prompts in a vocabulary the model finds unfamiliar: every statistic moves past its threshold.
    shifted = monitor_over(tmp_path / "shifted", prompts(rng, 200, WORDS[20:], (20, 40)), reference)
    reading = shifted.check("1", tmp_path)
    values = {s.name: s.value for s in reading.crossed}
    assert set(values) == set(THRESHOLDS), reading.to_dict()
    assert values["loglik_shift"] == pytest.approx(2.0)  # 3 nats against 1: the sign says "less familiar"
    assert all(s.reference_size == 200 and s.current_size == 200 for s in reading.signals)


def test_traffic_unlike_the_training_corpus_crosses_token_js_training(tmp_path: Path) -> None:
    import json

    rng = random.Random(4)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):  # more files than the sample takes documents from: one from each of evenly spaced files
        (corpus / f"part-{i:02}.jsonl").write_text("".join(
            json.dumps({"text": text}) + "\n" for text in prompts(rng, 5, WORDS[:20], (20, 40))))
    # The reference window is unlike the corpus: what is compared with the corpus is the current window alone.
    reference = prompts(rng, 200, WORDS[20:], (4, 12))

    def reading(current: list[str], folder: str) -> Any:
        spec = {"thresholds": {"token_js_training": 0.2}, "training_data": [{"type": "files", "paths": ["corpus/*"]}]}
        monitor = monitor_over(tmp_path / folder, current, reference, **spec)
        monitor.base_dir = tmp_path
        return monitor.check("1", tmp_path)

    # Prompts in the corpus's vocabulary stay below; prompts in a vocabulary it never had cross.
    same = reading(prompts(rng, 200, WORDS[:20], (4, 12)), "same")
    assert [s.name for s in same.signals] == ["token_js_training"] and same.crossed == [], same.to_dict()
    shifted = reading(prompts(rng, 200, WORDS[20:], (4, 12)), "shifted")
    assert [s.name for s in shifted.crossed] == ["token_js_training"], shifted.to_dict()
    # A corpus that cannot be read loses this signal only, naming the field, and is tried again next check.
    spec = {"thresholds": {"token_js_training": 0.2, "token_js": 0.2},
            "training_data": [{"type": "files", "paths": ["gone/*.jsonl"]}]}
    broken = monitor_over(tmp_path / "broken", prompts(rng, 200, WORDS[:20], (4, 12)), reference, **spec)
    missed = broken.check("1", tmp_path)
    assert [s.name for s in missed.signals] == ["token_js"]
    assert missed.missing["token_js_training"].startswith("spec.monitor.training_data[0].paths: no file matches")


def test_the_training_sample_is_bounded_and_spread_over_the_files(tmp_path: Path) -> None:
    from kubeforge.monitor.window import training_sample
    from kubeforge.spec.data import FilesSource

    for i in range(10):
        (tmp_path / f"f{i}.txt").write_text(f"file {i} " + "x" * 10_000)
    source = FilesSource(type="files", paths=("f*.txt",))
    sample = training_sample([source], 5, tmp_path)
    assert [text.split()[1] for text in sample] == ["0", "2", "4", "6", "8"]
    assert all(len(text) == 4096 for text in sample)
    assert len(training_sample([source], 50, tmp_path)) == 10  # every file once, no more than there is


def test_too_few_prompts_compute_no_traffic_signal(tmp_path: Path) -> None:
    rng = random.Random(1)
    monitor = monitor_over(tmp_path, prompts(rng, 49, WORDS[20:], (20, 40)), prompts(rng, 200, WORDS[:20], (4, 8)))
    reading = monitor.check("1", tmp_path)
    assert reading.signals == () and reading.crossed == []
    assert set(reading.missing) == set(THRESHOLDS)
    assert "49 current prompts" in reading.missing["token_js"] and "needs 50" in reading.missing["token_js"]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_prometheus_makes_the_monitor_blind_and_its_signals_absent(tmp_path: Path) -> None:
    rng = random.Random(2)
    write_capture(tmp_path / "t", "1", [("1", 200, p) for p in prompts(rng, 120, WORDS[:20], (4, 8))])
    spec = MonitorSpec.model_validate({"window_requests": 60, "min_requests": 50,
                                       "thresholds": {"token_js": 0.2, "error_rate": 0.05, "p95_latency_s": 2.0}})
    monitor = Monitor(spec, "m", str(tmp_path / "t"), f"http://127.0.0.1:{closed_port()}", scorer=WordScorer)
    runner = MonitorRunner("blind-test", monitor, lambda: ("1", tmp_path))
    reading = runner.check_once()
    assert reading is not None and reading.blind
    assert [s.name for s in reading.signals] == ["token_js"]
    assert set(reading.missing) == {"error_rate", "p95_latency_s"}
    assert "cannot reach Prometheus" in reading.missing["error_rate"]
    exported = metric_samples("blind-test")
    assert exported["kubeforge_monitor_blind"] == {(): 1.0}
    assert set(exported["kubeforge_monitor_signal"]) == {("token_js",)}  # the missing signals have no series
    assert exported["kubeforge_monitor_threshold"][("error_rate",)] == 0.05
    assert exported["kubeforge_monitor_window_prompts"] == {("reference",): 60.0, ("current",): 60.0}


def test_a_signal_no_longer_computed_loses_its_series(tmp_path: Path) -> None:
    rng = random.Random(3)
    folder = tmp_path / "t"
    write_capture(folder, "1", [("1", 200, p) for p in prompts(rng, 120, WORDS[:20], (4, 8))])
    spec = MonitorSpec.model_validate({"window_requests": 60, "min_requests": 50, "thresholds": {"token_js": 0.2}})
    served = {"version": "1"}
    runner = MonitorRunner("stale-test", Monitor(spec, "m", str(folder), None, scorer=WordScorer),
                           lambda: (served["version"], tmp_path))
    runner.check_once()
    assert set(metric_samples("stale-test")["kubeforge_monitor_signal"]) == {("token_js",)}
    served["version"] = "2"  # a promoted version has no reference yet
    reading = runner.check_once()
    assert reading is not None and reading.signals == ()
    assert metric_samples("stale-test").get("kubeforge_monitor_signal", {}) == {}


def metric_samples(deployment: str) -> dict[str, dict[tuple[str, ...], float]]:
    """{metric: {other label values: value}} of one deployment's monitor series."""
    found: dict[str, dict[tuple[str, ...], float]] = {}
    for family in metrics.REGISTRY.collect():
        for sample in family.samples:
            if sample.name.startswith("kubeforge_monitor_") and sample.labels.get("deployment") == deployment:
                rest = tuple(v for k, v in sample.labels.items() if k != "deployment")
                found.setdefault(sample.name, {})[rest] = sample.value
    return found


def tiny_model(folder: Path) -> Any:
    """A one-layer Llama over WORDS with a word-level tokenizer, saved to `folder`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<unk>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


def test_scorer_nll_is_the_same_batched_with_padding_as_one_row_at_a_time(tmp_path: Path) -> None:
    """Rows of different lengths share a padded batch: padding must change no row's loss."""
    import torch

    model = tiny_model(tmp_path)
    scorer = Scorer(tmp_path)
    rows = scorer.tokens(["w1 w2 w3", "w4 w5 w6 w7 w8 w9 w10", "w11", "w12 w13"])
    assert rows[0] == [2, 3, 4]
    batched = scorer.nll(rows)
    assert len(batched) == 3  # the one-token row has nothing to predict
    with torch.no_grad():
        for row, value in zip([r for r in rows if len(r) >= 2], batched, strict=True):
            logits = model(input_ids=torch.tensor([row])).logits[0, :-1]
            expected = torch.nn.functional.cross_entropy(logits, torch.tensor(row[1:])).item()
            assert value == pytest.approx(expected, rel=1e-4)


def test_on_a_cluster_the_monitor_replica_scores_the_version_its_user_config_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubeforge.serve import resolve
    from kubeforge.serve.monitor_server import MonitorServer

    tiny_model(tmp_path / "model")
    downloads: list[str] = []

    def download(source: str, engine: str, device: str) -> Path:
        downloads.append(source)
        return tmp_path / "model"

    monkeypatch.setattr(resolve, "replica_model_folder", download)
    rng = random.Random(3)
    write_capture(tmp_path / "t", "1", [("1", 200, p) for p in prompts(rng, 100, WORDS[:20], (4, 8))
                                        + prompts(rng, 100, WORDS[20:], (20, 30))])
    spec = {"interval_s": 3600, "window_requests": 100, "min_requests": 50, "thresholds": {"token_js": 0.2}}
    server = MonitorServer.func_or_class("replica-test", spec, "m", str(tmp_path / "t"), None)
    try:
        # Until the operator's user_config names the served version, a check has nothing to score.
        assert server.runner.check_once() is None and downloads == []
        server.reconfigure({"version": "1"})
        reading = server.runner.check_once()
        assert reading is not None and [s.name for s in reading.crossed] == ["token_js"]
        server.runner.check_once()
        assert downloads == ["models:/m/1"]  # once per version
        text = server.exposition().decode()
        assert 'kubeforge_monitor_signal{deployment="replica-test",signal="token_js"}' in text
        assert 'kubeforge_monitor_threshold{deployment="replica-test",signal="token_js"} 0.2' in text
    finally:
        server.__del__()
    server.thread.join(timeout=10)
    assert not server.thread.is_alive()


def deployment(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "d"},
            "spec": {"model": "models:/m@champion", **spec}}


@pytest.mark.parametrize(("spec", "where", "words"), [
    ({"monitor": {"thresholds": {"token_js": 0.2}}}, "spec.monitor.thresholds", "set capture"),
    ({"capture": {}, "monitor": {"thresholds": {}}}, "spec.monitor.thresholds", "at least one signal"),
    ({"capture": {}, "monitor": {"thresholds": {"drift": 0.2}}}, "spec.monitor.thresholds.drift", ""),
    ({"capture": {}, "monitor": {"thresholds": {"token_js": 1.5}}}, "spec.monitor.thresholds.token_js", ""),
    ({"capture": {}, "monitor": {"thresholds": {"token_js": 0.2}, "min_requests": 600, "window_requests": 500}},
     "spec.monitor", "min_requests (600) is above window_requests (500)"),
    ({"capture": {}, "monitor": {"thresholds": {"token_js_training": 0.2}}}, "spec.monitor", "set both or neither"),
    ({"capture": {}, "monitor": {"thresholds": {"token_js": 0.2}, "training_data": [{"type": "python-stdlib"}]}},
     "spec.monitor", "set both or neither"),
])
def test_a_monitor_without_what_it_needs_is_refused_naming_the_field(spec: dict[str, Any], where: str,
                                                                      words: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_deployment(deployment(**spec))
    text = str(info.value)
    assert where in text and words in text, text


def test_slo_signals_without_a_prometheus_are_refused_before_serving(tmp_path: Path) -> None:
    from kubeforge.registry.client import Registry
    from kubeforge.serve.local import ServeOptions, make_monitor
    from kubeforge.workdir import Workdir

    options = ServeOptions(workdir=Workdir(tmp_path), registry=Registry(f"sqlite:///{tmp_path}/m.db"))
    document = parse_deployment(deployment(monitor={"thresholds": {"error_rate": 0.05}}))
    with pytest.raises(KubeForgeError, match=r"spec\.monitor\.prometheus: required for error_rate"):
        make_monitor(document, options)
    named = parse_deployment(deployment(monitor={"thresholds": {"error_rate": 0.05},
                                                 "prometheus": "http://localhost:9090"}))
    assert make_monitor(named, options).prometheus == "http://localhost:9090"


def test_a_training_corpus_with_no_file_is_refused_before_serving_and_found_from_the_manifests_folder(
        tmp_path: Path) -> None:
    from kubeforge.registry.client import Registry
    from kubeforge.serve.local import ServeOptions, make_monitor
    from kubeforge.workdir import Workdir

    monitor = {"thresholds": {"token_js_training": 0.2}, "training_data": [{"type": "files", "paths": ["c/*.txt"]}]}
    document = parse_deployment(deployment(capture={}, monitor=monitor))
    options = ServeOptions(workdir=Workdir(tmp_path / "w"), registry=Registry(f"sqlite:///{tmp_path}/m.db"),
                           base_dir=tmp_path)
    with pytest.raises(KubeForgeError, match=r"^spec\.monitor\.training_data\[0\]\.paths: no file matches 'c/\*\.txt'"):
        make_monitor(document, options)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("w1 w2")
    assert make_monitor(document, options).base_dir == tmp_path
