"""Serving: the KubeForge router's cost, the vllm engine against the transformers engine, and a load test.

All three parts serve the quickstart's pretrained model (trained in `--workdir` if `make demo` has not
left it there, like `bench_quantize.py`), with the same greedy requests (`temperature` 0, so every
server does the same work per prompt): prompts are the first `--prompt-tokens` tokens of validation
sequences, `--max-tokens` new tokens each, streamed (SSE) unless `--no-stream`. Load comes from
`kubeforge.serve.loadgen` (closed loop: each client sends its next request when the previous one ends).

1. `--router`: the KubeForge application (router + one `stable` variant on the vllm engine, Ray Serve)
   against vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`) on the same model
   folder with the same engine arguments (enforce_eager, the uni executor, max_num_seqs,
   max_model_len, dtype, seed), the same VLLM_CPU_KVCACHE_SPACE and the same CPU priority (Ray runs
   its workers at nice 15; so does this server, or other jobs on a shared machine would favour it);
   `--clients` clients, `--duration` measured seconds per run, interleaved over `--rounds` rounds whose
   order alternates (A B, B A, ...) so that drift on a shared machine falls on both sides.
   Target: router / direct throughput >= 0.95.
2. `--engines`: the same application on the vllm engine and on the transformers engine, through the
   router, measured the same way. No target: it shows what choosing `engine.name` costs.
3. `--load`: `--load-clients` clients (64) for `--load-duration` seconds (60) through the router on the
   vllm engine. Target: zero failed requests; reports p50, p99 and requests/s.

4. `--vllm-client`: vLLM's own benchmark client (`vllm.benchmarks.serve`, the code behind
   `vllm bench serve`; its console script does not start under the `vllm-cpu` distribution name, so
   it is called as a library) against the router (vllm) and against vLLM's own server, on its random
   dataset (`--random-input-len` / `--random-output-len` tokens, `ignore_eos` so both do the same
   work), at each of `--concurrency`, interleaved over `--rounds`. Streamed; with `--no-stream`, whole
   answers through `whole_completion`, a request function of this file plugged into the client (every
   backend of the client streams). With `--w8a8` both serve the model's W8A8 quantization (int8
   weights and activations, made as the quantize stage makes it). Targets: router / direct >= 0.9 in
   request and output-token throughput, and p99 time to first token <= 1.5x. Each run also reports the
   CPU time per request of each server's HTTP side (HAProxy, the router and variant replicas; vLLM's
   API server process), which is what the serving layer costs and does not swing as throughput does
   on a small shared machine.

5. `--serve-llm`: the same client and settings against the router and against Ray Serve LLM
   (`ray.serve.llm.build_openai_app`, the other serving layer issue [8/11] named) on the same folder
   and engine arguments, each engine on 0.9 CPU. It shows what choosing one over the other costs.

Without a part flag parts 1 to 3 run; the defaults take about 10 minutes on a 2-core machine, start-ups
included. Throughput is successful requests per second (the answers are the same on both sides, so
the ratio is a ratio of work); tokens per second come from `usage` where the server sends it in the
stream (vLLM's server) and from text chunks otherwise (the router), so compare requests/s.

    .venv/bin/python benchmarks/bench_serve.py --workdir .kubeforge --json benchmarks/results/serve.json
    .venv/bin/python benchmarks/bench_serve.py --vllm-client --json benchmarks/results/serve-vllm-client.json
    # smoke run, about 6 minutes:
    .venv/bin/python benchmarks/bench_serve.py --duration 5 --rounds 1 --initial-warmup 3 --load-duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from common import REPO, pretrained_model

from kubeforge.runtime import free_port, haproxy_ports_of_its_own, use_local_runtime_settings
from kubeforge.serve.app import ROUTER_CPUS
from kubeforge.serve.engine import vllm_args
from kubeforge.serve.loadgen import LoadReport, run_load

MODEL = "quickstart"
"""The registered-model name clients ask the router for (and the direct server's --served-model-name)."""
KV_CACHE_GB = 1
ROUTER_TARGET = 0.95
START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Target:
    """A server under test: a label, a base URL (ending before /v1) and the `model` its requests name."""

    label: str
    url: str
    model: str
    front: dict[str, str] = field(default_factory=dict)
    """Its HTTP side's processes: a name for each, and what its command line contains. Their CPU time per
    request is what its serving layer costs (part 4)."""


def front_cpu_s(target: Target) -> dict[tuple[str, int], float]:
    """CPU seconds used so far by each process of `target`'s HTTP side, under its name in `target.front`
    and its pid (HAProxy restarts when Serve changes its configuration: a new process counts from 0): what
    relays and answers requests, not the engine (whose processes poll while they wait, so their CPU time
    does not measure work)."""
    used: dict[tuple[str, int], float] = {}
    for process in psutil.process_iter(["cmdline", "cpu_times"]):
        command, times = " ".join(process.info["cmdline"] or []), process.info["cpu_times"]
        # vLLM names its engine core and worker processes VLLM::...: they are the engine.
        if times is None or "VLLM::" in command:
            continue
        name = next((name for name, part in target.front.items() if part in command), None)
        if name is not None:
            used[name, process.pid] = times.user + times.system
    return used


def validation_prompts(data: Any, model_dir: Path, count: int, tokens: int) -> list[str]:
    """The first `tokens` tokens of `count` validation sequences, decoded: text the model has not
    trained on, all of the same token length."""
    from transformers import AutoTokenizer

    from kubeforge.engine.batches import TokenShards

    shards = TokenShards([data.directory / p for p in data.result.shards["validation"]])
    rows = shards.rows(list(range(min(count, len(shards)))))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [str(tokenizer.decode(row[:tokens].tolist())) for row in rows]


class DirectVllm:
    """vLLM's own OpenAI server on the model folder, in a process group of its own (its engine core is
    a child process) so that stopping it stops both."""

    def __init__(self, model_dir: Path, engine: dict[str, Any], log_path: Path, niceness: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [
            # At the priority Ray gives the KubeForge side's processes: on a shared machine a server at
            # normal priority takes CPU from other people's jobs that the Ray workers cannot.
            "nice", "-n", str(niceness),
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            # The arguments each variant replica gives vLLM's own parser.
            *vllm_args(str(model_dir), [MODEL], engine), "--host", "127.0.0.1", "--port", str(self.port),
            # The router writes no access log line per request either.
            "--disable-uvicorn-access-log",
        ]
        env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GB)}
        self.log = log_path.open("wb")
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM's OpenAI server exited with status {self.process.returncode} while "
                                   f"starting; its log ({self.log_path}) ends with:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(1)
        raise RuntimeError(f"vLLM's OpenAI server did not answer {self.url}/health within {timeout_s:.0f} s; "
                           f"its log ({self.log_path}) ends with:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def ray_worker_niceness() -> int:
    """How much nicer than this process Ray runs its workers (Ray's `worker_niceness`, 15 by default):
    the Serve replicas, the router and their vLLM engine cores all inherit it."""
    import ray

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    return int(ray.get(niceness.remote())) - os.nice(0)


def deploy(model_dir: Path, engine: dict[str, Any], app_name: str, route_prefix: str, cpus: float) -> None:
    """The KubeForge application with one `stable` variant, as `kubeforge serve` builds it."""
    from ray import serve

    from kubeforge.serve.app import VariantModel, build_app
    from kubeforge.spec.deployment import DeploymentSpec

    settings = dict(engine)
    if engine["name"] == "vllm":
        settings["kv_cache_gb"] = KV_CACHE_GB
    spec = DeploymentSpec.model_validate({
        "model": f"models:/{MODEL}/1", "engine": settings, "resources": {"cpus_per_replica": cpus},
    })
    serve.run(build_app([VariantModel("stable", MODEL, "1", model_dir)], spec, weight=0), name=app_name,
              route_prefix=route_prefix)


def deploy_serve_llm(model_dir: Path, engine: dict[str, Any], route_prefix: str, cpus: float) -> None:
    """Ray Serve LLM's OpenAI app on `model_dir` with the engine arguments of `engine.vllm_args`."""
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    config = LLMConfig(
        model_loading_config={"model_id": MODEL, "model_source": str(model_dir)},
        placement_group_config={"bundles": [{"CPU": cpus}]},  # a CPU-only bundle: Serve LLM's CPU mode
        engine_kwargs={"dtype": engine["dtype"], "max_model_len": engine["max_model_len"],
                       "max_num_seqs": engine["max_num_seqs"], "enforce_eager": True,
                       "distributed_executor_backend": "uni", "seed": 0},
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GB)}},
        # Serve LLM adds the replica actor's own CPU (1 by default) to the engine's bundle: 0 keeps the
        # replica at `cpus` in all, as the router's variant replica is.
        deployment_config={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
        log_engine_metrics=False,
    )
    # Its ingress at the router's 0.1 CPU (Serve LLM's default is 1, which 2 CPUs cannot give next to two engines).
    app = build_openai_app({"llm_configs": [config], "ingress_deployment_config": {
        "ray_actor_options": {"num_cpus": ROUTER_CPUS}}})
    serve.run(app, name="bench-serve-llm", route_prefix=route_prefix)


