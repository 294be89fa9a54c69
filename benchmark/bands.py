"""``recbench bands``: stored runs' test scores split by how popular each case's target is.

Popularity scores only when the target is one of the K most trained items, so on a dataset whose
test targets crowd into a few head items it can beat a model that ranks the long tail far better.
Whether a model below popularity is weak everywhere or only on the head is a question of where its
hits fall. This command answers it from what a run already stored: each row's per-case metric values
(``results/runs/<run_id>/cases.parquet``) are grouped by the training-popularity rank of the case's
target (rank 0 = the most frequent item in the training prefixes; ties broken by item id).

The per-case file is trusted only after checks: the row's data fingerprint equals the data's, the
row's protocol is the data config's split, and the file holds exactly the test cases' users in case
order. A row that fails one is named with the reason, never silently mapped onto other cases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars

from benchmark.store import REFERENCE_RESULTS_DIR, atomic_write_text, read_rows

DEFAULT_EDGES = (10, 100, 1000)


@dataclass(frozen=True)
class BandTable:
    """Per band: test cases, their share, and each run's mean metric; ``columns`` names the runs."""

    dataset: str
    protocol: str
    metric: str
    bands: list[str]
    cases: list[int]
    columns: list[str]  # model configs
    run_ids: list[str]  # per column
    means: list[list[float]]  # [band][column]
    totals: list[float]  # per column, over every case: equals the row's stored metric

    def markdown(self) -> str:
        total_cases = sum(self.cases)
        header = ["training-popularity rank of the target", "test cases", "share", *self.columns]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for band, count, means in zip(self.bands, self.cases, self.means, strict=True):
            cells = [band, str(count), f"{count / total_cases:.3f}", *(f"{m:.4f}" for m in means)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("| all | " + f"{total_cases} | 1.000 | " + " | ".join(f"{t:.4f}" for t in self.totals) + " |")
        lines += ["", "Runs: " + ", ".join(f"{c} `{r}`" for c, r in zip(self.columns, self.run_ids, strict=True))]
        return "\n".join(lines)


def band_labels(edges: tuple[int, ...], num_items: int) -> list[str]:
    bounds = [0, *edges, num_items]
    return [f"[{low}, {high})" for low, high in zip(bounds[:-1], bounds[1:], strict=True)]


def popularity_ranks(train_counts: np.ndarray) -> np.ndarray:
    """Rank of every item id by training count (``(N + 1,)``, row 0 the padding id), most frequent
    first and equal counts by item id; the padding id ranks last, so item ranks run 0..N-1."""
    counts = train_counts.astype(np.int64).copy()
    counts[0] = -1
    order = np.lexsort((np.arange(len(counts)), -counts))
    ranks = np.empty(len(counts), dtype=np.int64)
    ranks[order] = np.arange(len(counts))
    return ranks


def band_means(values: np.ndarray, target_ranks: np.ndarray, edges: tuple[int, ...]) -> tuple[list[int], list[float]]:
    """Count and mean of ``values`` (C,) per band of ``target_ranks`` (C,); an empty band is NaN."""
    band = np.searchsorted(np.asarray(edges), target_ranks, side="right")
    counts = np.bincount(band, minlength=len(edges) + 1)
    sums = np.bincount(band, weights=values, minlength=len(edges) + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts.tolist(), (sums / counts).tolist()


def _checked_cases(
    results_dir: Path, csv_line: tuple[Path, int], row: dict[str, str], users: np.ndarray, fingerprint: str
) -> polars.DataFrame:
    from recbench.data import DataFormatError

    run_id = row["run_id"]
    if row["data_fingerprint"] != fingerprint:
        raise DataFormatError(
            *csv_line, f"run {run_id}: its data fingerprint {row['data_fingerprint']} is not this data's "
            f"{fingerprint}; its cases belong to other data"
        )
    if json.loads(row["notes"] or "{}").get("data_overrides"):
        raise DataFormatError(*csv_line, f"run {run_id} was trained with data overrides, so its split may differ")
    path = results_dir / "runs" / run_id / "cases.parquet"
    if not path.exists():
        raise DataFormatError(*csv_line, f"run {run_id}: its per-case file {path} is missing")
    cases = polars.read_parquet(path).sort("case")
    if cases.height != len(users) or not np.array_equal(cases["user"].to_numpy(), users):
        raise DataFormatError(
            path, None, f"{cases.height} cases whose users do not match the {len(users)} test cases of this "
            "data and split in order; the file is from another split or damaged"
        )
    return cases


def popularity_bands(
    dataset: str,
    configs: list[str] | None = None,
    profile: str = "quick",
    seed: int = 1,
    metric: str = "ndcg@10",
    edges: list[int] | None = None,
    results_dir: Path = REFERENCE_RESULTS_DIR,
    write: bool = True,
) -> BandTable:
    """Split stored runs' per-case test metric by the training-popularity rank of each target.

    Args:
        dataset: data config name or YAML; the rows are read from ``<results_dir>/<data name>.csv``.
        configs: model configs to show, in this order (default: every config with a converged row).
        profile: profile of the rows.
        seed: seed of the rows.
        metric: a per-case metric column (``ndcg@10``, ``recall@10``, ``ndcg@10_excl`` ...).
        edges: rank boundaries of the bands (default 10, 100, 1000).
        results_dir: where the rows and their ``runs/<run_id>/cases.parquet`` are.
        write: also write ``<results_dir>/analysis/popularity_bands_<data>_<profile>_seed<seed>.md``.
    """
    from benchmark.registry import ConfigError, instantiate_data

    edge_tuple = tuple(sorted(set(edges))) if edges else DEFAULT_EDGES
    if edge_tuple[0] <= 0:
        raise ValueError(f"band edges must be positive ranks, got {list(edge_tuple)}")
    data = instantiate_data(dataset)
    results_dir = Path(results_dir)
    csv_path = results_dir / f"{data.name}.csv"
    rows = [
        (line, row) for line, row in enumerate(read_rows(csv_path), start=2)  # line 1 is the header
        if row["profile"] == profile and int(row["seed"]) == seed and row["protocol"] == data.split
    ]
    # As on the leaderboard, only converged fits: a row a clock cut short describes no model.
    unconverged = [row["config"] for _, row in rows if row["converged"] != "True"]
    rows = [(line, row) for line, row in rows if row["converged"] == "True"]
    stored = [row["config"] for _, row in rows]
    wanted = configs or list(dict.fromkeys(stored))
    missing = [config for config in wanted if config not in stored]
    if not wanted or missing:
        raise ConfigError(
            f"{csv_path}: no converged {data.split} row of profile {profile!r}, seed {seed} for "
            f"{', '.join(missing) or 'any config'}; converged: {', '.join(stored) or 'none'}; "
            f"not converged: {', '.join(unconverged) or 'none'}"
        )
    users, targets = (t.numpy() for t in data.test_targets())
    target_ranks = popularity_ranks(data.train_item_counts().numpy())[targets]
    columns, run_ids, per_column, totals = [], [], [], []
    counts: list[int] = []
    for config in wanted:
        line, row = next((n, r) for n, r in rows if r["config"] == config)  # one row per (config, seed, profile)
        values = _checked_cases(results_dir, (csv_path, line), row, users, data.fingerprint)
        if metric not in values.columns:
            raise ConfigError(f"no per-case metric {metric!r}; stored: {', '.join(values.columns[2:])}")
        column = values[metric].to_numpy()
        counts, means = band_means(column, target_ranks, edge_tuple)
        columns.append(config)
        run_ids.append(row["run_id"])
        per_column.append(means)
        totals.append(float(column.mean()))
    table = BandTable(
        dataset=data.name, protocol=data.split, metric=metric,
        bands=band_labels(edge_tuple, data.num_items), cases=counts,
        columns=columns, run_ids=run_ids, means=[list(band) for band in zip(*per_column, strict=True)], totals=totals,
    )
    text = (
        f"# {metric} by the training-popularity rank of the test target: {data.name}, {data.split}, "
        f"{profile}, seed {seed}\n\nWritten by `recbench bands`; rank 0 is the most frequent item in "
        f"the training prefixes.\n\n{table.markdown()}\n"
    )
    print(text)
    if write:
        out = results_dir / "analysis" / f"popularity_bands_{data.name}_{profile}_seed{seed}.md"
        atomic_write_text(out, text)
        print(f"wrote {out}")
    return table
