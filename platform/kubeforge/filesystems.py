"""Where source files live: the files a source's paths and globs name, and opening one of them.

Used in the driver (listing: names, sizes and modification times only) and in Ray workers (reading).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kubeforge.errors import KubeForgeError


@dataclass(frozen=True)
class SourceFile:
    path: str
    """An absolute local path."""
    size: int
    mtime_ns: int


def list_files(patterns: tuple[str, ...] | list[str], base_dir: Path) -> list[SourceFile]:
    """Every file the patterns match, sorted by path and each once; relative patterns are resolved
    against `base_dir`. Empty when nothing matches: the caller names the field."""
    found: dict[str, SourceFile] = {}
    for pattern in patterns:
        full = pattern if Path(pattern).is_absolute() else str(base_dir / pattern)
        for match in glob.glob(full, recursive=True):
            path = os.path.abspath(match)
            if path in found or not os.path.isfile(path):
                continue
            stat = os.stat(path)
            found[path] = SourceFile(path, stat.st_size, stat.st_mtime_ns)
    return [found[path] for path in sorted(found)]


def open_input(path: str) -> BinaryIO:
    """The file, opened for reading bytes."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise KubeForgeError(f"{path}: file vanished after the manifest was validated") from None
    except OSError as exc:
        raise KubeForgeError(f"{path}: cannot read ({exc.strerror})") from None
