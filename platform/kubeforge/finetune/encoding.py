"""Task records as token ids and labels for training: the chat-formatted prompt, masked, then the answer.

The prompt is the chat template rendered with the generation prompt (`kubeforge.formats.chat.prompt_text`),
tokenised on its own, and the response is tokenised on its own and followed by eos. That is exactly what
the model sees when it is served: the server tokenises the rendered prompt and the model continues it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from kubeforge.errors import StageError
from kubeforge.formats.chat import prompt_text

STAGE = "finetune"

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (the prompt): PyTorch's cross-entropy default `ignore_index`."""


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise StageError(STAGE, "the tokenizer has no eos token; fine-tuning needs one to end the answers")
    return int(tokenizer.eos_token_id)


def _with_response(
    prompt_ids: list[int], response: str, tokenizer: Any, max_length: int
) -> tuple[list[int], list[int]]:
    """Prompt tokens (label -100) then response tokens and eos (labelled), cut to `max_length`.

    The cut falls on the response, so the prompt the model learns to answer is intact; a cut response
    loses its eos too (the model must not learn to stop mid-answer). A prompt that leaves no room for a
    single response token gives an example without labels, which `encode_many` drops.
    """
    if len(prompt_ids) >= max_length:
        kept = prompt_ids[:max_length]
        return kept, [IGNORE_INDEX] * len(kept)
    response_ids = [*_token_ids(tokenizer, response), _eos_id(tokenizer)][: max_length - len(prompt_ids)]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def encode_sft(record: dict[str, Any], tokenizer: Any, max_length: int) -> tuple[list[int], list[int]]:
    """input_ids and labels of an instruction record (labels are not shifted: the model shifts them)."""
    prompt_ids = _token_ids(tokenizer, prompt_text(record, tokenizer))
    return _with_response(prompt_ids, str(record["output"]), tokenizer, max_length)


def encode_dpo(record: dict[str, Any], tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Both sides of a preference record, sharing the prompt (masked -100 as in `encode_sft`)."""
    prompt_ids = _token_ids(tokenizer, prompt_text(record, tokenizer))
    chosen_ids, chosen_labels = _with_response(prompt_ids, str(record["chosen"]), tokenizer, max_length)
    rejected_ids, rejected_labels = _with_response(prompt_ids, str(record["rejected"]), tokenizer, max_length)
    return {
        "chosen_input_ids": chosen_ids, "chosen_labels": chosen_labels,
        "rejected_input_ids": rejected_ids, "rejected_labels": rejected_labels,
    }


def _has_labels(labels: list[int]) -> bool:
    return any(label != IGNORE_INDEX for label in labels)


def encode_many(
    records: Iterable[dict[str, Any]], tokenizer: Any, max_length: int, kind: Literal["instruction", "preference"]
) -> tuple[list[dict[str, list[int]]], int]:
    """Encoded examples and how many were dropped because their prompt alone fills `max_length`.

    Instruction records become `{"input_ids", "labels"}`, preference records `encode_dpo`'s dict; a pair
    is dropped when either side has no label token.
    """
    encoded: list[dict[str, list[int]]] = []
    dropped = 0
    for record in records:
        if kind == "instruction":
            input_ids, labels = encode_sft(record, tokenizer, max_length)
            example = {"input_ids": input_ids, "labels": labels}
            usable = _has_labels(labels)
        else:
            example = encode_dpo(record, tokenizer, max_length)
            usable = _has_labels(example["chosen_labels"]) and _has_labels(example["rejected_labels"])
        if usable:
            encoded.append(example)
        else:
            dropped += 1
    return encoded, dropped
