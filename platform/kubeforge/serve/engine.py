"""`ModelServer`: one variant's Ray Serve deployment, serving a model folder through vLLM's own OpenAI server.

The replica builds exactly what `vllm serve` builds: its arguments go through vLLM's own argument
parser (`vllm_args`, which the parity test and the benchmark also give `vllm serve`), then vLLM's
engine client, FastAPI app and serving state (`OpenAIServingCompletion`, `OpenAIServingChat`,
`OpenAIServingModels`, the model's own chat template). The router hands each request over unchanged
and the replica runs it through that app in its own process (`relay.call_asgi`): every field,
default, error and stream chunk is vLLM's. What KubeForge adds is the model's served names (`<name>`
and `<name>:<variant>`), token counts for the router's metrics, and a health check on the engine.

On GPU the replica holds `resources.gpus_per_replica` GPUs (`vllm_args`): a share of one GPU caps vLLM's
memory to that share, so replicas sharing the GPU all start; a whole number above one is vLLM's tensor
parallelism, its worker processes running beside the replica on the GPUs Ray gave it.

With `spec.lora` the replica serves a base model (as `<name>:base`) and LoRA adapters over it, one per
variant (`<name>:stable`, `<name>:candidate`, `<name>:<adapter>`): they are the deployment's Ray Serve
`user_config`, so a new set loads into the running replica (`reconfigure`) without restarting it.

When the engine core process dies, `check_health` raises, so Ray Serve replaces the replica (instead
of keeping one alive that fails every request); requests that reach it meanwhile are sent back to the
router unanswered, which sends them again (`Router._start`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from ray import serve

from kubeforge.errors import KubeForgeError
from kubeforge.serve.relay import ForwardedRequest, call_asgi, count_tokens
from kubeforge.spec.deployment import GPU_SHARE_MARGIN, tensor_parallel_size


def vllm_args(folder: str, names: list[str], engine: dict[str, Any], lora: dict[str, int] | None = None,
              gpus: float = 0.0) -> list[str]:
    """`vllm serve` command-line arguments for `folder` served under `names` with the `engine` section, and
    room for `lora["max_loras"]` adapters of rank up to `lora["max_rank"]`, on `gpus` GPUs
    (resources.gpus_per_replica: 0 is CPU, a share below 1 shares one GPU, a whole number above 1 is
    tensor parallel over that many)."""
    args = ["--model", folder, "--served-model-name", *names, "--dtype", engine["dtype"],
            "--disable-log-stats", "--seed", "0"]
    # CUDA graphs and torch.compile cost minutes at start and buy nothing on CPU; on GPU they are what
    # makes decoding fast, so they stay on unless the manifest asks for eager (engine.enforce_eager).
    if gpus == 0 or engine.get("enforce_eager"):
        args.append("--enforce-eager")
    tensor_parallel = tensor_parallel_size(gpus)
    if tensor_parallel > 1:
        # One worker process per GPU, started by the engine core in the replica's pod: the replica holds
        # all of them (num_gpus, see `app.build_app`), so they are on one node and Ray has already made
        # exactly them visible (CUDA_VISIBLE_DEVICES), as they would be to `vllm serve` on that machine.
        args += ["--tensor-parallel-size", str(tensor_parallel), "--distributed-executor-backend", "mp"]
    else:
        # The engine core is already a process of its own; a worker process under it would add a
        # second vLLM start-up (tens of seconds on a small CPU) for a single-device replica.
        args += ["--distributed-executor-backend", "uni"]
    memory = vllm_gpu_memory_utilization(engine.get("gpu_memory_utilization"), gpus)
    if memory is not None:
        args += ["--gpu-memory-utilization", str(memory)]
    for flag, key in (("--max-model-len", "max_model_len"), ("--quantization", "quantization"),
                      ("--max-num-seqs", "max_num_seqs")):
        if engine.get(key) is not None:
            args += [flag, str(engine[key])]
    if lora is not None:
        args += ["--enable-lora", "--max-lora-rank", str(lora["max_rank"]), "--max-loras", str(lora["max_loras"])]
    return args


def vllm_gpu_memory_utilization(requested: float | None, gpus: float) -> float | None:
    """vLLM's `--gpu-memory-utilization` on `gpus` GPUs: `requested` (engine.gpu_memory_utilization, which
    the manifest checks against the share) when set; a share of one GPU less `GPU_SHARE_MARGIN`, so that
    the replicas sharing it all start (vLLM refuses to start with less free memory than its budget: its
    default, 0.92 of the GPU, leaves a second replica nothing, and exactly the share leaves it its share
    less the first one's CUDA context); None, vLLM's default, on CPU and on whole GPUs."""
    if requested is not None:
        return requested
    if 0 < gpus < 1:
        return round(gpus - GPU_SHARE_MARGIN, 4)  # 0.45, not 0.44999999999999996, on vLLM's command line
    return None


def parse_vllm_args(argv: list[str]) -> Any:
    """vLLM's own parsing and checks of `vllm serve` arguments."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    return args


def engine_config(args: Any, label: dict[str, str]) -> Any:
    """vLLM's engine configuration of the parsed `args`: what vLLM checks once it has read the model's
    config. A model that cannot be split over the replica's GPUs (its attention heads are not divisible
    by the tensor parallel size) is refused there: the error names the manifest field to change."""
    from pydantic import ValidationError
    from vllm import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    try:
        return AsyncEngineArgs.from_cli_args(args).create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    except ValueError as error:  # vLLM's configs are pydantic dataclasses: a ValidationError is a ValueError
        # vLLM's own words, without pydantic's wrapping (the whole input of VllmConfig) around them.
        reason = ("; ".join(str(e["msg"]).removeprefix("Value error, ") for e in error.errors())
                  if isinstance(error, ValidationError) else str(error))
        tensor_parallel = int(args.tensor_parallel_size)
        if tensor_parallel > 1 and "tensor parallel" in reason:
            raise KubeForgeError(
                f"spec.resources.gpus_per_replica: vLLM cannot split {label['model']} version {label['version']} "
                f"over {tensor_parallel} GPUs: {reason.rstrip('.')}; use a number of GPUs the model allows, or 1"
            ) from error
        raise


@serve.deployment
class ModelServer:
    async def __init__(self, path: str, label: dict[str, str], engine: dict[str, Any],  # type: ignore[misc]
                       lora: dict[str, int] | None = None, gpus: float = 0.0) -> None:
        import torch
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        from kubeforge.serve.resolve import replica_model_folder

        self.label = label
        self.lora = lora
        self.adapters: dict[str, str] = {}
        """Served adapter name -> the source it was loaded from (a folder, or a `models:/` URI)."""
        # A `models:/` URI (a RayService replica on Kubernetes) is downloaded here; a local folder is used as is.
        folder = replica_model_folder(path, "vllm", "cuda" if torch.cuda.is_available() else "cpu", engine["dtype"])
        pinned = f"{label['model']}:{label['variant']}"
        # Under LoRA the bare name is the router's to split between the adapters: the base is only pinned.
        names = [pinned] if lora is not None else [label["model"], pinned]
        args = parse_vllm_args(vllm_args(str(folder), names, engine, lora, gpus))
        config = engine_config(args, label)
        self.engine = AsyncLLM.from_vllm_config(vllm_config=config, usage_context=UsageContext.OPENAI_API_SERVER,
                                                disable_log_stats=True)
        # vLLM's serving classes call `engine_client.generate`: count the tokens of each request there.
        self.engine.generate = count_tokens(self.engine.generate)  # type: ignore[method-assign]
        tasks = await self.engine.get_supported_tasks()
        self.app = build_app(args, tasks, self.engine.model_config)
        await init_app_state(self.engine, self.app.state, args, tasks)
        # vLLM's handler of engine errors asks the uvicorn server it expects here to exit; in a replica,
        # Serve's health check (`check_health`) replaces the replica instead.
        self.app.state.server = SimpleNamespace(should_exit=False)
        self.max_model_len = int(self.engine.model_config.max_model_len)

    def info(self) -> dict[str, Any]:
        return {**self.label, "max_model_len": self.max_model_len, "adapters": sorted(self.adapters)}

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Ray Serve's in-place update (`user_config`): serve exactly the LoRA adapters of
        `config["adapters"]` ({served name: folder or `models:/` URI}), loading new ones and unloading the
        others, without restarting the replica or its engine."""
        from kubeforge.serve.resolve import replica_adapter_folder

        if self.lora is None:
            raise ValueError("user_config: this replica serves no LoRA adapters (the deployment has no spec.lora)")
        unknown = sorted(set(config) - {"adapters"})
        if unknown:
            raise ValueError(f"user_config: unknown keys {unknown}; only 'adapters' is read")
        wanted = {str(name): str(source) for name, source in (config.get("adapters") or {}).items()}
        for name in [n for n, source in self.adapters.items() if wanted.get(n) != source]:
            await self._unload(name)
        for name, source in wanted.items():
            if name in self.adapters:
                continue
            folder = await asyncio.to_thread(replica_adapter_folder, source, self.lora["max_rank"])
            await self._load(name, str(folder))
            self.adapters[name] = source

    async def _load(self, name: str, folder: str) -> None:
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        result = await self.app.state.openai_serving_models.load_lora_adapter(
            LoadLoRAAdapterRequest(lora_name=name, lora_path=folder))
        if not isinstance(result, str):  # vLLM's ErrorResponse
            raise ValueError(f"user_config.adapters.{name}: vLLM could not load {folder}: {result.error.message}")

    async def _unload(self, name: str) -> None:
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        models = self.app.state.openai_serving_models
        loaded = models.lora_requests.get(name)
        await models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
        if loaded is not None:
            # vLLM's unload only forgets the name; the engine would keep the weights in one of its
            # adapter slots (max_loras) until evicted.
            await self.engine.remove_lora(loaded.lora_int_id)
        del self.adapters[name]

    async def ready(self) -> dict[str, Any]:
        """What the router's readiness probe asks: raises while the engine is dead."""
        await self.engine.check_health()
        return self.info()

    async def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine died fails it and is replaced."""
        await self.engine.check_health()

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[dict[str, Any]]:
        """Answer `request` with vLLM's OpenAI app (events of `relay.call_asgi`)."""
        if self.engine.errored:
            # The router sends the request again, to the replica that replaces this one.
            yield {"unavailable": "its engine stopped and its replica is being replaced"}
            return
        async for event in call_asgi(self.app, request):
            if event.get("status", 0) >= 500 and self.engine.errored:
                # The engine died under this request before its answer began: nothing reached the client,
                # so the router may send it again too.
                yield {"unavailable": "its engine stopped while answering and its replica is being replaced"}
                return
            yield event

    def __del__(self) -> None:
        # The engine core is a child process: stop it with the replica rather than leave it to exit
        # when it notices its parent is gone.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
