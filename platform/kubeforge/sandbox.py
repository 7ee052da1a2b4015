"""Run functions' doctests in a sandboxed subprocess: their code is model output, so never trust it.

Each batch of functions runs in one `python -I` child (one interpreter start for many cases) with:

* a time limit per function, enforced twice: inside the child by a repeating `SIGALRM` timer whose
  exception derives from `KeyboardInterrupt` (which doctest re-raises instead of recording as an
  example's failure), and outside by the parent, which kills the child's process group when no result
  line arrives in time (code stuck in C, or catching everything);
* resource limits (address space, CPU seconds, file size), set by the child itself before it reads any
  case. Not in `preexec_fn`: that is unsafe in a parent that runs threads (torch, MLflow), and the
  limits are in force before any untrusted code runs either way;
* no network: when `unshare -n` (root) or `unshare -rn` (an unprivileged user namespace) works on this
  machine, the child runs in a fresh network namespace with no interfaces up. Otherwise (macOS, a
  container without the capability) the child merely gets an environment without proxy settings,
  which is not isolation;
* no writes outside its scratch folder: where the kernel has Landlock (Linux 5.13+), the child
  restricts itself before it reads any case, so generated code cannot touch the work volume (model
  checkpoints that are later unpickled, the MLflow database). `isolation()` says which of the two
  apply here, the stage logs it, and on Kubernetes it refuses to run without both unless the manifest
  allows it;
* a scratch working directory and a minimal environment (`-I` also ignores PYTHON* variables and the
  user's site-packages).

A case that hangs or crashes the interpreter counts as a failure; the cases after it in its batch are
run again in a fresh child, so one runaway function cannot take the others down.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Time the child may take to start, read its cases and say it is ready (a loaded machine is slow).
_STARTUP_GRACE_S = 15.0
# Slack on top of a case's own limit before the parent stops waiting for the child's report.
_REPORT_GRACE_S = 3.0

_RUNNER = r"""
import doctest, importlib, json, os, signal, sys

config = json.loads(sys.stdin.readline())
cases = json.loads(sys.stdin.readline())
try:
    import resource
    for name, value in (("RLIMIT_AS", config["memory_bytes"]), ("RLIMIT_CPU", config["cpu_seconds"]),
                        ("RLIMIT_FSIZE", config["file_bytes"])):
        limit = getattr(resource, name, None)
        if limit is not None:
            resource.setrlimit(limit, (value, value))
except (ImportError, ValueError, OSError):
    pass  # no such limits on this platform (or above the hard limit): the per-case timeouts still apply

# Results go to a private copy of stdout; whatever the functions print goes nowhere.
report = os.fdopen(os.dup(1), "w", buffering=1)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)

# After /dev/null is open: Landlock would refuse opening it for writing.
if config["landlock_abi"]:
    # Landlock (linux/landlock.h): every kind of write is handled, and allowed only beneath the scratch folder.
    import ctypes, struct
    libc = ctypes.CDLL(None, use_errno=True)
    handled = (1 << 1) | sum(1 << bit for bit in range(4, 13))  # WRITE_FILE, REMOVE_*, MAKE_*
    handled |= (1 << 13 if config["landlock_abi"] >= 2 else 0) | (1 << 14 if config["landlock_abi"] >= 3 else 0)
    attr = struct.pack("=Q", handled)  # landlock_ruleset_attr.handled_access_fs
    ruleset = libc.syscall(444, attr, len(attr), 0)
    scratch = os.open(os.getcwd(), os.O_PATH | os.O_DIRECTORY)
    beneath = struct.pack("=Qi", handled, scratch)  # landlock_path_beneath_attr, packed
    if (ruleset < 0 or libc.syscall(445, ruleset, 1, beneath, 0) != 0 or libc.prctl(38, 1, 0, 0, 0) != 0
            or libc.syscall(446, ruleset, 0) != 0):
        os._exit(70)  # never run untrusted code unconfined where confinement was promised

report.write('{"ready": true}\n')  # from here on each case has its own time limit


class Timeout(KeyboardInterrupt):
    pass


expired = armed = False


def on_alarm(signum, frame):
    global expired
    # A late tick after the case ended must not hit the reporting code.
    if armed:
        expired = True
        raise Timeout()


