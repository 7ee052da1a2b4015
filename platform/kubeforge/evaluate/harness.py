"""lm-evaluation-harness tasks on the models the evaluate stage scores, offline, on local task files.

Called by `kubeforge.evaluate.stage`: `prepare` once per run (it writes the shipped tasks' data, reads and
checks the user's task folder, and checks promotion gates that name harness metrics), then `run_tasks` on
each loaded model (the harness's `HFLM` wraps the model object, so no model is loaded twice).
`kubeforge harness` runs the same tasks against a served endpoint (`served_model`: the harness's
`local-completions`), so a deployed model is scored in place.

* Shipped tasks (`harness_tasks/*.yaml`): their data is built here from the Python standard library's own
  source (seeded, so the same Python gives the same questions) into the stage folder.
* A user's `task_dir`: every `*.yaml`/`*.yml` in it must parse and name local data only: `dataset_path` a
  local loader of the `datasets` library (json, csv, parquet, text) and `dataset_kwargs.data_files` existing
  files, relative to the YAML file's folder. `custom_dataset` (code that loads data) and group configs are
  refused. The run sets HF_DATASETS_OFFLINE and HF_HUB_OFFLINE besides, so nothing reaches the hub.

Metric names: `harness_<task>_<metric>`, with `_<filter>` appended for a filter other than the harness's
default `none`; the metric and filter are lower-cased with any run of other characters turned into `_`,
so that promotion gates (`evaluate.<metric>`, letters and underscores) can name them.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import random
import re
import sysconfig
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubeforge.errors import StageError
from kubeforge.spec.evaluate import HARNESS_TASK_NAME, SHIPPED_HARNESS_TASKS, EvaluateSpec, HarnessSpec
from kubeforge.stages.evaluate import EVALUATE, HARNESS_PREFIX

STAGE = EVALUATE.name
SHIPPED_DIR = Path(__file__).with_name("harness_tasks")
LOCAL_LOADERS = ("json", "csv", "parquet", "text")
"""`datasets` loaders that read only the files they are given."""
OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood", "loglikelihood_rolling")
# What the harness reports when a task has no metric_list (lm_eval/api/task.py's defaults per output type).
DEFAULT_METRICS = {
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood": ("perplexity", "acc"),
    "generate_until": ("exact_match",),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
}
LOWER_IS_BETTER = frozenset({"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"})
DATA_SEED = 20240611
TEST_QUESTIONS = 200
FEWSHOT_QUESTIONS = 40
# Modules whose public, documented functions make the shipped tasks: pure Python, present in every CPython.
STDLIB_MODULES = (
    "base64", "bisect", "calendar", "colorsys", "copy", "csv", "difflib", "filecmp", "fnmatch", "fractions",
    "ftplib", "genericpath", "getopt", "gettext", "glob", "gzip", "heapq", "html/__init__", "imaplib",
    "inspect", "ipaddress", "json/__init__", "keyword", "linecache", "locale", "mimetypes", "ntpath",
    "numbers", "opcode", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib",
    "posixpath", "pprint", "py_compile", "quopri", "random", "reprlib", "secrets", "shlex", "shutil",
    "smtplib", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "tokenize", "traceback", "types", "typing", "urllib/parse", "uu", "uuid", "warnings",
    "wave", "weakref", "zipfile", "zipimport",
)


# ---------------------------------------------------------------------------------------------
# metric names


def _slug(text: str) -> str:
    return re.sub(r"[^a-z]+", "_", text.lower()).strip("_")


def metric_name(task: str, metric: str, filter_name: str = "none") -> str:
    """`harness_<task>_<metric>[_<filter>]`: what the comparison, MLflow and promotion gates call it."""
    name = f"{HARNESS_PREFIX}{task}_{_slug(metric)}"
    return name if filter_name == "none" else f"{name}_{_slug(filter_name)}"


def collect_metrics(results: dict[str, Any], tasks: list[str]) -> dict[str, float | None]:
    """The harness's `results` section (`{task: {"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...}}`)
    as flat metric names; standard errors and non-numbers are left out, NaN becomes None."""
    metrics: dict[str, float | None] = {}
    for task in tasks:
        for key, value in results.get(task, {}).items():
            metric, sep, filter_name = key.partition(",")
            if not sep or metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            name = metric_name(task, metric, filter_name)
            if name in metrics:
                raise StageError(STAGE, f"harness task {task}: metrics {key!r} and another one are both named {name}")
            metrics[name] = float(value) if math.isfinite(value) else None
    return metrics


# ---------------------------------------------------------------------------------------------
# task files


class _TaskLoader(yaml.SafeLoader):
    """Safe YAML plus the harness's `!function module.name` tag, kept as text: checking a task file runs
    none of its code."""


def _function_tag(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    return f"!function {loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else '?'}"


_TaskLoader.add_constructor("!function", _function_tag)


def read_task_yaml(path: Path, field: str, _seen: frozenset[Path] = frozenset()) -> dict[str, Any]:
    """A task file as the harness reads it (its `include:` files merged under it); one-line errors naming
    `field` and the file."""
    if path.resolve() in _seen:
        raise StageError(STAGE, f"{field}: {path} includes itself")
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskLoader)
    except (OSError, UnicodeDecodeError) as exc:
        raise StageError(STAGE, f"{field}: cannot read {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise StageError(STAGE, f"{field}: {path} is not valid YAML{line}: {problem}") from exc
    if not isinstance(config, dict):
        raise StageError(STAGE, f"{field}: {path} must hold a mapping of task settings")
    includes = config.pop("include", None)
    if includes is None:
        return config
    merged: dict[str, Any] = {}
    for include in includes if isinstance(includes, list) else [includes]:
        include_path = path.parent / str(include)
        if not include_path.is_file():
            raise StageError(STAGE, f"{field}: {path} includes {include}, which does not exist ({include_path})")
        merged.update(read_task_yaml(include_path, field, _seen | {path.resolve()}))
    merged.update(config)
    return merged


def _data_file_entries(files: Any) -> Iterator[tuple[str | None, str]]:
    if isinstance(files, str):
        yield None, files
    elif isinstance(files, list) and all(isinstance(f, str) for f in files):
        yield from ((None, f) for f in files)
    elif isinstance(files, dict):
        for split, entry in files.items():
            for _, name in _data_file_entries(entry):
                yield str(split), name
    else:
        raise TypeError


def local_data_files(config: dict[str, Any], base: Path, path: Path, field: str) -> Any:
    """`dataset_kwargs.data_files` with every file resolved against `base`; refuses anything but local files
    read by a local loader."""
    loader = config.get("dataset_path")
    if "custom_dataset" in config:
        raise StageError(STAGE, f"{field}: {path}: custom_dataset runs code to load data; name local files with "
                                f"dataset_path ({', '.join(LOCAL_LOADERS)}) and dataset_kwargs.data_files")
    if loader not in LOCAL_LOADERS:
        raise StageError(STAGE, f"{field}: {path}: dataset_path {loader!r} is not a local loader; use one of "
                                f"{', '.join(LOCAL_LOADERS)} with dataset_kwargs.data_files (no hub data sets)")
    kwargs = config.get("dataset_kwargs")
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    if files is None:
        raise StageError(STAGE, f"{field}: {path}: dataset_kwargs.data_files is missing; name the local files "
                                f"the {loader} loader reads")
    try:
        entries = list(_data_file_entries(files))
    except TypeError:
        raise StageError(STAGE, f"{field}: {path}: dataset_kwargs.data_files must be a file, a list of files or "
                                "a mapping of split to file(s)") from None
    for _, name in entries:
        if "://" in name or name.startswith("hf:"):
            raise StageError(STAGE, f"{field}: {path}: dataset_kwargs.data_files names {name!r}, which is not a "
                                    "local file")
        if not (base / name).is_file():
            raise StageError(STAGE, f"{field}: {path}: dataset_kwargs.data_files names {name}, which does not "
                                    f"exist ({base / name})")

    def resolve(entry: Any) -> Any:
        if isinstance(entry, str):
            return str((base / entry).resolve())
        if isinstance(entry, list):
            return [resolve(e) for e in entry]
        return {split: resolve(e) for split, e in entry.items()}

    return resolve(files)


@dataclass
class HarnessTask:
    name: str
    path: Path
    """The task's YAML file."""
    data_base: Path
    """Its data files' paths are relative to this folder."""
    config: dict[str, Any]
    """As read for checking (`!function` tags as text)."""
    data_files: Any
    """`dataset_kwargs.data_files` with absolute paths."""

    def metric_names(self) -> dict[str, bool]:
        """The metrics the harness will report for it, and whether lower is better for each."""
        listed = self.config.get("metric_list")
        output_type = str(self.config.get("output_type", "generate_until"))
        metrics: dict[str, bool] = {}
        if isinstance(listed, list) and listed:
            for entry in listed:
                if isinstance(entry, dict) and isinstance(entry.get("metric"), str):
                    lower = entry.get("higher_is_better") is False or entry["metric"] in LOWER_IS_BETTER
                    metrics[entry["metric"]] = lower
        else:
            metrics = {m: m in LOWER_IS_BETTER for m in DEFAULT_METRICS.get(output_type, ())}
        filters = [str(f["name"]) for f in self.config.get("filter_list") or [] if isinstance(f, dict) and "name" in f]
        return {metric_name(self.name, m, f): lower for m, lower in metrics.items() for f in filters or ["none"]}


