"""`TransformersServer`: one variant's Ray Serve deployment on plain transformers, for what vLLM cannot
load (a `dynamic-int8` folder: torch.ao quantized linear layers) and for unquantized Hugging Face folders.

The router hands it requests as it does to `engine.ModelServer` (`forward`); it answers them in the
OpenAI wire format of `transformers_api` (the fields it implements; others are refused), from the
events of `generate` (start / delta / done, or one error event). Generation is token by token over a
KV cache (`past_key_values`): greedy at temperature 0, otherwise temperature and top-p sampling from a
per-request generator seeded by the request's `seed`.

Each model step runs in the replica's single forward thread, never on the event loop, which keeps the
replica answering `info`, health checks and new (queued) requests while a generation runs. A client
that goes away closes or cancels the generator, after which no further step is started.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from kubeforge.errors import KubeForgeError
from kubeforge.serve import transformers_api
from kubeforge.serve.prompting import length_error, prompt_ids
from kubeforge.serve.relay import ForwardedRequest


@dataclass
class _Generation:
    """One request's decoding state, touched only by the forward thread while a step runs."""

    pending: list[int]
    """Tokens not yet fed to the model: the whole prompt before the first step, then the last token."""
    temperature: float
    top_p: float
    generator: Any
    cache: Any = None
    generated: list[int] = field(default_factory=list)
    """The generated tokens that make up the text (end-of-sequence tokens excluded)."""


