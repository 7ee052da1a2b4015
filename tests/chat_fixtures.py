"""A task record and a tokenizer trained on it, shared by the tests of the chat format and of fine-tuning's encoding."""

from __future__ import annotations

from typing import Any

import pytest

RECORD = {"id": "r", "instruction": "Write the body of this Python function.",
          "input": 'def one():\n    """One."""\n', "output": "    return 1\n"}


@pytest.fixture(scope="module")  # a test sets its chat template
def chat_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from kubeforge.data.tokenizer import train_tokenizer
    from kubeforge.spec.data import TokenizerSpec

    texts = [RECORD["input"] + RECORD["output"], "### User:\n### Assistant:\nWrite the body of this Python function."]
    return train_tokenizer(texts, TokenizerSpec(type="bpe", vocab_size=400, min_frequency=2),
                           tmp_path_factory.mktemp("tok"))
