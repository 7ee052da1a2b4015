"""The document steps' outputs under `<stage folder>/steps/`, so a killed data stage resumes after the
last step it finished instead of from the start.

`steps/<nn>-<step>/` holds the step's counts (`counts.json`, written last: a step is finished when it
is there), the duplicates it removed (`removed.jsonl`), its scratch files while it runs (`work/`)
and, for the newest step that changed the documents, the documents it kept (`documents/`, Parquet
parts); older ones are deleted once a newer one is finished, so the folder holds at most two copies of
the corpus, and none once the stage is done. A resumed stage runs with the manifest that started it:
the stage folder's key covers it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kubeforge.data.card import StepCounts
from kubeforge.data.tasks import parts_of

_COUNTS = "counts.json"
_REMOVED = "removed.jsonl"
_DOCUMENTS = "documents"
_WORK = "work"


@dataclass
class SavedStep:
    counts: StepCounts
    removed: Path | None
    """The log of the duplicates the step removed (JSONL), if it removed any."""


class SavedSteps:
    def __init__(self, out_dir: Path, names: Sequence[str]) -> None:
        self.root = out_dir / "steps"
        self.names = list(names)

    def _folder(self, name: str) -> Path:
        return self.root / f"{self.names.index(name):02d}-{name}"

    def saved(self, name: str) -> SavedStep | None:
        """The step's counts and removed duplicates, if an earlier attempt finished it."""
        folder = self._folder(name)
        if not (folder / _COUNTS).is_file():
            return None
        counts = StepCounts(**json.loads((folder / _COUNTS).read_text()))
        removed = folder / _REMOVED
        return SavedStep(counts, removed if removed.is_file() else None)

    def parts(self) -> list[Path]:
        """The parts of the newest finished step that wrote documents."""
        for name in reversed(self.names):
            folder = self._folder(name)
            if (folder / _COUNTS).is_file() and (folder / _DOCUMENTS).is_dir():
                return parts_of(folder / _DOCUMENTS)
        raise FileNotFoundError(f"no step under {self.root} saved its documents")

    def begin(self, name: str) -> tuple[Path, Path]:
        """A clean folder for the step: (where its documents go, where its scratch files go)."""
        folder = self._folder(name)
        shutil.rmtree(folder, ignore_errors=True)
        (folder / _WORK).mkdir(parents=True)
        return folder / _DOCUMENTS, folder / _WORK

    def save(self, name: str, counts: StepCounts, removed: Sequence[Path]) -> None:
        """Record a finished step; its documents, if it wrote any, are already in place, and its log of
        removed duplicates is in the files `removed`, which are joined in their order."""
        folder = self._folder(name)
        if removed:
            with (folder / _REMOVED).open("wb") as joined:
                for path in removed:
                    with path.open("rb") as piece:
                        shutil.copyfileobj(piece, joined)
        shutil.rmtree(folder / _WORK, ignore_errors=True)
        pending = folder / (_COUNTS + ".tmp")
        pending.write_text(json.dumps(asdict(counts)))
        os.replace(pending, folder / _COUNTS)
        if (folder / _DOCUMENTS).is_dir():
            self._drop_documents(keep=name)

    def _drop_documents(self, keep: str | None = None) -> None:
        for name in self.names:
            if name != keep:
                shutil.rmtree(self._folder(name) / _DOCUMENTS, ignore_errors=True)

    def finish(self) -> None:
        """The stage is done: its own `documents/` holds what the steps kept."""
        self._drop_documents()
