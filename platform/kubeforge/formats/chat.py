"""The chat format of fine-tuned models: the template saved with their tokenizer and the prompt of a task record.

The fine-tuning stage trains on `prompt_text` and saves `CHAT_TEMPLATE` with the model's tokenizer; the
evaluate stage prompts with `prompt_text`; the serving engines render requests with the saved template
(`kubeforge.serve.prompting`). One definition keeps what the model is trained on, scored on and served with
the same text.
"""

from __future__ import annotations

from typing import Any

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ '### System:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '### Assistant:\\n' + message['content'] + eos_token }}"
    "{%- else -%}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '### Assistant:\\n' }}"
    "{%- endif -%}"
)
"""Plain-text turns, no new special tokens (the vocabulary of the pretrained model must not change).
An assistant turn ends with the eos token, which is what makes a served model stop."""

ASSISTANT_HEADER = "### Assistant:\n"
"""The end of every prompt: what `add_generation_prompt` appends and the model continues."""


def user_message(record: dict[str, Any]) -> str:
    """The user's turn: a preference record's prompt, or the instruction followed by its input."""
    if "prompt" in record:
        return str(record["prompt"])
    extra = str(record.get("input") or "")
    return f"{record['instruction']}\n\n{extra}" if extra else str(record["instruction"])


def chat_template_of(tokenizer: Any) -> str:
    """The tokenizer's own chat template (a base model that has one keeps it), else `CHAT_TEMPLATE`."""
    return str(getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE)


def prompt_text(record: dict[str, Any], tokenizer: Any) -> str:
    """The chat-formatted prompt (in the template fine-tuning saves), ending with the header the model continues."""
    messages = [{"role": "user", "content": user_message(record)}]
    rendered = tokenizer.apply_chat_template(
        messages, chat_template=chat_template_of(tokenizer), tokenize=False, add_generation_prompt=True
    )
    return str(rendered)
