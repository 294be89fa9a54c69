"""Before/after table of two sets of ``train_speed`` reports (e.g. a base commit against the tree).

    python -m benchmark.perf.speed_ratios --before base_a.json base_b.json --after now.json \
        [--pair tiger=tiger_encdec ...] --out results/perf/train_speed_beauty_cpu_vs_base

Each side may span several report files (one model per run, or runs with different
``--max-train-batches``); a model config found twice on one side is an error. Rows are matched by
config name; ``--pair AFTER=BEFORE`` matches a renamed config (``tiger`` is the causal variant today,
``tiger_encdec`` the faithful one that ``tiger`` named before). Ratios are before / after for times
(> 1 = faster now) and after / before for rates. Both sides must come from the same device, dataset
and thread count; the table says which commits and dates it compares.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmark.perf.common import write_report

_SAME = ("device", "dataset", "threads")


def _load(paths: Sequence[Path]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    rows: dict[str, dict[str, Any]] = {}
    reports = []
    for path in paths:
        report = json.loads(path.read_text())
        reports.append(report)
        for row in report["models"]:
            if row["model"] in rows:
                raise SystemExit(f"{path}: {row['model']} is already on this side")
            rows[row["model"]] = {**row, "commit": report["git_commit"], "date": report["date"]}
    return rows, reports


def _check_comparable(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    for key in _SAME:
        values = {str(report[key]) for report in [*before, *after]}
        if len(values) > 1:
            raise SystemExit(f"the reports differ in {key}: {sorted(values)}; compare like with like")


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator else "–"


def table(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], pairs: dict[str, str]) -> list[str]:
    lines = [
        "| model (after) | model (before) | s / epoch before | after | speed-up | steps / s before | after "
        "| padding share before | after | peak MB before | after | test users / s before | after | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, now in after.items():
        old_name = pairs.get(name, name)
        old = before.get(old_name)
        if old is None:
            continue
        mark = lambda row: " (ex)" if row["extrapolated"] else ""  # noqa: E731
        lines.append(
            f"| {name} | {old_name} | {old['seconds_per_epoch']:.1f}{mark(old)} | {now['seconds_per_epoch']:.1f}{mark(now)} "
            f"| {_ratio(old['seconds_per_epoch'], now['seconds_per_epoch'])} "
            f"| {old['steps_per_second']:.1f} | {now['steps_per_second']:.1f} "
            f"| {old['padding_share']:.3f} | {now['padding_share']:.3f} "
            f"| {old['peak_memory_mb']:.0f} | {now['peak_memory_mb']:.0f} "
            f"| {old['test_users_per_second']:.0f} | {now['test_users_per_second']:.0f} "
            f"| {_ratio(now['test_users_per_second'], old['test_users_per_second'])} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--before", nargs="+", type=Path, required=True)
    parser.add_argument("--after", nargs="+", type=Path, required=True)
    parser.add_argument("--pair", nargs="*", default=[], help="AFTER=BEFORE config names to match")
    parser.add_argument("--out", type=Path, required=True, help="path without suffix; .md and .json are written")
    args = parser.parse_args(argv)
    pairs = dict(item.split("=", 1) for item in args.pair)
    before, before_reports = _load(args.before)
    after, after_reports = _load(args.after)
    _check_comparable(before_reports, after_reports)
    commits = lambda reports: ", ".join(sorted({f"{r['git_commit'][:8]} ({r['date']})" for r in reports}))  # noqa: E731
    first = after_reports[0]
    lines = [
        f"# Training speed before and after on {first['dataset']} ({first['device']}, {first['threads']} threads)",
        "",
        f"Before: {commits(before_reports)}. After: {commits(after_reports)}. "
        "Speed-up = s/epoch before / after; (ex) = extrapolated from a prefix of the epoch's batches; "
        "peak MB is the process's resident high-water mark since the fit started (it includes what "
        "earlier fits of the same process left resident).",
        "",
        *table(before, after, pairs),
    ]
    payload = {"before": before_reports, "after": after_reports, "pairs": pairs}
    json_path, md_path = write_report(args.out.parent, args.out.name, payload, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {json_path} {md_path}")


if __name__ == "__main__":
    main()