signal.signal(signal.SIGALRM, on_alarm)
for index, case in enumerate(cases):
    outcome = {"index": index, "status": "error", "attempted": 0, "failed": 0, "detail": ""}
    patched = []
    expired = False
    try:
        # Repeating: code that swallows the first interrupt is interrupted again every 50 ms.
        armed = True
        signal.setitimer(signal.ITIMER_REAL, config["timeout_s"], 0.05)
        try:
            module = case.get("module")
            namespace = dict(vars(importlib.import_module(module))) if module else {"__name__": "__doctest__"}
            exec(compile(case["source"], "<generated>", "exec"), namespace)
            function = namespace[case["entry_point"]]
            # A method replaces its class's own for the run, since its doctests call it through the class.
            owner_name, _, attribute = (case.get("qualname") or "").rpartition(".")
            owner = namespace.get(owner_name) if owner_name else None
            if owner is not None:
                patched.append((owner, attribute, owner.__dict__.get(attribute)))
                setattr(owner, attribute, function)
            finder = doctest.DocTestFinder(recurse=False)
            runner = doctest.DocTestRunner(verbose=False, optionflags=doctest.ELLIPSIS)
            for test in finder.find(function, case["entry_point"], globs=namespace):
                runner.run(test, out=lambda text: None)
            attempted, failed = runner.tries, runner.failures
        finally:
            armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            # Later cases of the batch must see the module's own class again.
            for owner, attribute, original in patched:
                if original is None:
                    delattr(owner, attribute)
                else:
                    setattr(owner, attribute, original)
            patched.clear()
        outcome.update(attempted=attempted, failed=failed)
        outcome["status"] = "timeout" if expired else ("no_tests" if attempted == 0 else
                                                       ("passed" if failed == 0 else "failed"))
    except Timeout:
        armed = False
        outcome["status"] = "timeout"
    except BaseException as exc:
        armed = False
        outcome["status"] = "timeout" if expired else "error"
        outcome["detail"] = f"{type(exc).__name__}: {exc}"[:300]
    # (A tick landing in the narrow window before `armed` is cleared ends the child; the parent then
    # counts this case as failed and reruns the rest of the batch.)
    report.write(json.dumps(outcome) + "\n")