class Bench:
    def __init__(self, args: argparse.Namespace, prompts: list[str]) -> None:
        self.args, self.prompts = args, prompts

    def measure(self, target: Target, clients: int, duration_s: float, warmup_s: float) -> LoadReport:
        report = asyncio.run(run_load(target.url, target.model, clients=clients, duration_s=duration_s,
                                      prompts=self.prompts, max_tokens=self.args.max_tokens, stream=self.args.stream,
                                      warmup_s=warmup_s))
        print(f"  {target.label}: {report.summary()}", flush=True)
        return report

    def check(self, target: Target) -> None:
        """One request, so that a misconfigured server stops the run before minutes of failed load."""
        with httpx.Client(timeout=120) as http:
            response = http.post(f"{target.url}/v1/completions", json={
                "model": target.model, "prompt": self.prompts[0], "max_tokens": self.args.max_tokens,
                "temperature": 0})
        if response.status_code != 200:
            raise RuntimeError(f"{target.label} ({target.url}) answered a test request with "
                               f"{response.status_code}: {response.text[:500]}")

    def interleave(self, a: Target, b: Target) -> dict[str, Any]:
        """`rounds` measurements of each, alternating which goes first; throughput ratio a / b."""
        reports: dict[str, list[LoadReport]] = {a.label: [], b.label: []}
        if self.args.initial_warmup > 0:
            # The first seconds of a fresh server are slower (first batches of each size, lazily built
            # handles and connections): they would fall on whichever side goes first.
            for target in (a, b):
                asyncio.run(run_load(target.url, target.model, clients=self.args.clients,
                                     duration_s=self.args.initial_warmup, prompts=self.prompts,
                                     max_tokens=self.args.max_tokens, stream=self.args.stream))
        for rnd in range(self.args.rounds):
            order = (a, b) if rnd % 2 == 0 else (b, a)
            print(f"round {rnd + 1}/{self.args.rounds}", flush=True)
            for target in order:
                reports[target.label].append(self.measure(target, self.args.clients, self.args.duration,
                                                          self.args.warmup))
        per_round = [ra.requests_per_s / rb.requests_per_s if rb.requests_per_s else float("nan")
                     for ra, rb in zip(reports[a.label], reports[b.label], strict=True)]
        pooled = {label: LoadReport.combine(runs) for label, runs in reports.items()}
        return {
            "a": a.label, "b": b.label,
            "ratio": pooled[a.label].requests_per_s / pooled[b.label].requests_per_s
            if pooled[b.label].requests_per_s else float("nan"),
            "ratio_per_round": per_round,
            "ratio_median": statistics.median(per_round),
            "pooled": {label: report.to_dict() for label, report in pooled.items()},
            "rounds": {label: [r.to_dict() for r in runs] for label, runs in reports.items()},
        }


VLLM_CLIENT_TARGETS = {"request_throughput": 0.9, "output_throughput": 0.9, "p99_ttft_ms": 1.5}
"""Router / direct: at least this share of throughput, at most this multiple of p99 TTFT."""


WHOLE_BACKEND = "openai-whole"
"""Part 4's backend for whole (non-streamed) answers: every backend of vLLM's client streams."""


async def whole_completion(request_func_input: Any, session: Any, pbar: Any = None) -> Any:
    """A request function for vLLM's benchmark client that asks for the whole answer (`stream` false), as
    its streaming `openai` backend asks for the same completion otherwise. The client cannot see a token
    before the answer is complete, so its time to first token is the answer's latency."""
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput, _update_payload_common

    request = request_func_input  # the client passes it by this name
    payload = {"model": request.model_name or request.model, "prompt": request.prompt, "repetition_penalty": 1.0,
               "max_tokens": request.output_len, "logprobs": request.logprobs, "stream": False}
    _update_payload_common(payload, request)  # ignore_eos, as for the streaming backends
    output = RequestFuncOutput()
    output.prompt_len = request.prompt_len
    output.start_time = start = time.perf_counter()
    try:
        async with session.post(url=request.api_url, json=payload) as response:
            body = await response.json(content_type=None)
            output.latency = output.ttft = time.perf_counter() - start
            if response.status == 200:
                output.generated_text = body["choices"][0]["text"]
                output.output_tokens = body["usage"]["completion_tokens"]
                output.success = True
            else:
                output.error = json.dumps(body)
    except Exception as exc:  # the client counts it as a failed request, as its own backends do
        output.error = f"{type(exc).__name__}: {exc}"
    if pbar is not None:
        pbar.update(1)
    return output


def vllm_client(target: Target, tokenizer: Path, concurrency: int, prompts: int, input_len: int,
                output_len: int, stream: bool = True) -> dict[str, Any]:
    """One run of vLLM's benchmark client (`vllm bench serve`) against `target`; its result dict."""
    from vllm.benchmarks.lib.endpoint_request_func import ASYNC_REQUEST_FUNCS
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    ASYNC_REQUEST_FUNCS.setdefault(WHOLE_BACKEND, whole_completion)  # before the parser lists the backends
    cpu_before = front_cpu_s(target)
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai" if stream else WHOLE_BACKEND, "--base-url", target.url, "--endpoint", "/v1/completions",
        "--model", target.model,
        "--tokenizer", str(tokenizer), "--dataset-name", "random", "--random-input-len", str(input_len),
        "--random-output-len", str(output_len), "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
        "--ignore-eos", "--seed", "0", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--disable-tqdm",
    ])
    result = dict(bench_main(args))
    keep = ("completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
            "p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms", "p99_e2el_ms")
    report = {k: result.get(k) for k in keep}
    cpu_after = front_cpu_s(target)
    by_process = dict.fromkeys(target.front, 0.0)
    for (name, pid), seconds in cpu_after.items():
        by_process[name] += 1000 * (seconds - cpu_before.get((name, pid), 0.0)) / max(1, int(result["completed"]))
    report["front_cpu_ms_per_request"] = sum(by_process.values())
    report["front_cpu_ms_per_request_by_process"] = by_process
    split = ", ".join(f"{name} {ms:.1f}" for name, ms in by_process.items())
    print(f"  {target.label} at {concurrency}: {report['request_throughput']:.1f} req/s, "
          f"{report['output_throughput']:.0f} tok/s, p99 TTFT {report['p99_ttft_ms']:.0f} ms, "
          f"{report['front_cpu_ms_per_request']:.1f} ms of front-end CPU per request ({split}), "
          f"{report['failed']} failed", flush=True)
    return report


