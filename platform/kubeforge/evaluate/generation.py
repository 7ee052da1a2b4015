"""Generation metrics (exact match, BLEU, ROUGE-L, parse rate) and greedy batched generation.

Conventions, so numbers compare across runs and with published ones:

* `exact_match`: share of generations equal to the reference after stripping surrounding whitespace;
* `bleu`: sacrebleu's corpus BLEU with its default `13a` tokenisation, on sacrebleu's 0-100 scale;
* `rouge_l`: mean ROUGE-L F1 of `rouge_score` without stemming (its tokenizer lower-cases and keeps
  only letters and digits, so for code it compares identifiers and numbers, not punctuation);
* `parse_rate`: share of generated bodies that are not blank and that `ast.parse` accepts after the header.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kubeforge.formats.functions import body_parses


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    _check_lengths(predictions, references)
    if not predictions:
        return None
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / len(predictions)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    import sacrebleu

    _check_lengths(predictions, references)
    if not predictions:
        return None
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    if not predictions:
        return None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return float(sum(scores) / len(scores))


def parse_rate(headers: Sequence[str], bodies: Sequence[str]) -> float | None:
    if not bodies:
        return None
    return sum(body_parses(h, b) for h, b in zip(headers, bodies, strict=True)) / len(bodies)


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | None]:
    return {
        "exact_match": exact_match(predictions, references),
        "bleu": corpus_bleu(predictions, references),
        "rouge_l": rouge_l(predictions, references),
    }


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: str,
    max_prompt_tokens: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy continuations of `prompts` (the new text only), stopping at the end-of-sequence token.

    Prompts are batched with left padding, so every row's continuation starts at the same column;
    they are sorted by length first so that a batch holds prompts of similar length (less padding).
    Prompts longer than `max_prompt_tokens` lose their beginning: the end holds the instruction's
    tail and the assistant header the model continues from.
    """
    import torch

    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = pad_id
    outputs = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        encoded = tokenizer(
            [prompts[i] for i in rows],
            return_tensors="pt",
            padding=True,
            truncation=max_prompt_tokens is not None,
            max_length=max_prompt_tokens,
            # The chat-formatted prompt already carries whatever special tokens the template puts there.
            add_special_tokens=False,
        )
        input_ids = encoded["input_ids"].to(device)
        with torch.no_grad():
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=encoded["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_ids or None,
                pad_token_id=pad_id,
            )
        texts = tokenizer.batch_decode(generated[:, input_ids.shape[1] :], skip_special_tokens=True)
        for index, text in zip(rows, texts, strict=True):
            outputs[index] = text
        if on_batch is not None:
            on_batch(len(rows))
    return outputs


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's end-of-sequence token and any the model's generation config adds (end of turn)."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        for token in value if isinstance(value, list | tuple) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids
