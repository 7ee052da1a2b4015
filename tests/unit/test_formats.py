"""The formats shared by fine-tuning, evaluation and serving: the chat template and the task's splits on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubeforge.errors import StageError
from kubeforge.formats.chat import ASSISTANT_HEADER, CHAT_TEMPLATE, prompt_text
from kubeforge.formats.splits import TaskSplits, read_split, write_splits
from tests.chat_fixtures import RECORD

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------------------------------------
# chat template


def test_chat_template_renders_with_transformers_and_keeps_the_vocabulary(chat_tokenizer: Any, tmp_path: Path) -> None:
    # The fast-tokenizer class AutoTokenizer (and vLLM) load these folders with; AutoTokenizer imports torch.
    from transformers import PreTrainedTokenizerFast

    size = len(chat_tokenizer)
    chat_tokenizer.chat_template = CHAT_TEMPLATE
    chat_tokenizer.save_pretrained(str(tmp_path / "tok"))
    loaded = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    assert len(loaded) == size
    prompt = prompt_text(RECORD, loaded)
    assert prompt.endswith(ASSISTANT_HEADER)
    assert prompt == "### User:\n" + RECORD["instruction"] + "\n\n" + RECORD["input"] + "\n\n### Assistant:\n"
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": RECORD["instruction"] + "\n\n" + RECORD["input"]},
        {"role": "assistant", "content": RECORD["output"]},
    ]
    full = loaded.apply_chat_template(conversation, tokenize=False)
    assert full == "### System:\nBe brief.\n\n" + prompt + RECORD["output"] + "<|endoftext|>"
    assert prompt_text({"id": "p", "prompt": "Hi", "chosen": "a", "rejected": "b"}, loaded).endswith(
        "### User:\nHi\n\n### Assistant:\n"
    )


# ---------------------------------------------------------------------------------------------
# splits


def test_splits_round_trip_and_a_missing_split_names_its_file(tmp_path: Path) -> None:
    splits = TaskSplits("instruction", [RECORD, {**RECORD, "id": "é"}], [{**RECORD, "id": "t"}], {"duplicates": 1})
    write_splits(splits, tmp_path / "task")
    assert read_split(tmp_path / "task", "train") == splits.train
    assert read_split(tmp_path / "task", "test") == splits.test
    summary = json.loads((tmp_path / "task" / "task.json").read_text())
    assert summary == {"kind": "instruction", "train": 2, "test": 1, "duplicates": 1}
    with pytest.raises(StageError, match=r"stage finetune: .*validation\.jsonl does not exist; the task's splits were not written"):
        read_split(tmp_path / "task", "validation")