def vllm_client_part(router: Target, direct: Target, tokenizer: Path, args: argparse.Namespace) -> dict[str, Any]:
    """vLLM's client on both servers at each concurrency, `rounds` times, alternating which goes first."""
    out: dict[str, Any] = {"by_concurrency": {}}
    for concurrency in args.concurrency:
        runs: dict[str, list[dict[str, Any]]] = {router.label: [], direct.label: []}
        prompts = max(args.vllm_prompts, 4 * concurrency)
        for target in (router, direct):  # warm-up: the first batches of each size are slower
            vllm_client(target, tokenizer, concurrency, 2 * concurrency, args.random_input_len, args.random_output_len,
                        args.stream)
        for rnd in range(args.rounds):
            for target in ((router, direct) if rnd % 2 == 0 else (direct, router)):
                runs[target.label].append(vllm_client(target, tokenizer, concurrency, prompts,
                                                      args.random_input_len, args.random_output_len, args.stream))
        median = {label: {k: statistics.median(r[k] for r in rs)
                          for k in (*VLLM_CLIENT_TARGETS, "front_cpu_ms_per_request")}
                  for label, rs in runs.items()}
        ratios = {k: median[router.label][k] / median[direct.label][k] for k in VLLM_CLIENT_TARGETS}
        out["by_concurrency"][str(concurrency)] = {"runs": runs, "median": median, "ratio": ratios,
                                 "met": all((ratios[k] >= t) if k != "p99_ttft_ms" else (ratios[k] <= t)
                                            for k, t in VLLM_CLIENT_TARGETS.items())}
    return out


def w8a8_model(model_dir: Path, data: Any, out: Path) -> Path:
    """`model_dir` quantized to W8A8 int8 as the quantize stage does it (calibrated on the train split)."""
    from bench_quantize import split_tokens

    from kubeforge.quantize.stage import quantize_model
    from kubeforge.spec.quantize import QuantizeSpec

    calibration = split_tokens(data, "train", 64)
    spec = QuantizeSpec(scheme="w8a8-int8", calibration_samples=len(calibration), batch_size=8, ignore=["lm_head"])
    quantize_model(spec, model_dir, out, calibration, split_tokens(data, "test", 32),
                   data.result.special_tokens.get("pad_id"), "cpu")
    return out


def run_part(name: str, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    print(f"\n== {name} ==", flush=True)
    before, start = os.getloadavg()[0], time.monotonic()
    result = body()
    result["load_average_1m"] = {"before": before, "after": os.getloadavg()[0]}
    result["wall_s"] = time.monotonic() - start
    return result


def ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f}"


