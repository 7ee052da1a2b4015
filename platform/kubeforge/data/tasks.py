"""Running the data stage's work in Ray workers, and the Parquet parts it flows through.

The corpus lives on disk as *parts*: Parquet files of at most about `PART_BYTES` of text, named so
that sorting their names gives corpus order, with the columns `idx` (the document's position in the
corpus: its file's number times 2^32 plus its line or row; a copy made by the augment step adds its
copy number times 2^56), `id`, `source` and `text`, and after the augment step `augmented_from` and
`augmentation` (null for the documents read). A step is a
function of one work item (a part, a bucket of keys, a shard to write) that a worker runs and that
writes its own output next to the others'; it returns a small dict of counts, and all the driver
ever holds are those dicts. Each item is a Ray task of one CPU; twice as many are in flight as the
cluster has CPUs, so every core is busy and the driver sees each result as it finishes (why not Ray
Data: `docs/decisions.md`).

An item's error ends the run after the items in flight finish; no task is cancelled. Ray 2.60's
driver aborts (`Check failed: ... Tried to complete task that was not pending`) when `ray.cancel`
meets a task whose reply is on its way (ray-project/ray#54846), and a stage that ends on bad input
must end with the line naming it, not with a dead driver.

A worker reports bad input (a `KubeForgeError`) as a value: Ray would otherwise wrap it in a
`RayTaskError` whose message is a remote stack trace, where users need one line naming the file.
Each result also says which node ran the item and for how long: within `counting_work`, `run` adds
them up per node, so a stage on a Ray cluster can show how its work spread.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubeforge.context import StageContext
from kubeforge.errors import KubeForgeError, StageError

if TYPE_CHECKING:
    import pandas as pd

PART_BYTES = 8 << 20
"""Text per part: small enough that a worker holds a few parts' frames, large enough that reading
and writing a part costs far more than scheduling it."""
COLUMNS = ("idx", "id", "source", "text")
COPY_SHIFT = 56
ORIGINAL = (1 << COPY_SHIFT) - 1
"""`idx & ORIGINAL`: the position of the document a copy was made from (itself for an original)."""

Work = Callable[..., dict[str, Any]]


def part_name(file_number: int, piece: int, sequence: int) -> str:
    return f"part-{file_number:07d}-{piece:05d}-{sequence:05d}.parquet"


def parts_of(folder: Path) -> list[Path]:
    """The parts of a folder, in corpus order."""
    return sorted(folder.glob("part-*.parquet"))


def read_part(path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The part's documents; of `columns`, those it has (the augment step's come after it only)."""
    import pyarrow.parquet as pq

    if columns is not None:
        present = set(pq.read_schema(path).names)
        columns = [column for column in columns if column in present]
    return pq.read_table(path, columns=columns).to_pandas()


def write_part(frame: pd.DataFrame, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)


@dataclass
class NodeWork:
    items: int = 0
    seconds: float = 0.0
    """Wall seconds the node's workers spent on the items."""


_COUNTED: ContextVar[dict[str, NodeWork] | None] = ContextVar("kubeforge_data_work", default=None)


@contextmanager
def counting_work() -> Iterator[dict[str, NodeWork]]:
    """Within it, `run` adds each item to the work of the node that ran it, keyed `<IP> <node id>`
    (the id's first 8 hex digits: nodes of a local cluster share their IP)."""
    work: dict[str, NodeWork] = {}
    token = _COUNTED.set(work)
    try:
        yield work
    finally:
        _COUNTED.reset(token)


def _run_item(item: dict[str, Any], work: Work, kwargs: dict[str, Any]) -> dict[str, Any]:
    import ray

    node = f"{ray.util.get_node_ip_address()} {ray.get_runtime_context().get_node_id()[:8]}"
    started = time.perf_counter()
    try:
        result, error = work(item, **kwargs), ""
    except KubeForgeError as exc:
        result, error = {}, str(exc)
    return {"result": result, "error": error, "node": node, "seconds": time.perf_counter() - started}


def run(
    items: Sequence[dict[str, Any]], work: Work, kwargs: dict[str, Any], ctx: StageContext, label: str,
    total: int | None = None, progress_key: str | None = None,
) -> list[dict[str, Any]]:
    """`work(item, **kwargs)` for every item, in Ray workers; the results in the items' order.

    Items and results are small descriptions of work (a part's path, a bucket number), never
    documents. The progress bar advances by `result[progress_key]`, or by one an item.
    """
    import ray

    if not items:
        return []
    remote = ray.remote(num_cpus=1)(_run_item)
    shared = ray.put(kwargs)
    waiting = iter(enumerate(items))
    pending: dict[Any, int] = {}
    results: list[dict[str, Any] | None] = [None] * len(items)
    counted = _COUNTED.get()
    done = 0

    def submit() -> None:
        # Read again at each result: a cluster that grows (Ray's autoscaler) gets more in flight.
        in_flight = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        for n, item in itertools.islice(waiting, max(0, in_flight - len(pending))):
            pending[remote.remote(item, work, shared)] = n

    try:
        with ctx.reporter.task(f"data: {label}", total=total if progress_key else len(items)) as task:
            submit()
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                row = ray.get(ref)
                if row["error"]:
                    raise StageError("data", row["error"])
                result = results[pending.pop(ref)] = row["result"]
                if counted is not None:
                    node = counted.setdefault(row["node"], NodeWork())
                    node.items += 1
                    node.seconds += float(row["seconds"])
                done += int(result.get(progress_key, 0)) if progress_key else 1
                task.update(done)
                submit()
    except Exception:
        # The items in flight finish (they are few) and none of the others starts; Ctrl-C and SIGTERM
        # (KeyboardInterrupt) end the driver, and with it, its tasks.
        if pending:
            ray.wait(list(pending), num_returns=len(pending))
        raise
    return [result for result in results if result is not None]
