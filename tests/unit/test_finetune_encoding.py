"""Task records as token ids and labels: the masked chat-formatted prompt, then the answer and eos."""

from __future__ import annotations

from typing import Any

import pytest

from kubeforge.finetune.encoding import IGNORE_INDEX, encode_dpo, encode_many, encode_sft
from kubeforge.formats.chat import prompt_text
from tests.chat_fixtures import RECORD

pytestmark = pytest.mark.unit


def test_sft_labels_mask_exactly_the_prompt_and_end_with_eos(chat_tokenizer: Any) -> None:
    prompt_ids = chat_tokenizer(prompt_text(RECORD, chat_tokenizer), add_special_tokens=False)["input_ids"]
    input_ids, labels = encode_sft(RECORD, chat_tokenizer, max_length=512)
    assert input_ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids):] == input_ids[len(prompt_ids):]
    assert input_ids[-1] == labels[-1] == chat_tokenizer.eos_token_id
    assert chat_tokenizer.decode(input_ids[len(prompt_ids):-1]) == RECORD["output"]

    # Truncation cuts the response (and its eos), never the prompt.
    cut_ids, cut_labels = encode_sft(RECORD, chat_tokenizer, max_length=len(prompt_ids) + 1)
    assert cut_ids == input_ids[: len(prompt_ids) + 1]
    assert cut_labels[-1] != chat_tokenizer.eos_token_id and cut_labels[-1] != IGNORE_INDEX

    # A prompt that fills max_length leaves nothing to learn: encode_many drops it and says so.
    encoded, dropped = encode_many([RECORD, RECORD], chat_tokenizer, len(prompt_ids), "instruction")
    assert (encoded, dropped) == ([], 2)
    encoded, dropped = encode_many([RECORD], chat_tokenizer, 512, "instruction")
    assert dropped == 0 and encoded == [{"input_ids": input_ids, "labels": labels}]


def test_dpo_encoding_shares_the_masked_prompt(chat_tokenizer: Any) -> None:
    record = {"id": "p", "prompt": RECORD["instruction"] + "\n\n" + RECORD["input"],
              "chosen": "    return 1\n", "rejected": "    return\n"}
    prompt_ids = chat_tokenizer(prompt_text(record, chat_tokenizer), add_special_tokens=False)["input_ids"]
    pair = encode_dpo(record, chat_tokenizer, max_length=512)
    assert set(pair) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    for side in ("chosen", "rejected"):
        ids, labels = pair[f"{side}_input_ids"], pair[f"{side}_labels"]
        assert ids[: len(prompt_ids)] == prompt_ids
        assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
        assert labels[-1] == chat_tokenizer.eos_token_id
    assert pair["chosen_input_ids"] != pair["rejected_input_ids"]
    assert encode_many([record], chat_tokenizer, len(prompt_ids), "preference") == ([], 1)
