"""The quantize environment (.venv-quantize): running functions there, and llm-compressor on CPU.

The tests that need the environment are skipped when it is missing; `make test` builds it
(`bash infra/local/install.sh test` builds both environments). The llm-compressor tests quantize
the session's trained tiny model (`tiny_lm`): on a randomly initialised model every perplexity is
about the vocabulary size, before and after, so the 3% check would prove nothing.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from kubeforge import envs
from kubeforge.errors import KubeForgeError, StageError
from kubeforge.quantize import llmc
from kubeforge.quantize.perplexity import perplexity
from tests.stage_fixtures import TinyLM

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VOCAB = 16


def pinned(name: str) -> str:
    text = (REPO / "infra" / "envs" / "quantize.txt").read_text()
    match = re.search(rf"^{re.escape(name)}==(\S+)$", text, re.MULTILINE)
    assert match, f"infra/envs/quantize.txt pins no {name}"
    return match.group(1)


@pytest.fixture(scope="module")
def quantize_env(ray_local) -> str:
    try:
        python = envs.python_for(envs.QUANTIZE)
    except KubeForgeError as exc:
        # `make test` builds it: a missing environment is a broken install, not a reason to skip.
        pytest.fail(f"no quantize environment ({exc}); `make test` builds it with infra/local/install.sh")
    assert python is not None, "the main environment must not have llm-compressor (its pins conflict with vLLM's)"
    return python


# --- running a function in the quantize environment ---------------------------------------------


def test_run_in_env_runs_in_the_quantize_interpreter(quantize_env: str) -> None:
    import transformers

    inside = envs.run_in_env(envs.QUANTIZE, llmc.environment)

    assert inside["executable"] == quantize_env
    assert inside["transformers"] == pinned("transformers")
    assert inside["llmcompressor"] == pinned("llmcompressor")
    assert inside["compressed_tensors"] == pinned("compressed-tensors")
    assert transformers.__version__ != inside["transformers"]  # the reason the environment exists


def test_run_in_env_returns_our_errors_as_themselves(quantize_env: str, tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"^stage quantize: .*/missing: no config.json") as info:
        envs.run_in_env(
            envs.QUANTIZE, llmc.quantize, str(tmp_path / "missing"), str(tmp_path / "out"), "fp8", None,
            str(tmp_path / "eval.npy"), 4, 0.8, ["lm_head"],
        )
    assert type(info.value) is StageError
    assert info.value.stage == "quantize"


# --- llm-compressor on the trained tiny model -----------------------------------------------------


@pytest.fixture(scope="module")
def tokens(tiny_lm: TinyLM, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Calibration rows from the train split, evaluation rows from the test split, as .npy files."""
    root = tmp_path_factory.mktemp("quantize-tokens")
    shards = tiny_lm.data.result.shards

    def rows(split: str, count: int) -> np.ndarray:
        arrays = [np.load(tiny_lm.data.directory / p) for p in shards[split]]
        return np.concatenate(arrays)[:count]

    calibration, evaluation = rows("train", 32), rows("test", 16)
    np.save(root / "calibration.npy", calibration)
    np.save(root / "eval.npy", evaluation)
    return SimpleNamespace(
        root=root, calibration=str(root / "calibration.npy"), eval=str(root / "eval.npy"),
        pad_id=tiny_lm.data.result.special_tokens["pad_id"], rows=len(calibration),
    )


def quantize(tiny_lm: TinyLM, tokens: SimpleNamespace, scheme: str, ignore: list[str]) -> tuple[Path, dict]:
    model_dir = tiny_lm.pretrain.directory / tiny_lm.pretrain.result.model_dir
    out = tokens.root / scheme
    result = envs.run_in_env(
        envs.QUANTIZE, llmc.quantize, str(model_dir), str(out), scheme, tokens.calibration, tokens.eval, 8, 0.8,
        ignore, pad_id=tokens.pad_id,
    )
    return out, result


