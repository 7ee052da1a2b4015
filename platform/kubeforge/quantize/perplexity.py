"""Next-token perplexity of a causal language model over fixed token sequences.

Imports only torch and numpy: the quantize stage scores the model in the quantize environment
(before and after llm-compressor, on the same in-memory model) and the main environment scores
other quantized variants, and both numbers must come from the same code to be comparable.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

IGNORE_INDEX = -100


def perplexity(
    model: Any, tokens: np.ndarray, batch_size: int, device: str = "cpu", pad_id: int | None = None
) -> float:
    """exp of the mean cross-entropy of every predicted token over all `tokens` rows ([N, L] integers).

    Position `t` predicts token `t+1` of the same row; with `pad_id`, pad tokens are neither
    predicted nor counted (and not attended to). The mean is over tokens, not over rows or batches,
    so the result does not depend on `batch_size`.
    """
    import torch

    array = np.asarray(tokens)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] < 2:
        raise ValueError(f"tokens must be a non-empty [N, L] array with L >= 2, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"tokens must hold integer token ids, got dtype {array.dtype}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    was_training = bool(getattr(model, "training", False))
    model.eval()
    total_loss = 0.0
    total_tokens = 0
    try:
        with torch.no_grad():
            for start in range(0, array.shape[0], batch_size):
                input_ids = torch.from_numpy(np.ascontiguousarray(array[start : start + batch_size], dtype=np.int64))
                input_ids = input_ids.to(device)
                labels = input_ids.clone()
                attention_mask = torch.ones_like(input_ids)
                if pad_id is not None:
                    labels[input_ids == pad_id] = IGNORE_INDEX
                    attention_mask[input_ids == pad_id] = 0
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                # Summed here, not the model's own mean loss: batches hold different numbers of
                # real tokens once pads are masked, and the last batch may be shorter.
                shift_logits = logits[:, :-1, :].float()
                shift_labels = labels[:, 1:]
                loss = torch.nn.functional.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.shape[-1]),
                    shift_labels.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                total_loss += float(loss)
                total_tokens += int((shift_labels != IGNORE_INDEX).sum())
    finally:
        if was_training:
            model.train()
    if total_tokens == 0:
        raise ValueError("tokens hold no predicted position that is not padding")
    return math.exp(total_loss / total_tokens)