def check_task(path: Path, data_base: Path, field: str) -> HarnessTask:
    config = read_task_yaml(path, field)
    if "group" in config and "task" not in config:
        raise StageError(STAGE, f"{field}: {path} is a group config; list its tasks in spec.evaluate.harness.tasks")
    name = config.get("task")
    if not isinstance(name, str) or not re.fullmatch(HARNESS_TASK_NAME, name):
        raise StageError(STAGE, f"{field}: {path}: task must name the task in lower-case letters and underscores "
                                f"(got {name!r}); it becomes part of the metric names")
    output_type = config.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise StageError(STAGE, f"{field}: {path}: output_type {output_type!r} is not one of "
                                f"{', '.join(OUTPUT_TYPES)}")
    files = local_data_files(config, data_base, path, field)
    return HarnessTask(name, path, data_base, config, files)


def read_task_dir(folder: Path, field: str = "spec.evaluate.harness.task_dir") -> dict[str, HarnessTask]:
    """Every task file of a user's folder, checked; by task name."""
    if not folder.is_dir():
        raise StageError(STAGE, f"{field}: {folder} is not a folder")
    files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
    if not files:
        raise StageError(STAGE, f"{field}: {folder} holds no task YAML files (*.yaml)")
    tasks: dict[str, HarnessTask] = {}
    for path in files:
        task = check_task(path, path.parent, field)
        if task.name in SHIPPED_HARNESS_TASKS:
            raise StageError(STAGE, f"{field}: {path}: task {task.name} is the name of a shipped task; rename it")
        if task.name in tasks:
            raise StageError(STAGE, f"{field}: {path} and {tasks[task.name].path} both define task {task.name}")
        tasks[task.name] = task
    return tasks


