"""Per-stage Python environments: run a function under another interpreter and get its result back.

Some stages need libraries whose pins conflict with the main environment's: llm-compressor (the
quantize stage) pins a transformers and compressed-tensors that vLLM cannot share (see
infra/envs/quantize.txt). Such a stage keeps its driver in the main environment and hands the work
to its environment with `run_in_env(env, func, *args)`.

Where the environment's interpreter comes from (`python_for`), first match wins:

1. `KUBEFORGE_PYTHON_<ENV>` (`KUBEFORGE_PYTHON_QUANTIZE`): an explicit interpreter. When it names
   no executable file that is an error, not a reason to look elsewhere: a typo must not silently
   pick a different interpreter.
2. The current interpreter, when it can import the environment's marker module (`llmcompressor`):
   a process already started in the quantize environment. The function then runs in-process.
3. `<checkout>/.venv-quantize/bin/python`, which `bash infra/local/install.sh quantize` (and the
   core, test and bench profiles) build.

How it runs there: a Ray task with `runtime_env={"py_executable": python}`, one CPU. Ray 2.60
starts a worker process of its cluster under that interpreter (it runs the driver's copy of
`default_worker.py`, which imports the `ray` installed in that environment: hence the same Ray pin
in both; verified with a real virtual environment, so no subprocess protocol of our own is needed).
The function is pickled by reference, so its module must be importable there: kubeforge is
installed into the environment without dependencies, and such functions import only what that
environment has. Arguments and results cross by pickle, so keep them plain (paths, numbers,
strings), not arrays or models. The worker stays up for reuse like any Ray worker, so a second
call in the same run starts nothing.

Before the first task, the interpreter is probed in a subprocess (Python and Ray versions,
kubeforge and the marker importable): given an interpreter that cannot start a worker, Ray 2.60
retries forever instead of failing the task. The path is a path on this machine, so this suits a
Ray runtime whose nodes share this machine's files (`kubeforge run`'s local one); on a cluster the
quantize image sets `KUBEFORGE_PYTHON_QUANTIZE=/opt/venv-quantize/bin/python`, a path that exists
on every pod of that image.

Ray must already be initialised (`kubeforge run` and the job entrypoints do it before any stage):
this module does not start a runtime of its own, because one started here would outlive the call
with nobody to shut it down, and because the caller's choice of cluster (`--ray-address`,
`--num-cpus`) must hold for this work too.

Ray re-raises a task's exception as a `RayTaskError` whose message is the remote traceback; our
own errors (KubeForgeError) are unwrapped to their original type and message, so the CLI still
prints one line that says what to do.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kubeforge.errors import KubeForgeError

QUANTIZE = "quantize"

MARKERS: dict[str, str] = {QUANTIZE: "llmcompressor"}
"""A module that only the environment has: importable here means we are already in it."""

INSTALL_HINT: dict[str, str] = {QUANTIZE: "bash infra/local/install.sh quantize"}

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout holding this package (platform/kubeforge/envs.py); meaningless for an installed
copy, whose parents hold no virtual environment, so the lookup just finds nothing there."""

T = TypeVar("T")


def env_var(env: str) -> str:
    return f"KUBEFORGE_PYTHON_{env.upper()}"


def venv_python(env: str) -> Path:
    return REPO_ROOT / f".venv-{env}" / "bin" / "python"


def python_for(env: str) -> str | None:
    """The interpreter of `env`, or None when this interpreter already is one (see module docstring)."""
    marker = _marker(env)
    variable = env_var(env)
    explicit = os.environ.get(variable)
    if explicit:
        path = Path(explicit).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise KubeForgeError(
                f"{variable}={explicit}: no executable Python interpreter there; point it at the "
                f"{env} environment's python (e.g. {venv_python(env)}) or unset it"
            )
        return str(path)
    if importlib.util.find_spec(marker) is not None:
        return None
    candidate = venv_python(env)
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    raise KubeForgeError(
        f"the {env} environment is missing: {sys.executable} cannot import {marker}, {variable} is not set "
        f"and {candidate} does not exist; run `{INSTALL_HINT[env]}` or set {variable} to its python"
    )


