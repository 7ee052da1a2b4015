"""The augment step's paraphrases from a real OpenAI-compatible server: the session's tiny model served by
`kubeforge serve`'s own path (`serve_deployment`, the transformers engine, as in test_serve_local.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kubeforge.data.augment import paraphrase_documents
from kubeforge.serve.local import ServeOptions, serve_deployment
from kubeforge.spec.data import ParaphraseSpec
from kubeforge.spec.load import parse_deployment
from kubeforge.workdir import Workdir
from tests.helpers import free_port
from tests.integration.test_serve_local import MODEL, registry_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


class Served(Exception):
    """Stops `serve_deployment`, which serves until Ctrl-C, once the paraphrases are in."""


def test_paraphrases_from_a_model_served_by_kubeforge_serve(ray_local, tiny_lm, tmp_path: Path) -> None:
    from ray import serve

    registry = registry_of(tiny_lm.pretrain.directory / "model", tmp_path)
    port = free_port()
    document = parse_deployment({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "augment"},
        "spec": {"model": f"models:/{MODEL}@champion", "port": port,
                 "engine": {"name": "transformers", "max_model_len": 256}, "resources": {"cpus_per_replica": 0.25}},
    })
    # Greedy decoding makes this tiny model repeat blank lines, which is an empty paraphrase; sampling with
    # a seed gives text, the same on every run.
    spec = ParaphraseSpec(endpoint=f"http://127.0.0.1:{port}/v1", model=MODEL, prompt_template="Rewrite: {text}",
                          max_tokens=32, temperature=1.0, sampling_seed=0, max_concurrency=2)
    frame = pd.DataFrame({"id": ["a.py", "b.py", "c.py"], "source": ["python-stdlib"] * 3,
                          "text": ["def add(a, b):\n    return a + b\n", "import os\n", "class Point:\n    pass\n"]})
    results = []

    def on_line(line: str) -> None:
        if line.startswith("serving "):  # said once the application is running
            results.append(paraphrase_documents(frame, spec))
            raise Served

    try:
        with pytest.raises(Served):
            serve_deployment(document, ServeOptions(workdir=Workdir(tmp_path / "work"), registry=registry), on_line)
    finally:
        serve.shutdown()
    out, stats = results[0]
    assert list(out["id"]) == ["a.py#paraphrase", "b.py#paraphrase", "c.py#paraphrase"]
    assert list(out["augmented_from"]) == ["a.py", "b.py", "c.py"] and all(text.strip() for text in out["text"])
    assert stats["requests"] == 3 and stats["completion_tokens"] > 0
