"""What every serving engine does the same way before it generates: the prompt's token ids (the model's
chat template, or a plain `role: content` prompt) and the checks that depend on the model's context.

Engine-independent on purpose: `engine.ModelServer` (vLLM) and `hf_engine.TransformersServer` must
answer the same request with the same prompt tokens and the same 400s, whichever engine a variant runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def error_event(status: int, message: str, field: str | None = None) -> dict[str, Any]:
    return {"type": "error", "status": status, "message": message, "field": field}


def plain_chat_prompt(messages: list[dict[str, str]]) -> str:
    """A prompt for models without a chat template (pretrained-only models): one `role: content` line
    per message and an open `assistant:` line, so the model continues as the assistant."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"])


def prompt_ids(tokenizer: Any, request: dict[str, Any]) -> list[int]:
    """The token ids of the request's `prompt`, or of its `messages` through the tokenizer's chat
    template (the plain prompt when it has none)."""
    messages = request.get("messages")
    if messages is None:
        return [int(i) for i in tokenizer.encode(request["prompt"])]
    if getattr(tokenizer, "chat_template", None):
        ids: Any = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, Mapping):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer.encode(plain_chat_prompt(messages))]


def length_error(request: dict[str, Any], prompt_tokens: int, max_model_len: int) -> dict[str, Any] | None:
    """The 400 event for a prompt that leaves no room in the context, or for a `max_tokens` that does
    not fit after it; None when the request fits."""
    field = "messages" if request.get("messages") is not None else "prompt"
    if prompt_tokens >= max_model_len:
        return error_event(400, f"{field}: {prompt_tokens} tokens, but the model's context holds {max_model_len} "
                                "including the generated tokens; shorten it", field)
    max_tokens = int(request["max_tokens"])
    room = max_model_len - prompt_tokens
    if max_tokens > room:
        return error_event(400, f"max_tokens: {max_tokens} does not fit after a {prompt_tokens}-token prompt in the "
                                f"model's {max_model_len}-token context; ask for at most {room}", "max_tokens")
    return None
