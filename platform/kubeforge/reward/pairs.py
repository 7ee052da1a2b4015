"""The reward stage's preference pairs: read from the user's JSONL file or built from the corpus (the
pairs finetune's `dpo` objective trains on), deduplicated, split into train and test, and encoded.

The split is `kubeforge.formats.task_split`'s: by a hash of the pair's normalised prompt, so no pair and
no prompt is on both sides, and the same pairs are held out whatever the seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kubeforge.errors import StageError
from kubeforge.formats.chat import prompt_text, user_message
from kubeforge.formats.functions import corpus_functions
from kubeforge.formats.jsonl import read_records
from kubeforge.formats.splits import TaskSplits
from kubeforge.formats.task_split import normalise, record_content, split_by_prompt
from kubeforge.spec.reward import RewardSpec

STAGE = "reward"
FIELDS = ("prompt", "chosen", "rejected")
"""What a pair must have (and `id`, optional): the format of finetune's dpo task files."""


def read_pairs_jsonl(path_text: str, base_dir: Path) -> list[dict[str, Any]]:
    """Validated pairs of a JSONL file; every error names the field and the file and line."""
    records = []
    for where, value in read_records(path_text, base_dir, stage=STAGE, field="spec.reward.pairs.path",
                                     required=FIELDS, what="pair"):
        if value["chosen"] == value["rejected"]:
            raise StageError(STAGE, f"{where}: fields 'chosen' and 'rejected' are identical")
        records.append({name: value[name] for name in ("id", *FIELDS)})
    return records


def split_pairs(
    records: list[dict[str, Any]], content_keys: list[str], test_fraction: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Drop pairs whose content key was seen before, then split the rest by prompt (see the module docstring)."""
    unique: list[dict[str, Any]] = []
    prompts: list[str] = []
    seen: set[str] = set()
    for record, key in zip(records, content_keys, strict=True):
        if key in seen:
            continue
        seen.add(key)
        unique.append(record)
        prompts.append(normalise(user_message(record)))
    return split_by_prompt(unique, prompts, test_fraction)


def load_pairs(spec: RewardSpec, base_dir: Path, documents: Path | None) -> TaskSplits:
    """The pairs of `spec.reward.pairs`, split; `documents` is the data stage's parquet (built-in pairs)."""
    pairs = spec.pairs
    if pairs.path is not None:
        records = read_pairs_jsonl(pairs.path, base_dir)
        keys = [normalise(record_content(r, "preference")) for r in records]
    else:
        if documents is None:
            raise StageError(
                STAGE,
                f"spec.reward.pairs.builtin: '{pairs.builtin}' is built from the data stage's corpus; add spec.data",
            )
        functions = corpus_functions(documents, STAGE)
        records = [f.preference_record(pairs.seed) for f in functions]
        keys = [normalise(f.source) for f in functions]
    train, test = split_pairs(records, keys, pairs.test_fraction)
    if not train or not test:
        side = "training" if not train else "held-out"
        raise StageError(
            STAGE, f"spec.reward.pairs: {len(train) + len(test)} distinct pair(s) leave the {side} side empty; "
            "add pairs or change spec.reward.pairs.test_fraction",
        )
    capped = 0
    if pairs.max_pairs is not None and len(train) > pairs.max_pairs:
        keep = sorted(random.Random(pairs.seed).sample(range(len(train)), pairs.max_pairs))
        capped = len(train) - len(keep)
        train = [train[i] for i in keep]
    stats = {"pairs": len(records), "duplicates": len(records) - len(train) - len(test) - capped, "capped": capped}
    return TaskSplits("preference", train, test, stats)


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def encode_pair(record: dict[str, Any], tokenizer: Any, max_length: int) -> dict[str, list[int]] | None:
    """Both sides as the chat-formatted prompt followed by the answer, cut to `max_length`; None when the
    prompt alone fills it or the two sides are the same within it (the pair then says nothing).

    No eos is appended: the reward is read at the last token, which is then the answer's own, the same
    whether the text is scored here, by `transformers` or by vLLM's pooling runner."""
    prompt_ids = _token_ids(tokenizer, prompt_text(record, tokenizer))
    if len(prompt_ids) >= max_length:
        return None
    chosen = (prompt_ids + _token_ids(tokenizer, str(record["chosen"])))[:max_length]
    rejected = (prompt_ids + _token_ids(tokenizer, str(record["rejected"])))[:max_length]
    if chosen == rejected:
        return None
    return {"chosen_input_ids": chosen, "rejected_input_ids": rejected}


def encode_pairs(
    records: Iterable[dict[str, Any]], tokenizer: Any, max_length: int
) -> tuple[list[dict[str, list[int]]], int]:
    """Encoded pairs and how many were dropped (see `encode_pair`)."""
    encoded: list[dict[str, list[int]]] = []
    dropped = 0
    for record in records:
        pair = encode_pair(record, tokenizer, max_length)
        if pair is None:
            dropped += 1
        else:
            encoded.append(pair)
    return encoded, dropped
