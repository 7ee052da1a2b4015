"""`python -m kubeforge.quantize.vllm_probe request.json result.json`: load a model in vLLM, generate
greedily and score prompt log-probabilities, in a process of its own.

vLLM keeps process-wide state (its engine, distributed groups, OpenMP thread binding) that cannot be
torn down and rebuilt reliably, so `kubeforge.quantize.engines.check_vllm` runs each check here.
Imports nothing from kubeforge, so that it starts in any environment that has vLLM.

request: {"model", "dtype", "max_model_len", "prompts", "max_new_tokens", "eval_tokens" (rows of token
ids, or null), "pad_id" (int or null)}.
result: {"generations", "generated_tokens", "generation_seconds", "load_seconds",
"logprob_sum", "logprob_count"}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def probe(request: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=request["model"], dtype=request["dtype"], max_model_len=request["max_model_len"],
              enforce_eager=True, seed=0)
    load_seconds = time.perf_counter() - start

    prompts = request["prompts"]
    # A short pass first (prefill and one decode step), so that the timed one measures decoding and
    # not first-call setup such as oneDNN kernel creation.
    llm.generate(prompts, SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(max_tokens=request["max_new_tokens"], temperature=0.0),
                           use_tqdm=False)
    generation_seconds = time.perf_counter() - start

    total, count = 0.0, 0
    rows = request.get("eval_tokens") or []
    if rows:
        # prompt_logprobs=0 returns, for every prompt position after the first, the log-probability
        # of the token actually there (plus the top-0 alternatives, i.e. none).
        scored = llm.generate([TokensPrompt(prompt_token_ids=row) for row in rows],
                              SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)
        pad_id = request.get("pad_id")
        for row, output in zip(rows, scored, strict=True):
            logprobs = output.prompt_logprobs or []
            for position in range(1, len(row)):
                if pad_id is not None and row[position] == pad_id:
                    continue
                entry = logprobs[position]
                if entry is None:
                    raise RuntimeError(f"vLLM returned no prompt log-probability at position {position}")
                total += entry[row[position]].logprob
                count += 1
    return {
        "generations": [o.outputs[0].text for o in outputs],
        "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
        "generation_seconds": generation_seconds,
        "load_seconds": load_seconds,
        "logprob_sum": total,
        "logprob_count": count,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m kubeforge.quantize.vllm_probe REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    result = probe(json.loads(Path(argv[0]).read_text()))
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
