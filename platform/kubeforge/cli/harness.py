"""`kubeforge harness`: lm-evaluation-harness tasks against a served model, scored in place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click
from rich.table import Table

from kubeforge.cli import main
from kubeforge.cli.common import friendly_errors, out, output_option
from kubeforge.errors import KubeForgeError


def served_max_length(base_url: str, model: str, api_key: str | None) -> int:
    """The served model's context length, from the server's /v1/models (vLLM reports `max_model_len`)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise KubeForgeError(f"URL: cannot reach {base_url} ({exc})") from None
    if response.status_code in (401, 403):
        raise KubeForgeError(f"URL: {base_url} refused the request ({response.status_code}); pass its token with "
                             "--api-key-env")
    if response.status_code != 200:
        raise KubeForgeError(f"URL: {base_url}/v1/models answered {response.status_code}; is it an OpenAI-compatible "
                             "server?")
    cards = {card.get("id"): card for card in response.json().get("data", [])}
    if model not in cards:
        raise KubeForgeError(f"--model: {base_url} serves no model '{model}' (it serves: {', '.join(map(str, cards))})")
    length = cards[model].get("max_model_len")
    if not isinstance(length, int):
        raise KubeForgeError(f"--max-length: {base_url} does not say the context length of '{model}'; pass it")
    return length


@main.command()
@click.argument("url")
@click.option("--model", required=True, help="The served model's name (as /v1/models lists it).")
@click.option("--tokenizer", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder with the served model's tokenizer: log-likelihood requests carry its token ids.")
@click.option("--task", "tasks", multiple=True, metavar="NAME",
              help="A shipped task (stdlib_funcname, stdlib_complete) or a task of --task-dir; repeatable. "
                   "Default: the shipped tasks.")
@click.option("--task-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder of your own lm-evaluation-harness task YAML files (local data only).")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Questions per task.")
@click.option("--num-fewshot", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--max-length", type=click.IntRange(min=2), help="The model's context length (default: /v1/models).")
@click.option("--api-key-env", metavar="VAR", help="Environment variable holding the server's bearer token.")
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests in flight at once.")
@output_option
@friendly_errors
def harness(url: str, model: str, tokenizer: Path, tasks: tuple[str, ...], task_dir: Path | None, limit: int,
            num_fewshot: int, max_length: int | None, api_key_env: str | None, concurrency: int, output: str) -> None:
    """Score the model served at URL (vLLM, `kubeforge serve`) on lm-evaluation-harness tasks, offline.

    The same tasks and metric names as `spec.evaluate.harness` (`harness_<task>_<metric>`), so a deployed
    model's figures compare with the ones its pipeline recorded.
    """
    from pydantic import ValidationError

    from kubeforge.evaluate.harness import prepare, run_tasks, served_model
    from kubeforge.spec.evaluate import SHIPPED_HARNESS_TASKS, HarnessSpec

    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise KubeForgeError(f"--api-key-env: the environment variable {api_key_env} is not set")
    try:
        spec = HarnessSpec(tasks=list(tasks or SHIPPED_HARNESS_TASKS), limit=limit, num_fewshot=num_fewshot,
                           task_dir=str(task_dir.resolve()) if task_dir is not None else None)
    except ValidationError as exc:
        raise KubeForgeError(f"--task: {exc.errors()[0]['msg']}") from None
    length = max_length or served_max_length(url, model, api_key)
    with tempfile.TemporaryDirectory(prefix="kubeforge-harness-") as scratch:
        prepared = prepare(spec, Path(scratch), Path.cwd(), [])
        lm = served_model(url, model, str(tokenizer), max_length=length, api_key=api_key, concurrency=concurrency)
        metrics = run_tasks(lm, prepared, log=out.print)
    if output == "json":
        out.print_json(data=metrics)
        return
    table = Table(show_edge=False, pad_edge=False, box=None)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(metrics.items()):
        table.add_row(name, "-" if value is None else f"{value:.4g}")
    out.print(table)
