"""The file side of the result store, free of torch and Lightning.

``recbench leaderboard`` reads the stored rows and renders them; it must start in well under two
seconds, so what it shares with the runner (where rows live, the metric column names, locked and
atomic file access) lives here rather than in :mod:`benchmark.run`, whose imports (torch, Lightning)
take several seconds. :mod:`benchmark.run` re-exports all of it.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from recbench.metric_names import EXCLUDED_SUFFIX, metric_names

METRIC_COLUMNS = metric_names((5, 10, 20))
#: The same metrics with history items excluded from the ranking (RecBole / RecTools protocol).
EXCLUDED_METRIC_COLUMNS = [f"{name}{EXCLUDED_SUFFIX}" for name in METRIC_COLUMNS]
#: Where a user's bench writes unless told otherwise (git-ignored); ``results/`` is the reference.
LOCAL_RESULTS_DIR = Path("runs/results")
REFERENCE_RESULTS_DIR = Path("results")


def resolve_results_dir(results_dir: Path | None) -> Path:
    """``results_dir``, else ``$RECBENCH_RESULTS_DIR``, else the git-ignored :data:`LOCAL_RESULTS_DIR`."""
    if results_dir is not None:
        return Path(results_dir)
    return Path(os.environ.get("RECBENCH_RESULTS_DIR") or LOCAL_RESULTS_DIR)


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
