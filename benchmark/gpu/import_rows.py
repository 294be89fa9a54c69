"""``make gpu-import FILES=<files_at>``: validate the rows a GPU bench brought back, store those that pass.

``python -m benchmark.gpu.import_rows FILES [--results-dir results] [--profile paper]``

``FILES`` is the folder the device tool copied ``$OUT`` into (or the ``results.tar.gz`` itself). The
archive is unpacked into a temporary folder (regular files and folders only, no path outside it) and
every row of every ``results/<dataset>.csv`` in it is checked:

- the CSV header is :data:`benchmark.run.ROW_COLUMNS` exactly and ``schema_version`` is
  :data:`benchmark.run.ROW_SCHEMA_VERSION`; the row's dataset is the CSV's name;
- ``profile`` is the expected one (``paper``), ``git_commit`` was recorded by code (not empty, not
  ``unknown``), the key columns are filled;
- ``runs/<run_id>/`` holds ``config.json``, ``metrics.json`` and ``cases.parquet``; ``metrics.json``
  equals the row column by column (in the CSV's text form); ``cases.parquet`` has one row per test
  case (``config.json``'s ``data.test_cases``) with distinct ``case`` values; the data fingerprint
  is the config's;
- the key (dataset, protocol, config, seed, profile) is not repeated in the archive and not stored in
  ``--results-dir``, except by fits the safety net ended (``stopped_by = "time limit"``): a row that
  ended otherwise (early stopping, the epoch cap) supersedes those (:func:`benchmark.run.append_row`
  with ``replace``, the path ``recbench bench --force`` takes; the superseded row's run folder, whose
  ``metrics.json`` holds it, stays in ``runs/``). On a lent GPU the safety net is the call's clock:
  such a row is not a property of its key and must not keep a later call from finishing the fit.

A row identical to a stored one (same run id, every column equal, the same files in its run folder) is
reported as stored already and neither stored again nor rejected, so importing the same files twice is
safe. A row that fails is reported with its location (``archive:results/<csv>:<line> (run <id>)``) and
every reason, and is not stored. A row that passes gets its run folder copied into
``<results-dir>/runs/`` first (to a temporary name, then renamed: a row never points to a missing
folder) and is then appended through :func:`benchmark.run.append_row` (locked, atomic). The exit
status is 1 when any row was rejected.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars

from benchmark.gpu.bench import ARCHIVE
from benchmark.run import (
    KEY_COLUMNS,
    ROW_COLUMNS,
    ROW_SCHEMA_VERSION,
    _row_key,
    append_row,
    read_rows,
    rows_by_key,
    settled,
)

RUN_FILES = ("config.json", "metrics.json", "cases.parquet")


class ArchiveError(RuntimeError):
    """The archive as a whole cannot be read (missing, not a tar.gz, unsafe member)."""


@dataclass
class Checked:
    """One row of the archive and what is wrong with it (nothing: it is stored)."""

    location: str
    row: dict[str, str]
    run_dir: Path
    problems: list[str] = field(default_factory=list)
    #: run ids of the stored rows of this key that the time limit ended, which this row replaces
    supersedes: list[str] = field(default_factory=list)
    #: the same row and run folder are in the results already (an import run twice)
    already_stored: bool = False

    @property
    def label(self) -> str:
        return (f"{self.row.get('dataset')} {self.row.get('config')} seed {self.row.get('seed')} "
                f"[{self.row.get('profile')}] (run {self.row.get('run_id')})")


def csv_text(value: object) -> str:
    """A JSON value as ``csv.DictWriter`` writes it into a row (``None`` -> empty)."""
    return "" if value is None else str(value)


def find_archive(files: Path) -> Path:
    if files.is_file():
        return files
    archive = files / ARCHIVE
    if not archive.is_file():
        raise ArchiveError(f"{files}: no {ARCHIVE} here (the GPU bench writes it to $OUT; pass the folder the "
                           "device tool copied $OUT into)")
    return archive


def extract(archive: Path, target: Path) -> Path:
    """Unpack ``archive`` into ``target``; returns ``target/results``."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                if member.name.startswith("/") or ".." in Path(member.name).parts or not (member.isfile() or member.isdir()):
                    raise ArchiveError(f"{archive}: unsafe member {member.name!r}")
            tar.extractall(target, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ArchiveError(f"{archive}: not a readable tar.gz ({error})") from error
    return target / "results"


def check_rows(results: Path, archive: Path, profile: str, stored_dir: Path) -> list[Checked]:
    """Every row of every CSV under ``results`` (the unpacked archive), with its problems."""
    checked: list[Checked] = []
    seen: dict[tuple[str, ...], str] = {}
    for table in sorted(results.glob("*.csv")):
        with open(table, newline="") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            rows = list(reader)
        header_problem = None
        if header != list(ROW_COLUMNS):
            missing = [c for c in ROW_COLUMNS if c not in header]
            extra = [c for c in header if c not in ROW_COLUMNS]
            header_problem = (f"the CSV header is not ROW_COLUMNS of schema {ROW_SCHEMA_VERSION} "
                              f"(missing {missing}, extra {extra}{', order differs' if not missing and not extra else ''})")
        stored = rows_by_key(stored_dir / table.name)
        for line, row in enumerate(rows, 2):
            run_id = row.get("run_id") or ""
            item = Checked(f"{archive.name}:results/{table.name}:{line} (run {run_id or '?'})", row,
                           results / "runs" / run_id)
            if header_problem:
                item.problems.append(header_problem)
            else:
                item.problems += _check_row(row, table.stem, profile, results)
                key = _row_key(row)
                stored_rows = stored.get(key, [])
                if any(_same_run(row, results, stored_row, stored_dir) for stored_row in stored_rows):
                    item.already_stored = True
                elif stored_rows and (row["stopped_by"] == "time limit" or settled(stored_rows)):
                    how = "settled" if settled(stored_rows) else "ended by the time limit"
                    item.problems.append(f"a row for {dict(zip(KEY_COLUMNS, key, strict=True))} is stored already in "
                                         f"{stored_dir / table.name} ({how}; only a fit that did not end by the "
                                         "time limit replaces one that did)")
                elif key in seen:
                    item.problems.append(f"its key repeats {seen[key]}")
                else:
                    seen[key] = item.location
                    item.supersedes = [r["run_id"] for r in stored_rows]
            checked.append(item)
    return checked


def _same_run(row: dict[str, str], results: Path, stored_row: dict[str, str], stored_dir: Path) -> bool:
    """``row`` and its run folder under ``results`` are byte for byte the stored row and its folder."""
    if row != stored_row:
        return False
    archived, kept = results / "runs" / row["run_id"], stored_dir / "runs" / row["run_id"]
    return all((archived / name).is_file() and (kept / name).is_file()
               and (archived / name).read_bytes() == (kept / name).read_bytes() for name in RUN_FILES)


def _check_row(row: dict[str, str], dataset: str, profile: str, results: Path) -> list[str]:
    problems = []
    if row["schema_version"] != str(ROW_SCHEMA_VERSION):
        problems.append(f"schema_version is {row['schema_version']!r}, expected {ROW_SCHEMA_VERSION}")
    if row["dataset"] != dataset:
        problems.append(f"dataset {row['dataset']!r} in {dataset}.csv")
    if row["profile"] != profile:
        problems.append(f"profile is {row['profile']!r}, expected {profile!r}")
    if row["git_commit"] in ("", "unknown"):
        problems.append(f"git_commit is {row['git_commit']!r}: the commit was not recorded by code")
    empty = [column for column in KEY_COLUMNS if not row[column]]
    if empty:
        problems.append(f"empty key columns {empty}")
    run_id = row["run_id"]
    if not run_id or "/" in run_id or run_id.startswith("."):
        return [*problems, f"run_id {run_id!r} is not a folder name"]
    run_dir = results / "runs" / run_id
    absent = [name for name in RUN_FILES if not (run_dir / name).is_file()]
    if absent:
        return [*problems, f"runs/{run_id}/ lacks {', '.join(absent)}"]
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        config = json.loads((run_dir / "config.json").read_text())
    except ValueError as error:
        return [*problems, f"runs/{run_id}/: unreadable JSON ({error})"]
    differ = [f"{c}: row {row[c]!r}, metrics.json {csv_text(metrics.get(c))!r}"
              for c in ROW_COLUMNS if c not in metrics or csv_text(metrics[c]) != row[c]]
    if differ:
        problems.append(f"metrics.json differs from the row in {len(differ)} column(s): {'; '.join(differ[:4])}"
                        + (" ..." if len(differ) > 4 else ""))
    data = config.get("data", {}) if isinstance(config, dict) else {}
    if data.get("fingerprint") != row["data_fingerprint"]:
        problems.append(f"config.json's data fingerprint {data.get('fingerprint')!r} is not the row's "
                        f"{row['data_fingerprint']!r}")
    try:
        cases = polars.read_parquet(run_dir / "cases.parquet")
    except Exception as error:  # polars raises several types for a damaged file; all mean the same here
        return [*problems, f"runs/{run_id}/cases.parquet is unreadable ({type(error).__name__}: {error})"]
    expected = data.get("test_cases")
    if not isinstance(expected, int):
        problems.append("config.json records no data.test_cases to check cases.parquet against")
    elif cases.height != expected or "case" not in cases.columns or cases["case"].n_unique() != cases.height:
        distinct = cases["case"].n_unique() if "case" in cases.columns else "no 'case' column"
        problems.append(f"cases.parquet has {cases.height} rows ({distinct} distinct cases), the test split "
                        f"has {expected} cases")
    return problems


def store(item: Checked, results_dir: Path) -> None:
    """Copy the run folder in, then append the row (the folder first: a row never lacks its folder).

    A folder of that name without a row is a leftover of an interrupted import and is replaced."""
    run_id = item.row["run_id"]
    target = results_dir / "runs" / run_id
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{run_id}.import-"))
    try:
        shutil.copytree(item.run_dir, staging, dirs_exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    append_row(results_dir / f"{item.row['dataset']}.csv", dict(item.row), replace=bool(item.supersedes))


@dataclass
class Imported:
    """What :func:`import_rows` did with each row of an archive."""

    stored: list[Checked]
    already_stored: list[Checked]
    rejected: list[Checked]


def import_rows(files: Path, results_dir: Path, profile: str = "paper") -> Imported:
    """Check every row of the archive in ``files``; store those that pass and are not stored yet."""
    archive = find_archive(files)
    with tempfile.TemporaryDirectory(prefix="gpu-import-") as scratch:
        results = extract(archive, Path(scratch))
        if not results.is_dir():
            raise ArchiveError(f"{archive}: no results/ folder inside")
        referenced = {row["run_id"] for table in results_dir.glob("*.csv") for row in read_rows(table)}
        checked = check_rows(results, archive, profile, results_dir)
        for item in checked:
            if not item.problems and not item.already_stored and item.row["run_id"] in referenced:
                item.problems.append(f"{results_dir}/runs/{item.row['run_id']} belongs to a stored row already")
        stored = [item for item in checked if not item.problems and not item.already_stored]
        for item in stored:
            store(item, results_dir)
    return Imported(stored, [item for item in checked if item.already_stored and not item.problems],
                    [item for item in checked if item.problems])


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.gpu.import_rows", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", type=Path, help=f"the folder holding {ARCHIVE} (the device tool's files_at)")
    parser.add_argument("--results-dir", type=Path, default=Path("results"))
    parser.add_argument("--profile", default="paper", help="the profile every row must have")
    args = parser.parse_args(list(argv))
    try:
        imported = import_rows(args.files, args.results_dir, args.profile)
    except ArchiveError as error:
        print(f"gpu-import: error: {error}", file=sys.stderr)
        return 1
    stored, rejected = imported.stored, imported.rejected
    for item in imported.already_stored:
        print(f"gpu-import: {item.label} is stored already (the same row and run folder); nothing to do")
    for item in stored:
        replaced = (f", replacing the time-limited row of run {', '.join(item.supersedes)} (its folder stays in "
                    f"{args.results_dir}/runs/)" if item.supersedes else "")
        print(f"gpu-import: stored {item.label} into {args.results_dir}{replaced}")
    for item in rejected:
        print(f"gpu-import: REJECTED {item.location}: {'; '.join(item.problems)}", file=sys.stderr)
    print(f"gpu-import: {len(stored)} row(s) stored, {len(imported.already_stored)} stored already, "
          f"{len(rejected)} rejected")
    return 1 if rejected else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