def print_tables(results: dict[str, Any]) -> None:
    print("\n| comparison | A | B | A req/s | B req/s | ratio A/B (pooled) | per round | target | met |")
    print("|---|---|---|---:|---:|---:|---|---|---|")
    rows: list[dict[str, Any]] = []
    for key, target in (("router_overhead", f">= {ROUTER_TARGET}"), ("engines", "none")):
        if key not in results:
            continue
        part = results[key]
        pa, pb = part["pooled"][part["a"]], part["pooled"][part["b"]]
        met = "n/a" if key == "engines" else ("yes" if part["ratio"] >= ROUTER_TARGET else "no")
        rounds = ", ".join(f"{r:.3f}" for r in part["ratio_per_round"])
        print(f"| {key} | {part['a']} | {part['b']} | {pa['requests_per_s']:.2f} | {pb['requests_per_s']:.2f} | "
              f"{part['ratio']:.3f} | {rounds} | {target} | {met} |")
        rows += [pa | {"label": part["a"]}, pb | {"label": part["b"]}]
    if "load" in results:
        load = results["load"]["report"]
        met = "yes" if load["failed"] == 0 else "no"
        print(f"| load: failed requests | {load['clients']} clients, {load['duration_s']:.0f} s | | "
              f"{load['requests_per_s']:.2f} | | {load['failed']} of {load['requests']} | | 0 | {met} |")
        rows.append(load | {"label": "load test (router, vllm)"})
    print("\n| run | clients | requests | failed | req/s | tokens/s | p50 ms | p90 ms | p99 ms | TTFT p50 ms | "
          "TTFT p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['label']} | {row['clients']} | {row['requests']} | {row['failed']} | "
              f"{row['requests_per_s']:.2f} | {row['tokens_per_s']:.1f} | {ms(row['latency_p50_s'])} | "
              f"{ms(row['latency_p90_s'])} | {ms(row['latency_p99_s'])} | {ms(row['ttft_p50_s'])} | "
              f"{ms(row['ttft_p99_s'])} |")
    for key, other in (("vllm_client", "vLLM server"), ("serve_llm", "Serve LLM")):
        if key not in results:
            continue
        print(f"\n| vLLM's client, concurrency | router req/s | {other} req/s | ratio | router tok/s | {other} tok/s | "
              f"ratio | router p99 TTFT ms | {other} p99 TTFT ms | ratio | met | front-end CPU ms per request, "
              f"router / {other} |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
        for concurrency, part in results[key]["by_concurrency"].items():
            ma, mb = part["median"].values()  # router first, as vllm_client_part builds it
            r = part["ratio"]
            print(f"| {concurrency} | {ma['request_throughput']:.1f} | {mb['request_throughput']:.1f} | "
                  f"{r['request_throughput']:.2f} | {ma['output_throughput']:.0f} | {mb['output_throughput']:.0f} | "
                  f"{r['output_throughput']:.2f} | {ma['p99_ttft_ms']:.0f} | {mb['p99_ttft_ms']:.0f} | "
                  f"{r['p99_ttft_ms']:.2f} | {'yes' if part['met'] else 'no'} | "
                  f"{ma['front_cpu_ms_per_request']:.1f} / {mb['front_cpu_ms_per_request']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".kubeforge")
    parser.add_argument("--router", action="store_true", help="Part 1: router vs vLLM's own server.")
    parser.add_argument("--engines", action="store_true", help="Part 2: vllm vs transformers engine.")
    parser.add_argument("--load", action="store_true", help="Part 3: the load test.")
    parser.add_argument("--vllm-client", action="store_true",
                        help="Part 4: vLLM's benchmark client on the router and on vLLM's own server.")
    parser.add_argument("--serve-llm", action="store_true",
                        help="Part 5: vLLM's benchmark client on the router and on Ray Serve LLM.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32],
                        help="Concurrencies of parts 4 and 5.")
    parser.add_argument("--vllm-prompts", type=int, default=200, help="Part 4's requests per run (at least 4x "
                        "the concurrency).")
    parser.add_argument("--random-input-len", type=int, default=32)
    parser.add_argument("--random-output-len", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8, help="Clients in parts 1 and 2.")
    parser.add_argument("--duration", type=float, default=20.0, help="Measured seconds per run in parts 1 and 2.")
    parser.add_argument("--warmup", type=float, default=3.0, help="Unmeasured seconds before every run.")
    parser.add_argument("--initial-warmup", type=float, default=10.0,
                        help="Unmeasured seconds of load on each server before the rounds of parts 1 and 2.")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds in parts 1 and 2.")
    parser.add_argument("--load-clients", type=int, default=64)
    parser.add_argument("--load-duration", type=float, default=60.0)
    parser.add_argument("--load-warmup", type=float, default=10.0,
                        help="Unmeasured seconds of the load test's load first.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=32, help="Distinct prompts (validation sequences).")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--w8a8", action="store_true",
                        help="Serve the model's W8A8 quantization (llm-compressor, as the quantize stage makes it).")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="Activations (default float32; bfloat16 with --w8a8, whose CPU kernels need it).")
    parser.add_argument("--max-num-seqs", type=int, default=64,
                        help="vLLM batch size (both vLLM servers), and requests a replica takes at once.")
    parser.add_argument("--json", type=Path, help="Write every number here.")
    args = parser.parse_args()
    for name in ("clients", "rounds", "load_clients", "max_tokens", "prompts", "prompt_tokens", "max_num_seqs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: at least 1 (got {getattr(args, name)})")
    for name in ("duration", "load_duration"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')}: a positive number of seconds (got {getattr(args, name)})")
    for name in ("warmup", "initial_warmup", "load_warmup"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')}: zero or more seconds (got {getattr(args, name)})")
    if not (args.router or args.engines or args.load or args.vllm_client or args.serve_llm):
        args.router = args.engines = args.load = True

    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = time.monotonic()
    # A Ray runtime of this process's own (never a shared one from RAY_ADDRESS): the engines' CPU
    # reservations below are sized for exactly 2 CPUs.
    os.environ.pop("RAY_ADDRESS", None)
    use_local_runtime_settings()  # as `kubeforge serve` starts Ray: HAProxy in front of the router replica
    with haproxy_ports_of_its_own():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    model_dir, data = pretrained_model(args.workdir, "bench_serve")
    logs = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    args.dtype = args.dtype or ("bfloat16" if args.w8a8 else "float32")
    if args.w8a8:
        from kubeforge.quantize.serving import require_servable

        model_dir = w8a8_model(model_dir, data, logs / "w8a8")
        require_servable(model_dir, "vllm", "cpu", args.dtype)
    prompts = validation_prompts(data, model_dir, args.prompts, args.prompt_tokens)
    bench = Bench(args, prompts)
    engine = {"name": "vllm", "max_model_len": 256, "dtype": args.dtype, "max_num_seqs": args.max_num_seqs}
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {
            "engine": engine, "kv_cache_gb": KV_CACHE_GB, "model_dir": str(model_dir)},
    }

    niceness = ray_worker_niceness()
    results["settings"]["niceness"] = niceness
    port = free_port()
    direct: DirectVllm | None = None
    try:
        if args.router or args.vllm_client:
            # Started first: its start-up overlaps the Serve application's.
            direct = DirectVllm(model_dir, engine, logs / "vllm-server.log", niceness)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # 0.9 CPU per engine and 0.1 per router: the two applications of part 2 fill the 2 CPUs exactly.
        deploy(model_dir, engine, "bench-vllm", "/vllm", 0.9)
        router_vllm = Target("router (vllm)", f"http://127.0.0.1:{port}/vllm", MODEL,
                             {"router replica": "ServeReplica:bench-vllm:Router",
                              "variant replica": "ServeReplica:bench-vllm:model-", "HAProxy": "bin/haproxy"})
        bench.check(router_vllm)
        if direct is not None:
            direct.wait_ready()
            target_direct = Target("vLLM server", direct.url, MODEL,
                                   {"API server": "vllm.entrypoints.openai.api_server"})
            bench.check(target_direct)
            if args.router:
                results["router_overhead"] = run_part(
                    "1. router overhead: KubeForge router vs vLLM's own server",
                    lambda: bench.interleave(router_vllm, target_direct))
            if args.vllm_client:
                results["vllm_client"] = run_part(
                    "4. vLLM's benchmark client: KubeForge router vs vLLM's own server",
                    lambda: vllm_client_part(router_vllm, target_direct, model_dir, args))
            # Its engine would otherwise hold memory and wake up next to parts 2 and 3.
            direct.stop()
            direct = None
        if args.serve_llm:
            deploy_serve_llm(model_dir, engine, "/llm", 0.9)
            serve_llm = Target("Ray Serve LLM", f"http://127.0.0.1:{port}/llm", MODEL,
                               {"Serve LLM replicas": "ServeReplica:bench-serve-llm:", "HAProxy": "bin/haproxy"})
            bench.check(serve_llm)
            results["serve_llm"] = run_part(
                "5. vLLM's benchmark client: KubeForge router vs Ray Serve LLM",
                lambda: vllm_client_part(router_vllm, serve_llm, model_dir, args))
            serve.delete("bench-serve-llm")  # its engine would otherwise hold a CPU through the parts below
        if args.engines:
            deploy(model_dir, {**engine, "name": "transformers"}, "bench-transformers", "/transformers", 0.9)
            router_hf = Target("router (transformers)", f"http://127.0.0.1:{port}/transformers", MODEL)
            bench.check(router_hf)
            results["engines"] = run_part("2. engines: vllm vs transformers, through the router",
                                          lambda: bench.interleave(router_vllm, router_hf))
            # Its replica would otherwise hold 0.9 CPU and memory through the load test.
            serve.delete("bench-transformers")
        if args.load:
            results["load"] = run_part(
                f"3. load test: {args.load_clients} clients, {args.load_duration:g} s, router on vllm",
                lambda: {"report": bench.measure(router_vllm, args.load_clients, args.load_duration,
                                                 args.load_warmup).to_dict()})
    finally:
        if direct is not None:
            direct.stop()
        serve.shutdown()
        ray.shutdown()
    results["wall_s"] = time.monotonic() - started

    if args.json is not None:  # first: the numbers outlive a mistake in the tables below
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"numbers written to {args.json}")
    print_tables(results)
    print(f"\nwall time {results['wall_s']:.0f} s; logs of vLLM's server in {logs}")


if __name__ == "__main__":
    main()