report.flush()
os._exit(0)
"""


@dataclass(frozen=True)
class DoctestCase:
    """One function to check: its full source, its name, and the module whose globals it sees."""

    source: str
    entry_point: str
    module: str | None = None
    qualname: str | None = None
    """`Class.method` for a method: it is set on the module's class while its doctests run. It is
    compiled outside the class body, so a method that needs name mangling or zero-argument `super()`
    fails; its reference fails the same way, which leaves it out of the pass rate."""

    @classmethod
    def of_record(cls, record: Mapping[str, Any], source: str) -> DoctestCase:
        """A function's whole source checked as a record of the built-in task says (`entry_point`,
        `module`, `qualname`: see `kubeforge.formats.functions`)."""
        return cls(
            source=source, entry_point=str(record["entry_point"]), module=record.get("module"),
            qualname=record.get("qualname"),
        )


@dataclass(frozen=True)
class DoctestOutcome:
    status: str
    """passed | failed | no_tests | error (did not compile, import or define the function) | timeout | crashed"""
    attempted: int = 0
    failed: int = 0
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0 where there is none, or a seccomp filter forbids it)."""
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes

    try:
        abi = ctypes.CDLL(None, use_errno=True).syscall(444, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    except (OSError, AttributeError):
        return 0
    return max(int(abi), 0)


@functools.cache
def _unshare_prefix() -> tuple[str, ...]:
    """The command prefix that gives the child an empty network namespace, or () where none works."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return ()
    for prefix in (("unshare", "-n"), ("unshare", "-rn")):
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


@dataclass(frozen=True)
class Isolation:
    """How the children are confined on this machine."""

    network: str | None
    """The network namespace (`unshare ...`), or None: only an environment without proxy settings."""
    writes: str | None
    """The write sandbox (`landlock ABI n`), or None: the child may write wherever its user may."""

    @property
    def complete(self) -> bool:
        return self.network is not None and self.writes is not None

    def __str__(self) -> str:
        return (f"network: {self.network or 'none (only an environment without proxy settings)'}; "
                f"writes: {self.writes or 'unconfined'}")


def isolation() -> Isolation:
    prefix = _unshare_prefix()
    return Isolation(f"namespace ({' '.join(prefix)})" if prefix else None,
                     f"only in the scratch folder (landlock ABI {landlock_abi()})" if landlock_abi() else None)


def unconfined_refusal(confinement: Isolation, allowed: bool, field: str) -> str | None:
    """Why generated code must not run here, or None. On Kubernetes, next to the work volume and the
    cluster network, it runs only fully confined unless the manifest's `field` allows otherwise."""
    if confinement.complete or allowed or "KUBERNETES_SERVICE_HOST" not in os.environ:
        return None
    return (
        f"{field}: this pod cannot confine the generated code's doctests ({confinement}); allow the stage pods "
        f"user namespaces (unshare) and Landlock, or set {field.rsplit('.', 1)[-1]}: true to run them anyway"
    )


def _environment(scratch: str) -> dict[str, str]:
    # Built from nothing rather than filtered, so no proxy, token or cloud credential is passed on.
    return {"PATH": os.defpath, "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _run_batch(
    cases: Sequence[DoctestCase], timeout_s: float, memory_mb: int, scratch: str
) -> tuple[dict[int, DoctestOutcome], str]:
    """Outcomes by position in `cases`, in order, up to the first case the child never reported, and
    why that one is missing: `timeout` (the parent stopped waiting) or `crashed` (the child died)."""
    config = {
        "timeout_s": timeout_s,
        "memory_bytes": memory_mb * 1024 * 1024,
        # Every case may use its whole time limit; startup and slack on top.
        "cpu_seconds": int(len(cases) * timeout_s + _STARTUP_GRACE_S) + 1,
        "file_bytes": 16 * 1024 * 1024,
        "landlock_abi": landlock_abi(),
    }
    payload = json.dumps(config) + "\n" + json.dumps([case.__dict__ for case in cases]) + "\n"
    # -B: the cases' imports write no bytecode (the sandbox would refuse it anyway).
    command = [*_unshare_prefix(), sys.executable, "-I", "-B", "-c", _RUNNER]
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=scratch,
        env=_environment(scratch),
        start_new_session=True,  # its own process group: killing it also kills anything it spawned
    )
    stdin, stdout = process.stdin, process.stdout
    if stdin is None or stdout is None:
        raise RuntimeError("subprocess pipes were not created")
    outcomes: dict[int, DoctestOutcome] = {}
    missing = "timeout"
    try:
        try:
            stdin.write(payload.encode())
            stdin.close()
        except BrokenPipeError:
            return outcomes, "crashed"  # died at startup
        selector = selectors.DefaultSelector()
        selector.register(stdout, selectors.EVENT_READ)
        buffer = b""
        deadline = time.monotonic() + _STARTUP_GRACE_S
        while len(outcomes) < len(cases):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(timeout=remaining):
                break  # the current case hangs beyond the child's own timer
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                missing = "crashed"  # the child died: memory or CPU limit, a crash of the interpreter
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                row = json.loads(line)
                deadline = time.monotonic() + timeout_s + _REPORT_GRACE_S
                if "ready" in row:
                    continue
                outcomes[int(row["index"])] = DoctestOutcome(
                    row["status"], int(row["attempted"]), int(row["failed"]), row.get("detail", "")
                )
        selector.close()
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        stdout.close()
    return outcomes, missing


def run_doctests(
    cases: Sequence[DoctestCase], timeout_s: float, batch_size: int = 16, memory_mb: int = 1024
) -> list[DoctestOutcome]:
    """Each case's doctest outcome, in order. Never raises for what the cases' code does."""
    results: list[DoctestOutcome | None] = [None] * len(cases)
    pending = list(range(len(cases)))
    scratch = tempfile.mkdtemp(prefix="kubeforge-doctest-")
    try:
        while pending:
            batch = pending[:batch_size]
            outcomes, missing = _run_batch([cases[i] for i in batch], timeout_s, memory_mb, scratch)
            for local, outcome in outcomes.items():
                results[batch[local]] = outcome
            unreported = [index for local, index in enumerate(batch) if local not in outcomes]
            if unreported:
                # Results arrive in order, so the first unreported case is the one that hung or
                # crashed the child; it fails, and the rest of its batch gets a fresh child.
                results[unreported[0]] = DoctestOutcome(missing, detail="the sandboxed interpreter gave no result")
                pending = unreported[1:] + pending[len(batch) :]
            else:
                pending = pending[len(batch) :]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return [r if r is not None else DoctestOutcome("crashed") for r in results]
