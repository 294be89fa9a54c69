"""The file side of the result store, free of torch and Lightning.

``recbench leaderboard`` reads the stored rows and renders them; it must start in well under two
seconds, so the helpers it shares with the runner live here rather than in :mod:`benchmark.run`,
whose imports (torch, Lightning) take several seconds. :mod:`benchmark.run` re-exports them.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on ``<path>.lock`` for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a result CSV as strings; no file is no rows."""
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file in the same directory and ``os.replace``: readers see the old
    or the new file, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", newline="") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def device_slug(device: str) -> str:
    """A file-name form of a device name: ``"AMD EPYC (2 cores)"`` -> ``"amd-epyc-2-cores"``."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:48]