def task_dir_fingerprint(spec: EvaluateSpec, base_dir: Path) -> str | None:
    """The user's task files' contents, mixed into the stage's cache key (`Stage.cache_extra`): a changed
    question file reruns the stage."""
    harness = spec.harness
    if harness is None or harness.task_dir is None:
        return None
    folder = base_dir / harness.task_dir
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []:
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# the shipped tasks' data, from the standard library


@dataclass
class _Function:
    module: str
    name: str
    docstring: str
    source_lines: list[str]
    last_line: int
    """Index into source_lines of the body's last statement (a one-line one)."""


def _stdlib_functions() -> list[_Function]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[_Function] = []
    for module in STDLIB_MODULES:
        path = root / f"{module}.py"
        if not path.is_file():
            continue  # removed in this Python (e.g. uu in 3.13)
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.parse(source).body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
                continue
            doc = ast.get_docstring(node)
            last = node.body[-1]
            if not doc or len(node.body) < 3 or last.end_lineno != last.lineno or node.end_lineno != last.lineno:
                continue
            summary = " ".join(doc.split("\n\n")[0].split())
            found.append(_Function(module.removesuffix("/__init__").replace("/", "."), node.name, summary,
                                   lines[node.lineno - 1: node.end_lineno], last.lineno - node.lineno))
    return found