def pick_token(logits: Any, temperature: float, top_p: float, generator: Any) -> int:
    """The next token from one position's logits: argmax at temperature 0, else a draw from the
    temperature-scaled distribution cut to its top-p nucleus (the most likely token always stays in)."""
    import torch

    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        probs, order = probs.sort(descending=True)
        # Keep a token when the mass before it is still under top_p: the smallest set reaching top_p.
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)
        return int(order[torch.multinomial(probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def _resolve_dtype(requested: str, config: Any, folder: Path, device: str) -> str:
    """"float32" or "bfloat16" (or "float16" on a GPU): `auto` takes config.json's dtype."""
    dtype = requested
    if requested == "auto":
        dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    if dtype == "float16" and device == "cpu":
        origin = "" if requested == "float16" else f" (auto, from {folder / 'config.json'})"
        raise KubeForgeError(f"engine.dtype: float16{origin} has no fast CPU kernels in PyTorch (nor does vLLM serve "
                             "it on CPU); set engine.dtype to bfloat16 or float32, or give the replica a GPU")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise KubeForgeError(f"{folder / 'config.json'}: dtype {dtype!r} is not served by the transformers engine; "
                             "set engine.dtype to float32 or bfloat16")
    return dtype


@serve.deployment
class TransformersServer:
    def __init__(self, path: str, label: dict[str, str], engine: dict[str, Any]) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from kubeforge.quantize.dynamic import SCHEME as DYNAMIC_INT8
        from kubeforge.quantize.dynamic import load_dynamic_int8
        from kubeforge.quantize.serving import quantization_of
        from kubeforge.serve.resolve import replica_model_folder
        from kubeforge.spec.quantize import SERVING_ENGINE

        self.label = label
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # A `models:/` URI (a RayService replica on Kubernetes) is downloaded here; a local folder is used as is.
        folder = replica_model_folder(path, "transformers", self.device)
        marker = quantization_of(folder)
        scheme = None if marker is None else str(marker["scheme"])
        model: Any
        tokenizer: Any
        if scheme == DYNAMIC_INT8:
            if engine["dtype"] not in ("auto", "float32"):
                raise KubeForgeError(f"engine.dtype: {folder} is {DYNAMIC_INT8}, whose INT8 layers take float32 "
                                     f"activations, not {engine['dtype']}; set engine.dtype to auto or float32")
            model, tokenizer = load_dynamic_int8(folder)
            if tokenizer is None:
                raise KubeForgeError(f"{folder} holds no tokenizer files; copy the source model's tokenizer there "
                                     "before quantizing")
            # torch's dynamic quantized kernels exist on CPU only.
            self.device = "cpu"
        elif scheme is not None:
            raise KubeForgeError(f"{folder} is quantized with {scheme}, which the {SERVING_ENGINE.get(scheme, 'vllm')} "
                                 "engine serves; set engine.name accordingly")
        else:
            dtype = _resolve_dtype(engine["dtype"], AutoConfig.from_pretrained(folder), folder, self.device)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
            model = model.to(self.device)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        if not model.can_generate():
            raise KubeForgeError(f"{folder}: {type(model).__name__} does not generate text; the transformers engine "
                                 "serves causal language models (*ForCausalLM)")
        self.model = model.eval()
        self.tokenizer = tokenizer

        limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        wanted = engine["max_model_len"]
        if wanted is None and not limit:
            raise KubeForgeError(f"engine.max_model_len: {folder / 'config.json'} has no max_position_embeddings; "
                                 "set engine.max_model_len")
        if wanted is not None and limit and wanted > limit:
            raise KubeForgeError(f"engine.max_model_len: {wanted} is beyond the {limit} positions of "
                                 f"{folder / 'config.json'} (max_position_embeddings); set at most {limit}")
        self.max_model_len = int(wanted or limit)

        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(tokenizer.eos_token_id))
        # Only the last position's logits are needed; the prompt's step otherwise builds a
        # prompt x vocabulary matrix for nothing.
        self.forward_extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(
            model.forward).parameters else {}
        # One request at a time: a CPU forward already uses every thread the replica has, so running a
        # second one alongside only slows both; batching requests together is what vLLM is for.
        # Waiting requests queue here, up to max_ongoing_requests (engine.max_num_seqs).
        self.lock = asyncio.Lock()
        # A single thread: even a step still finishing after its request was cancelled never overlaps
        # the next request's step.
        self.forward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transformers-forward")

    def info(self) -> dict[str, Any]:
        return {**self.label, "max_model_len": self.max_model_len}

    def ready(self) -> dict[str, Any]:
        return self.info()

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[dict[str, Any]]:
        """Answer `request` in the OpenAI wire format of `transformers_api` (events of `relay`)."""
        names = [self.label["model"], f"{self.label['model']}:{self.label['variant']}"]
        async for event in transformers_api.respond(self, request, names):
            yield event

    def _step(self, state: _Generation) -> tuple[int, str]:
        """Feed the pending tokens, pick the next one; (token, decoded text of all generated tokens)."""
        import torch

        with torch.inference_mode():
            output = self.model(input_ids=torch.tensor([state.pending], device=self.device),
                                past_key_values=state.cache, use_cache=True, **self.forward_extra)
            state.cache = output.past_key_values
            token = pick_token(output.logits[0, -1], state.temperature, state.top_p, state.generator)
        state.pending = [token]
        if token not in self.eos_ids:
            # An end-of-sequence token ends the text without being part of it, special token or not.
            state.generated.append(token)
        # Decoding everything so far (not the new token alone) keeps merges and multi-byte characters
        # that span tokens right; the caller holds back an incomplete character.
        return token, str(self.tokenizer.decode(state.generated, skip_special_tokens=True))

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        import torch

        ids = prompt_ids(self.tokenizer, request)
        if (error := length_error(request, len(ids), self.max_model_len)) is not None:
            yield error
            return
        max_tokens = int(request["max_tokens"])
        stops = [s for s in (request.get("stop") or []) if s]
        # Text that may be the start of a stop string is held back until the next token settles it.
        hold = max((len(s) for s in stops), default=1) - 1
        temperature = float(request.get("temperature", 1.0))
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            if request.get("seed") is not None:
                generator.manual_seed(int(request["seed"]))
            else:
                generator.seed()
        state = _Generation(list(ids), temperature, float(request.get("top_p", 1.0)), generator)
        yield {"type": "start", "prompt_tokens": len(ids)}

        loop = asyncio.get_running_loop()
        async with self.lock:
            sent, count, finish = 0, 0, "length"
            while count < max_tokens:
                # A closed generator (client gone) raises GeneratorExit at the yield below, and a cancelled
                # request CancelledError here: either way no further step is started.
                token, text = await loop.run_in_executor(self.forward_thread, self._step, state)
                count += 1
                done = token in self.eos_ids
                if done:
                    finish = "stop"
                # Text before `sent` needs no second look: a stop string starting there would end inside
                # the text held back at the previous step, where it was searched for already.
                found = [i for i in (text.find(s, sent) for s in stops) if i >= 0]
                if found:
                    text, done, finish = text[:min(found)], True, "stop"
                # Before the end, an incomplete multi-byte character (U+FFFD until its last byte arrives) waits too.
                ready = len(text) if done or count == max_tokens else min(len(text) - hold,
                                                                          len(text.rstrip("\ufffd")))
                yield {"type": "delta", "text": text[sent:ready] if ready > sent else "", "tokens": 1}
                sent = max(sent, ready)
                if done:
                    break
        yield {"type": "done", "finish_reason": finish, "completion_tokens": count}