def run_in_env(env: str, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`func(*args, **kwargs)` run under the interpreter of `env`; returns its result.

    `func` must be a module-level function of a module importable in that environment.
    """
    python = python_for(env)
    if python is None:
        return func(*args, **kwargs)

    import ray
    from ray.exceptions import RayTaskError, RuntimeEnvSetupError

    if not ray.is_initialized():
        raise KubeForgeError(
            f"running {func.__module__}.{func.__qualname__} in the {env} environment needs a Ray runtime: "
            "call ray.init() first (kubeforge run and the job entrypoints do)"
        )
    _check_interpreter(env, python, ray.__version__)
    task = ray.remote(num_cpus=1, max_retries=0, runtime_env={"py_executable": python})(func)
    try:
        return ray.get(task.remote(*args, **kwargs))
    except RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, KubeForgeError):
            raise cause from exc
        # Either the function's own imports fail there, or Ray cannot even unpickle the function
        # (its module, e.g. kubeforge itself, is not installed there): both mean a broken environment.
        missing = cause.name if isinstance(cause, ModuleNotFoundError) else _unimportable(cause)
        if missing is not None:
            raise KubeForgeError(
                f"the {env} environment ({python}) cannot import {missing} for "
                f"{func.__module__}.{func.__qualname__}; rebuild it with `{INSTALL_HINT[env]}`"
            ) from exc
        raise
    except RuntimeEnvSetupError as exc:
        first = (str(exc).strip().splitlines() or [""])[-1]
        raise KubeForgeError(
            f"Ray could not start a worker under the {env} environment's interpreter {python}: {first}; "
            f"check {env_var(env)} or rebuild it with `{INSTALL_HINT[env]}`"
        ) from exc


_PROBE = """
import importlib.metadata, importlib.util, json, sys
def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
print(json.dumps({
    "python": "%d.%d" % sys.version_info[:2],
    "ray": version("ray"),
    "kubeforge": importlib.util.find_spec("kubeforge") is not None,
    "marker": importlib.util.find_spec(sys.argv[1]) is not None,
}))
"""


@functools.cache
def _check_interpreter(env: str, python: str, ray_version: str) -> None:
    """Refuse an interpreter that could not run the task, before Ray is asked to start it there.

    Ray 2.60 does not fail a task whose `py_executable` cannot start a worker (no `ray` there, another
    Python): it retries the worker forever and `ray.get` hangs. Costs one bare interpreter start
    (tens of milliseconds, nothing imported), once per process; only successes are cached.
    """
    fix = f"rebuild it with `{INSTALL_HINT[env]}` or point {env_var(env)} at another interpreter"
    try:
        probe = subprocess.run(
            [python, "-c", _PROBE, MARKERS[env]], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KubeForgeError(f"the {env} environment's interpreter {python} does not run: {exc}; {fix}") from exc
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise KubeForgeError(f"the {env} environment's interpreter {python} fails to start: {last}; {fix}")
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    here = "{}.{}".format(*sys.version_info[:2])
    problems = []
    if found["python"] != here:
        problems.append(f"it is Python {found['python']}, the driver Python {here} (Ray pickles between them)")
    if found["ray"] != ray_version:
        problems.append(f"it has ray {found['ray'] or '(none)'}, the driver ray {ray_version}")
    if not found["kubeforge"]:
        problems.append("it cannot import kubeforge (install it there with `pip install --no-deps -e .`)")
    if not found["marker"]:
        problems.append(f"it cannot import {MARKERS[env]}")
    if problems:
        raise KubeForgeError(
            f"the {env} environment's interpreter {python} cannot run this: {'; '.join(problems)}; {fix}"
        )


def _unimportable(cause: BaseException | None) -> str | None:
    """The module named by Ray's "remote function failed to import on the worker" error, if that is `cause`."""
    text = str(cause) if isinstance(cause, RuntimeError) else ""
    if "failed to import on the worker" not in text:
        return None
    found = re.findall(r"No module named '([^']+)'", text)
    return found[-1] if found else "the function's module"


def _marker(env: str) -> str:
    try:
        return MARKERS[env]
    except KeyError:
        raise KubeForgeError(f"unknown environment {env!r}; known: {', '.join(sorted(MARKERS))}") from None