def _funcname_record(fn: _Function, names: list[str], rng: random.Random) -> dict[str, Any]:
    # The docstring must not give the answer away by naming the function.
    docstring = re.sub(rf"\b{re.escape(fn.name)}\b", "this function", fn.docstring)[:300]
    choices = [fn.name, *rng.sample([n for n in names if n != fn.name], 3)]
    rng.shuffle(choices)
    return {"module": fn.module, "docstring": docstring, "choices": choices, "label": choices.index(fn.name)}


def _complete_record(fn: _Function) -> dict[str, Any] | None:
    last = fn.source_lines[fn.last_line]
    target = last.strip()
    prompt = "\n".join(fn.source_lines[: fn.last_line]) + "\n" + last[: len(last) - len(last.lstrip())]
    if len(prompt) > 1200 or not 3 <= len(target) <= 80:
        return None
    return {"module": fn.module, "name": fn.name, "prompt": prompt, "target": target}


def write_stdlib_data(out_dir: Path, seed: int = DATA_SEED) -> dict[str, Path]:
    """The shipped tasks' questions as `<task>/{test,fewshot}.jsonl` under `out_dir`; by task name."""
    functions = _stdlib_functions()
    rng = random.Random(seed)
    rng.shuffle(functions)
    names = sorted({fn.name for fn in functions})
    records: dict[str, list[dict[str, Any]]] = {
        "stdlib_funcname": [_funcname_record(fn, names, rng) for fn in functions],
        "stdlib_complete": [r for r in map(_complete_record, functions) if r is not None],
    }
    folders: dict[str, Path] = {}
    for task, rows in records.items():
        folder = out_dir / task
        folder.mkdir(parents=True, exist_ok=True)
        splits = {"fewshot": rows[:FEWSHOT_QUESTIONS], "test": rows[FEWSHOT_QUESTIONS:][:TEST_QUESTIONS]}
        for split, part in splits.items():
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in part))
        folders[task] = folder
    return folders


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class Prepared:
    spec: HarnessSpec
    tasks: list[HarnessTask]
    lower_is_better: dict[str, bool] = field(default_factory=dict)
    """The metric names the tasks will report, and whether lower is better for each."""

    def summary(self) -> dict[str, Any]:
        return {
            "tasks": [t.name for t in self.tasks], "num_fewshot": self.spec.num_fewshot, "limit": self.spec.limit,
            "task_files": {t.name: str(t.path) for t in self.tasks}, "metrics": sorted(self.lower_is_better),
        }


def check_gates(gates: list[Any], expected: dict[str, bool]) -> None:
    """Gates on harness metrics must name one of the listed tasks' metrics; `max_regression` only on one where
    higher is better (the gate checks know the direction of the fixed metrics only)."""
    for i, gate in enumerate(gates):
        if gate.stage != STAGE or not gate.name.startswith(HARNESS_PREFIX):
            continue
        if gate.name not in expected:
            raise StageError(STAGE, (
                f"promotion.gates.{i}.metric: the harness tasks in spec.evaluate.harness.tasks do not produce "
                f"'{gate.name}' (they produce: {', '.join(sorted(expected)) or 'nothing'})"))
        if expected[gate.name] and gate.max_regression is not None:
            raise StageError(STAGE, (
                f"promotion.gates.{i}.max_regression: lower is better for {gate.name}, which max_regression "
                "cannot compare; use min/max"))