def original_size(tiny_lm: TinyLM) -> int:
    model_dir = tiny_lm.pretrain.directory / tiny_lm.pretrain.result.model_dir
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def test_w8a8_keeps_perplexity_and_writes_compressed_tensors(
    quantize_env: str, tiny_lm: TinyLM, tokens: SimpleNamespace
) -> None:
    out, result = quantize(tiny_lm, tokens, "w8a8-int8", ["lm_head"])

    assert result["scheme"] == "w8a8-int8"
    assert result["format"] == "compressed-tensors"
    assert result["calibration_samples"] == tokens.rows
    assert result["llmcompressor"] == pinned("llmcompressor")
    # Trained, so well below the vocabulary size: the comparison below means something.
    assert result["perplexity_before"] < 0.5 * tiny_lm.data.result.vocab_size
    assert result["perplexity_after"] == pytest.approx(result["perplexity_before"], rel=0.03)

    config = json.loads((out / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors"
    assert quantization["format"] == "int-quantized"
    assert "lm_head" in quantization["ignore"]
    assert result["size_bytes"] == sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert 0 < result["size_bytes"] < original_size(tiny_lm)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    # llm-compressor writes no log folder into the working directory (older releases made sparse_logs/).
    assert not (REPO / "sparse_logs").exists()


def test_w4a16_names_the_layers_its_group_size_does_not_fit(
    quantize_env: str, tiny_lm: TinyLM, tokens: SimpleNamespace
) -> None:
    # The tiny model's MLP is 352 wide: not a multiple of W4A16's group of 128 input columns.
    with pytest.raises(StageError, match=r"model\.layers\.0\.mlp\.down_proj .*Add them to quantize\.ignore"):
        quantize(tiny_lm, tokens, "w4a16", ["lm_head"])


@pytest.mark.parametrize(("scheme", "ignore", "weights_format"), [
    ("w4a16", ["lm_head", "re:.*down_proj$"], "pack-quantized"),
    ("fp8", ["lm_head"], "float-quantized"),
])
def test_gpu_schemes_produce_artefacts_on_cpu(
    quantize_env: str, tiny_lm: TinyLM, tokens: SimpleNamespace, scheme: str, ignore: list[str], weights_format: str
) -> None:
    out, result = quantize(tiny_lm, tokens, scheme, ignore)

    assert result["calibration_samples"] == (tokens.rows if scheme == "w4a16" else 0)
    assert math.isfinite(result["perplexity_after"])
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == weights_format
    assert 0 < result["size_bytes"] < original_size(tiny_lm)


# --- where the interpreter comes from -------------------------------------------------------------


def test_an_explicit_interpreter_that_does_not_exist_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KUBEFORGE_PYTHON_QUANTIZE", str(tmp_path / "nowhere" / "python"))
    with pytest.raises(KubeForgeError, match=r"^KUBEFORGE_PYTHON_QUANTIZE=.*/nowhere/python: no executable Python"):
        envs.python_for(envs.QUANTIZE)


def test_a_missing_environment_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KUBEFORGE_PYTHON_QUANTIZE", raising=False)
    monkeypatch.setattr(envs, "REPO_ROOT", tmp_path)
    with pytest.raises(KubeForgeError) as info:
        envs.python_for(envs.QUANTIZE)
    message = str(info.value)
    assert "cannot import llmcompressor" in message
    assert str(tmp_path / ".venv-quantize" / "bin" / "python") in message
    assert "bash infra/local/install.sh quantize" in message
    assert "KUBEFORGE_PYTHON_QUANTIZE" in message


def test_the_checkout_environment_is_found_without_configuration(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    python = tmp_path / ".venv-quantize" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    monkeypatch.delenv("KUBEFORGE_PYTHON_QUANTIZE", raising=False)
    monkeypatch.setattr(envs, "REPO_ROOT", tmp_path)
    assert envs.python_for(envs.QUANTIZE) == str(python)


def test_a_function_runs_in_process_when_this_interpreter_is_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBEFORGE_PYTHON_QUANTIZE", raising=False)
    monkeypatch.setitem(envs.MARKERS, envs.QUANTIZE, "json")  # any module this interpreter has
    assert envs.python_for(envs.QUANTIZE) is None
    assert envs.run_in_env(envs.QUANTIZE, divmod, 7, 2) == (3, 1)


def test_an_interpreter_that_cannot_run_a_worker_is_refused_before_ray_hangs_on_it(
    ray_local, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A bare virtual environment: no ray, no kubeforge. Ray would retry starting a worker forever.
    import venv

    venv.create(tmp_path / "bare", with_pip=False)
    monkeypatch.setenv("KUBEFORGE_PYTHON_QUANTIZE", str(tmp_path / "bare" / "bin" / "python"))
    with pytest.raises(KubeForgeError, match=r"has ray \(none\).*cannot import kubeforge.*cannot import llmcompressor"):
        envs.run_in_env(envs.QUANTIZE, llmc.environment)


# --- perplexity -----------------------------------------------------------------------------------


class ToyLM:
    """Logits that put `confidence` on the true next token (0: uniform), optionally wrong before pads."""

    def __init__(self, confidence: float, pad_id: int | None = None) -> None:
        self.confidence = confidence
        self.pad_id = pad_id
        self.training = True
        self.calls: list[int] = []

    def eval(self) -> None:
        self.training = False

    def train(self) -> None:
        self.training = True

    def __call__(self, input_ids, attention_mask):
        import torch

        self.calls.append(int(input_ids.shape[0]))
        following = torch.roll(input_ids, -1, dims=1)
        target = following.clone()
        if self.pad_id is not None:
            target[following == self.pad_id] = (self.pad_id + 1) % VOCAB
        logits = torch.nn.functional.one_hot(target, VOCAB).float() * self.confidence
        return SimpleNamespace(logits=logits)


def test_perplexity_is_one_for_a_perfect_model_and_the_vocabulary_size_for_a_uniform_one() -> None:
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(5, 12), dtype=np.int64)
    model = ToyLM(confidence=50.0)

    assert perplexity(model, tokens, batch_size=2) == pytest.approx(1.0, abs=1e-6)
    assert model.calls == [2, 2, 1]
    assert model.training  # restored after scoring
    assert perplexity(ToyLM(confidence=0.0), tokens, batch_size=3) == pytest.approx(VOCAB, rel=1e-6)


def test_perplexity_ignores_pad_positions_only_when_told_the_pad_id() -> None:
    pad = 0
    tokens = np.random.default_rng(1).integers(1, VOCAB, size=(4, 10), dtype=np.int32)
    tokens[:, 7:] = pad  # packed rows end in padding
    model = ToyLM(confidence=50.0, pad_id=pad)  # right everywhere except where the next token is a pad

    assert perplexity(model, tokens, batch_size=4, pad_id=pad) == pytest.approx(1.0, abs=1e-6)
    assert perplexity(model, tokens, batch_size=4) > 100


def test_perplexity_refuses_what_is_not_a_batch_of_token_rows() -> None:
    with pytest.raises(ValueError, match=r"\[N, L\] array"):
        perplexity(ToyLM(1.0), np.zeros(8, dtype=np.int64), batch_size=2)
    with pytest.raises(ValueError, match="integer token ids"):
        perplexity(ToyLM(1.0), np.zeros((2, 8), dtype=np.float32), batch_size=2)
