"""The GPU side of ``make gpu-bench``: the next missing paper rows, under a deadline, into ``$OUT``.

``python -m benchmark.gpu.bench --carry .carry --out $OUT --deadline EPOCH_SECONDS``
(started by ``benchmark/gpu/run.sh``, which installs the wheels first).

What it does, in order:

1. lays the carried caches out under ``$RECBENCH_CACHE_DIR`` (:func:`benchmark.gpu.carry.materialise`)
   and sets ``RECBENCH_GIT_COMMIT`` from the manifest (``-dirty`` when a code file changed since
   ``make gpu-prepare``): the copied tree has no ``.git``;
2. walks the plan recorded in the manifest (Beauty's sasrec, tiger, diffgrm, dreamrec, then Toys,
   Sports, YooChoose, Steam), with each model's paper config (:func:`benchmark.run.model_config_for`),
   and skips a run whose key (dataset, protocol, config, seed, profile) is stored in
   ``--stored-results`` (the tree's ``results/``, which travels with it) or already written by this
   call, whose artefacts were left out of the carry, or whose carried data cache does not verify. A
   key stored only by fits the safety net ended (``time limit``: an earlier call's clock, which says
   nothing about the profile) is fitted again when this call offers at least :data:`REFIT_MARGIN`
   times the training time it had, and skipped (saying so) otherwise; a row that ends otherwise
   supersedes them on import. A machine kept warm between two calls still holds the earlier call's
   results folder: it is set aside (``results.earlier/call-N``), its rows count as fitted (their files
   came back with that call) and this call's archive holds only this call's rows;
3. fits each remaining run through :func:`benchmark.run.run_one` into a fresh results folder, with the
   profile's wall-clock safety net set to the time left before the deadline minus
   ``--reserve-seconds`` (the final validation, the test pass and the writes), rounded down to half
   minutes (so the run ids, which hash the profile, repeat across calls). A fit the safety net ends
   is stored by the runner as ``stopped_by = "time limit"``, not converged. No fit starts with less
   than ``--min-fit-seconds`` of training time left;
4. after every run rewrites ``$OUT/results.tar.gz`` (the rows, their run folders and the training
   logs) atomically, so a call killed at its limit still returns every finished row, and at the end
   writes ``$OUT/summary.json``. A run that raises is reported (traceback in the log, reason in the
   summary) and the next one starts: one broken config does not cost the rest of the lease.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tarfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmark.gpu.carry import (
    CarryError,
    atomic_write_json,
    carried_caches,
    check_dataset,
    device_commit,
    materialise,
)
from benchmark.registry import instantiate_data, resolve_config
from benchmark.run import (
    RunSpec,
    _row_key,
    available_cores,
    device_name,
    existing_keys,
    load_profile,
    longest_training,
    model_config_for,
    rows_by_key,
    run_one,
    settled,
    summary_line,
)

ROOT = Path(__file__).resolve().parents[2]
ARCHIVE = "results.tar.gz"
SUMMARY = "summary.json"


def _log(message: str) -> None:
    print(f"gpu-bench [{time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_archive(results_dir: Path, work_dir: Path, out: Path) -> Path:
    """``out/results.tar.gz``: ``results/`` (CSV rows + ``runs/<run_id>/``) and ``training-logs/<run_id>.csv``
    (Lightning's per-epoch metrics), written to a temporary name and renamed."""
    target = out / ARCHIVE
    partial = out / f".{ARCHIVE}.partial"
    with tarfile.open(partial, "w:gz") as tar:
        if results_dir.exists():
            tar.add(results_dir, arcname="results")
        for metrics in sorted(work_dir.glob("*/logs/metrics.csv")):
            tar.add(metrics, arcname=f"training-logs/{metrics.parents[1].name}.csv")
    os.replace(partial, target)
    return target


#: A fit the time limit ended is fitted again only with this many times its earlier training time.
REFIT_MARGIN = 1.25


def fit_limit_minutes(seconds_left: float, reserve_seconds: float, min_fit_seconds: float) -> float | None:
    """The safety net for the next fit: the time left minus the reserve, in whole half minutes;
    ``None`` when that is under ``min_fit_seconds`` (the fit is not started)."""
    budget = seconds_left - reserve_seconds
    if budget < min_fit_seconds:
        return None
    return math.floor(budget / 30) / 2


def set_aside_earlier_results(results_dir: Path) -> list[Path]:
    """Move a results folder an earlier call on this (warm) machine left into ``<results_dir>.earlier/``;
    returns every folder set aside there. ``results_dir`` is then free for this call."""
    earlier_root = results_dir.with_name(results_dir.name + ".earlier")
    if results_dir.exists():
        earlier_root.mkdir(parents=True, exist_ok=True)
        calls = len(list(earlier_root.iterdir()))
        results_dir.rename(earlier_root / f"call-{calls + 1}")
        _log(f"{results_dir} from an earlier call on this machine set aside as {earlier_root}/call-{calls + 1}: "
             "its rows came back with that call's files and are not archived again")
    return sorted(earlier_root.glob("call-*"))


def bench_on_device(
    carry_dir: Path,
    out: Path,
    deadline: float,
    stored_results: Path,
    work_root: Path,
    seeds: Sequence[int] = (1,),
    profile_name: str | None = None,
    reserve_seconds: float = 120.0,
    min_fit_seconds: float = 90.0,
) -> dict[str, Any]:
    """Run the plan of ``carry_dir`` (module docstring); returns the summary also written to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    results_dir, work_dir = work_root / "results", work_root / "work"
    earlier_calls = set_aside_earlier_results(results_dir)
    results_dir.mkdir(parents=True)  # archived even when no fit ends: an archive of no rows imports as such
    cache_root = Path(os.environ.get("RECBENCH_CACHE_DIR") or work_root / "cache")
    os.environ["RECBENCH_CACHE_DIR"] = str(cache_root)
    manifest = materialise(carry_dir, cache_root)
    commit, changed = device_commit(manifest, ROOT)
    os.environ["RECBENCH_GIT_COMMIT"] = commit
    if changed:
        _log(f"code changed since `make gpu-prepare` ({', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}): "
             f"rows record {commit}")
    profile = load_profile(profile_name or manifest["profile"])
    torch.set_num_threads(available_cores())
    carried = {(r["dataset"], r["config"]): r for r in manifest["runs"]}
    summary: dict[str, Any] = {"commit": commit, "device": device_name(), "profile": profile.name, "runs": []}

    def record(dataset: str, config: str, seed: int, status: str, **extra: object) -> None:
        summary["runs"].append({"dataset": dataset, "config": config, "seed": seed, "status": status, **extra})
        detail = extra.get("reason") or extra.get("summary") or ""
        _log(f"{dataset} {config} seed {seed}: {status}{': ' + str(detail) if detail else ''}")

    _log(f"{device_name()}, profile {profile.name}, commit {commit}, {deadline - time.time():.0f} s to the deadline")
    write_archive(results_dir, work_dir, out)
    stopped = False
    with carried_caches(manifest):
        for dataset, models in manifest["plan"]:
            data = instantiate_data(dataset)
            try:
                problem = check_dataset(manifest, dataset, Path(resolve_config("data", dataset)).read_text(), data)
            except CarryError as error:
                problem = str(error)
            stored = rows_by_key(stored_results / f"{data.name}.csv")
            fitted_earlier: dict[tuple[str, ...], list[dict[str, str]]] = {}
            for folder in earlier_calls:
                for key, rows in rows_by_key(folder / f"{data.name}.csv").items():
                    fitted_earlier.setdefault(key, []).extend(rows)
            for model in models:
                config = model_config_for(model, profile)
                for seed in seeds:
                    # The reasons a run can never start here come first, so that even a call out of
                    # time reports them (a short GPU_BENCH_SECONDS is a dry run of the carry).
                    if problem:
                        record(dataset, config, seed, "skipped", reason=problem)
                        continue
                    run = carried.get((dataset, config))
                    if run is None or not run["carried"]:
                        reason = run["reason"] if run else "not in the plan of `make gpu-prepare`"
                        record(dataset, config, seed, "skipped", reason=f"not carried: {reason}")
                        continue
                    key = _row_key({"dataset": data.name, "protocol": data.split, "config": config, "seed": seed,
                                    "profile": profile.name})
                    previous = stored.get(key, [])
                    if settled(previous) or key in existing_keys(results_dir, data.name):
                        record(dataset, config, seed, "skipped", reason="stored already")
                        continue
                    if settled(fitted_earlier.get(key, [])):
                        record(dataset, config, seed, "skipped", reason=(
                            "fitted by an earlier call on this machine (its row came back with that call's "
                            "files: import those)"))
                        continue
                    previous = previous + fitted_earlier.get(key, [])
                    limit = None if stopped else fit_limit_minutes(deadline - time.time(), reserve_seconds, min_fit_seconds)
                    if limit is None:
                        stopped = True
                        record(dataset, config, seed, "not started", reason="deadline")
                        continue
                    if previous:  # all ended by the time limit: their longest training time
                        cut_at = longest_training(previous)
                        if limit * 60 < REFIT_MARGIN * cut_at:
                            record(dataset, config, seed, "skipped", reason=(
                                f"a time limit ended it after {cut_at:.0f} s of training in an earlier call and this "
                                f"call offers {limit * 60:.0f} s; a call with GPU_TEST_SECONDS=0 and "
                                "GPU_BENCH_SECONDS=570 offers more"))
                            continue
                        _log(f"{dataset} {config} seed {seed}: a time limit ended it after {cut_at:.0f} s of "
                             f"training in an earlier call; fitting it again with {limit * 60:.0f} s")
                    spec = RunSpec(dataset, config, seed, dataclasses.replace(profile, time_limit_minutes=limit))
                    _log(f"{spec.run_id}: fit with a {limit:g}-minute safety net")
                    started = time.time()
                    try:
                        # force: a fresh fit whose safety net is this call's clock, although a warm
                        # machine may keep the checkpoints of an earlier call's cut fit of this run.
                        row = run_one(spec, results_dir, work_dir, {"enable_progress_bar": False}, {}, force=True)
                    except Exception as error:  # reported below; the next run still gets the lease
                        traceback.print_exc()
                        record(dataset, config, seed, "failed", reason=f"{type(error).__name__}: {error}",
                               seconds=round(time.time() - started, 1))
                        continue
                    record(dataset, config, seed, "stored", run_id=row["run_id"], stopped_by=row["stopped_by"],
                           converged=row["converged"], seconds=round(time.time() - started, 1),
                           summary=summary_line(row))
                    write_archive(results_dir, work_dir, out)
    write_archive(results_dir, work_dir, out)
    atomic_write_json(out / SUMMARY, summary)
    stored = [r for r in summary["runs"] if r["status"] == "stored"]
    _log(f"done: {len(stored)} row(s) in {out / ARCHIVE}; import here with "
         f"`make gpu-import FILES=<files_at>`")
    return summary


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.gpu.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--carry", type=Path, default=ROOT / ".carry")
    parser.add_argument("--out", type=Path, required=True, help="the folder whose files come back ($OUT)")
    parser.add_argument("--deadline", type=float, required=True, help="epoch seconds by which the call must end")
    parser.add_argument("--stored-results", type=Path, default=ROOT / "results", help="rows already stored (skipped)")
    parser.add_argument("--work-root", type=Path, default=Path("/tmp/recbench-gpu"))
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--profile", default=None, help="default: the profile the carry was prepared for")
    parser.add_argument("--reserve-seconds", type=float, default=120.0)
    parser.add_argument("--min-fit-seconds", type=float, default=90.0)
    args = parser.parse_args(list(argv))
    try:
        summary = bench_on_device(
            args.carry, args.out, args.deadline, args.stored_results, args.work_root,
            seeds=[int(seed) for seed in args.seeds.split(",")], profile_name=args.profile,
            reserve_seconds=args.reserve_seconds, min_fit_seconds=args.min_fit_seconds,
        )
    except CarryError as error:
        print(f"gpu-bench: error: {error}", file=sys.stderr)
        return 1
    return 1 if any(r["status"] == "failed" for r in summary["runs"]) else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