def prepare(spec: HarnessSpec, out_dir: Path, base_dir: Path, gates: list[Any]) -> Prepared:
    """The tasks to run, checked, with their data on disk; gates naming harness metrics checked too."""
    user = read_task_dir(base_dir / spec.task_dir) if spec.task_dir is not None else {}
    unknown = [n for n in spec.tasks if n not in SHIPPED_HARNESS_TASKS and n not in user]
    if unknown:
        raise StageError(STAGE, (
            f"spec.evaluate.harness.tasks: unknown task {unknown[0]!r} (shipped: {', '.join(SHIPPED_HARNESS_TASKS)}"
            f"; in task_dir: {', '.join(sorted(user)) or 'none'})"))
    tasks: list[HarnessTask] = []
    data = write_stdlib_data(out_dir / "data") if any(n in SHIPPED_HARNESS_TASKS for n in spec.tasks) else {}
    for name in spec.tasks:
        if name in user:
            tasks.append(user[name])
        else:
            tasks.append(check_task(SHIPPED_DIR / f"{name}.yaml", data[name], f"shipped harness task {name}"))
    prepared = Prepared(spec, tasks)
    for task in tasks:
        prepared.lower_is_better.update(task.metric_names())
    check_gates(gates, prepared.lower_is_better)
    return prepared


@contextmanager
def _offline() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(dict.fromkeys(saved, "1"))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _harness_config(task: HarnessTask) -> dict[str, Any]:
    """The task as the harness builds it: read by its own loader (which imports `!function` code), with the
    data files made absolute (the harness would resolve them against the working directory)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(task.path, resolve_func=True)
    config["dataset_kwargs"] = {**config.get("dataset_kwargs", {}), "data_files": task.data_files}
    return config


def loaded_model(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """The harness's model for a causal LM already loaded here (`HFLM` wraps the object, no second load)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def served_model(
    base_url: str, model: str, tokenizer: str, *, max_length: int, api_key: str | None, concurrency: int
) -> Any:
    """The harness's `local-completions` model: an OpenAI-compatible server (vLLM's, or `kubeforge serve`'s
    router) at `base_url`, scored through /v1/completions. Log-likelihoods come from `echo` with `logprobs`,
    so the requests carry token ids from the model's own tokenizer (a local folder), and contexts longer
    than the server's `max_length` are cut from the left, as the harness does for a local model."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    with _offline():
        return LocalCompletionsAPI(
            base_url=base_url.rstrip("/") + "/v1/completions", model=model, tokenizer=tokenizer,
            tokenizer_backend="huggingface", max_length=max_length, num_concurrent=concurrency,
            header={"Authorization": f"Bearer {api_key}"} if api_key else None,
        )


def run_tasks(lm: Any, prepared: Prepared, *, log: Callable[[str], None]) -> dict[str, float | None]:
    """The harness's metrics of one model (`loaded_model`, `served_model`) on the prepared tasks."""
    with _offline():
        import lm_eval
        from lm_eval.tasks import TaskManager

        configs = [_harness_config(t) for t in prepared.tasks]
        output = lm_eval.simple_evaluate(
            model=lm, tasks=configs, num_fewshot=prepared.spec.num_fewshot, limit=prepared.spec.limit,
            task_manager=TaskManager(include_defaults=False), log_samples=False, bootstrap_iters=0,
            random_seed=DATA_SEED, numpy_random_seed=DATA_SEED, torch_random_seed=DATA_SEED,
            fewshot_random_seed=DATA_SEED,
        )
    if output is None:  # only on non-zero ranks of a distributed run, which this is not
        raise StageError(STAGE, "lm-evaluation-harness returned no results")
    metrics = collect_metrics(output["results"], [t.name for t in prepared.tasks])
    missing = sorted(set(prepared.lower_is_better) - set(metrics))
    if missing:
        log(f"{STAGE}: lm-evaluation-harness reported no {', '.join(missing)}")
    return metrics
