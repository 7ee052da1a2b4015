"""`ModelServer`: one variant's Ray Serve deployment, wrapping vLLM's AsyncLLM over a local model folder.

It tokenizes (with the model's own tokenizer and chat template) and checks what depends on the model,
then streams events to the router: `{"type": "start", "prompt_tokens"}`, `{"type": "delta", "text",
"tokens"}` per engine step, `{"type": "done", "finish_reason", "completion_tokens"}`; or a single
`{"type": "error", "status", "message", "field"}`. Errors travel as events rather than exceptions so
that the router answers them with their status instead of a generic 500.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Mapping
from typing import Any

from ray import serve

from kubeforge.serve.faults import Faults


def error_event(status: int, message: str, field: str | None = None) -> dict[str, Any]:
    return {"type": "error", "status": status, "message": message, "field": field}


def plain_chat_prompt(messages: list[dict[str, str]]) -> str:
    """A prompt for models without a chat template (pretrained-only models): one `role: content` line
    per message and an open `assistant:` line, so the model continues as the assistant."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"])


@serve.deployment
class ModelServer:
    def __init__(self, path: str, label: dict[str, str], engine: dict[str, Any], faults: dict[str, float]) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.label = label
        self.faults = Faults(**faults)
        args = AsyncEngineArgs(
            model=path,
            dtype=engine["dtype"],
            max_model_len=engine["max_model_len"],
            quantization=engine["quantization"],
            max_num_seqs=engine["max_num_seqs"],
            # CUDA graphs and torch.compile cost minutes at start and buy nothing on CPU.
            enforce_eager=True,
            # The engine core is already a process of its own; a worker process under it would add a
            # second vLLM start-up (tens of seconds on a small CPU) for a single-device replica.
            distributed_executor_backend="uni",
            disable_log_stats=True,
            seed=0,
        )
        self.engine = AsyncLLM.from_engine_args(args)
        self.max_model_len = int(self.engine.model_config.max_model_len)
        self.tokenizer = self.engine.get_tokenizer()

    def info(self) -> dict[str, Any]:
        return {**self.label, "max_model_len": self.max_model_len}

    def _prompt_ids(self, request: dict[str, Any]) -> list[int]:
        messages = request.get("messages")
        if messages is None:
            return [int(i) for i in self.tokenizer.encode(request["prompt"])]
        if getattr(self.tokenizer, "chat_template", None):
            ids: Any = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, Mapping):  # transformers 5 may return a BatchEncoding
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in self.tokenizer.encode(plain_chat_prompt(messages))]

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        from vllm import SamplingParams

        field = "messages" if request.get("messages") is not None else "prompt"
        ids = self._prompt_ids(request)
        if len(ids) >= self.max_model_len:
            yield error_event(400, f"{field}: {len(ids)} tokens, but the model's context holds {self.max_model_len} "
                                   "including the generated tokens; shorten it", field)
            return
        max_tokens = int(request["max_tokens"])
        room = self.max_model_len - len(ids)
        if max_tokens > room:
            yield error_event(400, f"max_tokens: {max_tokens} does not fit after a {len(ids)}-token prompt in the "
                                   f"model's {self.max_model_len}-token context; ask for at most {room}", "max_tokens")
            return
        if self.faults.fail_rate and random.random() < self.faults.fail_rate:
            yield error_event(503, "injected fault (test-only Faults.fail_rate)")
            return
        if self.faults.delay_s:
            await asyncio.sleep(self.faults.delay_s)
        params = SamplingParams(max_tokens=max_tokens, temperature=request["temperature"], top_p=request["top_p"],
                                stop=request["stop"], seed=request["seed"])
        yield {"type": "start", "prompt_tokens": len(ids)}
        sent_text, sent_tokens, finish = 0, 0, None
        async for output in self.engine.generate({"prompt_token_ids": ids}, params, request["request_id"]):
            completion = output.outputs[0]
            text, count = completion.text, len(completion.token_ids)
            if count > sent_tokens or len(text) > sent_text:
                yield {"type": "delta", "text": text[sent_text:], "tokens": count - sent_tokens}
                sent_text, sent_tokens = len(text), count
            if output.finished:
                finish = completion.finish_reason
        yield {"type": "done", "finish_reason": finish or "stop", "completion_tokens": sent_tokens}

    def __del__(self) -> None:
        # The engine core is a child process: stop it with the replica rather than leave it to exit
        # when it notices its parent is gone.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
