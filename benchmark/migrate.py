"""Upgrade stored result rows to the current schema, by rule: ``python -m benchmark.migrate results``.

Schema 1 -> 2 (rows are a property of (dataset, protocol, config, seed, profile); see benchmark/run.py):

- ``stopped_by`` and ``converged`` become columns. ``stopped_by`` comes from the row's notes where the
  run recorded it (``time budget`` -> ``time limit``; ``max epochs`` -> ``complete`` for a model that
  cannot change after that many epochs, else ``epoch cap``). Rows older than that note are judged from
  their own ``config.json`` (the profile's epoch cap and patience) against the recorded epochs and best
  epoch: fewer epochs than the cap with ``patience`` non-improving validations after the best one is
  early stopping. Nothing else decides convergence: a 4-minute CPU row stays what it was, unconverged.
- ``global_steps`` and ``threads`` move out of the notes into columns (empty where never recorded).
- ``peak_memory_mb`` of a CPU row was the process-lifetime peak of a bench that ran many fits, not the
  run's own; the value moves into the notes as ``peak_memory_mb_process_lifetime`` and the column is
  left empty. GPU rows (the allocator's per-run peak) keep theirs.
- The history-excluded metrics (``…_excl``) were not computed by schema 1 and stay empty.
- A row without its ``runs/<run_id>/cases.parquet`` cannot be paired or checked; it is removed, and
  the command lists it and removes its incomplete run directory.

Every migrated row's notes say ``migrated_from_schema: 1``. The command rewrites each CSV atomically
and prints what it changed; rows already at the current schema pass through untouched.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import yaml

from benchmark.registry import resolve_config
from benchmark.run import (
    CONVERGED_STOPS,
    ROW_COLUMNS,
    ROW_SCHEMA_VERSION,
    atomic_write_text,
    locked,
    read_rows,
)

_NOTE_TO_STOP = {"time budget": "time limit", "early stopping": "early stopping"}


def _max_useful_epochs(config: str) -> int | None:
    """The model class's ``max_useful_epochs`` for a stored config name, without building it."""
    import importlib

    class_path = str(yaml.safe_load(Path(resolve_config("model", config)).read_text())["class_path"])
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name).max_useful_epochs


def stop_reason_v1(row: dict[str, str], notes: dict[str, object], run_dir: Path) -> str:
    epochs = int(row["epochs"])
    useful = _max_useful_epochs(row["config"])
    recorded = notes.get("stopped_by")
    if recorded in _NOTE_TO_STOP:
        return _NOTE_TO_STOP[str(recorded)]
    if useful is not None and epochs >= useful:
        return "complete"
    if recorded == "max epochs":
        return "epoch cap"
    profile = json.loads((run_dir / "config.json").read_text())["profile"]
    best = int(row["best_epoch"]) if row["best_epoch"] not in ("", None) else -1
    if epochs < int(profile["max_epochs"]) and epochs - 1 - best >= int(profile["patience"]):
        return "early stopping"
    return "epoch cap"


def migrate_row(row: dict[str, str], results_dir: Path) -> dict[str, object] | None:
    """The row at the current schema, or None when it has no per-case values (it is then removed)."""
    if str(row.get("schema_version")) == str(ROW_SCHEMA_VERSION):
        return dict(row)
    run_dir = results_dir / "runs" / row["run_id"]
    if not (run_dir / "cases.parquet").exists():
        return None
    notes = json.loads(row["notes"] or "{}")
    stopped_by = stop_reason_v1(row, notes, run_dir)
    upgraded: dict[str, object] = {column: row.get(column, "") for column in ROW_COLUMNS}
    upgraded["stopped_by"] = stopped_by
    upgraded["converged"] = stopped_by in CONVERGED_STOPS
    upgraded["global_steps"] = notes.get("global_steps", "")
    upgraded["threads"] = notes.get("torch_threads", "")
    if not row["device"].startswith("NVIDIA") and row.get("peak_memory_mb"):
        notes["peak_memory_mb_process_lifetime"] = float(row["peak_memory_mb"])
        upgraded["peak_memory_mb"] = ""
    notes["exclude_history"] = row.get("exclude_history", "False") == "True"
    notes["migrated_from_schema"] = 1
    upgraded["notes"] = json.dumps(notes, sort_keys=True)
    upgraded["schema_version"] = ROW_SCHEMA_VERSION
    return upgraded


def migrate(results_dir: Path) -> None:
    for path in sorted(results_dir.glob("*.csv")):
        with locked(path):
            rows = read_rows(path)
            kept: list[dict[str, object]] = []
            for row in rows:
                upgraded = migrate_row(row, results_dir)
                if upgraded is None:
                    print(f"{path}: removed {row['run_id']} (no {results_dir}/runs/{row['run_id']}/cases.parquet)")
                    shutil.rmtree(results_dir / "runs" / row["run_id"], ignore_errors=True)
                    continue
                if upgraded is not row and str(row.get("schema_version")) != str(ROW_SCHEMA_VERSION):
                    print(f"{path}: {row['run_id']}: stopped_by={upgraded['stopped_by']} converged={upgraded['converged']}")
                kept.append(upgraded)
            keys = [tuple(str(r[c]) for c in ("dataset", "protocol", "config", "seed", "profile")) for r in kept]
            if len(keys) != len(set(keys)):
                raise ValueError(f"{path}: two rows share a key after migration; resolve before migrating")
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=ROW_COLUMNS, extrasaction="raise")
            writer.writeheader()
            for row in kept:
                writer.writerow({column: row.get(column, "") for column in ROW_COLUMNS})
            atomic_write_text(path, buffer.getvalue())
            if not kept:
                path.unlink()
                print(f"{path}: no rows left; removed")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmark.migrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", type=Path)
    migrate(parser.parse_args(argv).results_dir)


if __name__ == "__main__":
    main()
