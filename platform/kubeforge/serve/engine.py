"""`ModelServer`: one variant's Ray Serve deployment, wrapping vLLM's AsyncLLM over a local model folder.

It tokenizes (with the model's own tokenizer and chat template) and checks what depends on the model,
then streams events to the router: `{"type": "start", "prompt_tokens"}`, `{"type": "delta", "text",
"tokens"}` per engine step (several steps in one when they come faster than `STREAM_INTERVAL_S`),
`{"type": "done", "finish_reason", "completion_tokens"}`; or a single
`{"type": "error", "status", "message", "field"}`. Errors travel as events rather than exceptions so
that the router answers them with their status instead of a generic 500.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from kubeforge.serve.prompting import length_error, prompt_ids

STREAM_INTERVAL_S = 0.05
"""Engine steps go to the router at most this often (the first token at once). Every message crosses two
processes (replica -> router -> Serve proxy); sent per token, that cost, not the engine, bounded
throughput on a small machine (benchmarks/bench_serve.py). 50 ms is below visible stutter. A request that
is not streamed gets its first token at once (the router's time-to-first-token metric, which canary
analyses read, keeps its meaning) and the rest in one message at the end: nobody sees it in between."""


@serve.deployment
class ModelServer:
    def __init__(self, path: str, label: dict[str, str], engine: dict[str, Any]) -> None:
        import torch
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from kubeforge.serve.resolve import replica_model_folder

        self.label = label
        # A `models:/` URI (a RayService replica on Kubernetes) is downloaded here; a local folder is used as is.
        folder = replica_model_folder(path, "vllm", "cuda" if torch.cuda.is_available() else "cpu")
        args = AsyncEngineArgs(
            model=str(folder),
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

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        from vllm import SamplingParams

        ids = prompt_ids(self.tokenizer, request)
        if (error := length_error(request, len(ids), self.max_model_len)) is not None:
            yield error
            return
        max_tokens = int(request["max_tokens"])
        params = SamplingParams(max_tokens=max_tokens, temperature=request["temperature"], top_p=request["top_p"],
                                stop=request["stop"], seed=request["seed"])
        yield {"type": "start", "prompt_tokens": len(ids)}
        text, count, sent_text, sent_tokens, finish = "", 0, 0, 0, None
        last_sent: float | None = None
        interval = STREAM_INTERVAL_S if request["stream"] else math.inf
        async for output in self.engine.generate({"prompt_token_ids": ids}, params, request["request_id"]):
            completion = output.outputs[0]
            text, count = completion.text, len(completion.token_ids)
            if output.finished:
                finish = completion.finish_reason
            now = time.monotonic()
            due = last_sent is None or output.finished or now - last_sent >= interval
            if due and (count > sent_tokens or len(text) > sent_text):
                yield {"type": "delta", "text": text[sent_text:], "tokens": count - sent_tokens}
                sent_text, sent_tokens, last_sent = len(text), count, now
        if count > sent_tokens or len(text) > sent_text:
            yield {"type": "delta", "text": text[sent_text:], "tokens": count - sent_tokens}
            sent_tokens = count
        yield {"type": "done", "finish_reason": finish or "stop", "completion_tokens": sent_tokens}

    def __del__(self) -> None:
        # The engine core is a child process: stop it with the replica rather than leave it to exit
        # when it notices its parent is gone.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
