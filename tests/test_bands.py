"""Popularity diagnostics: `recbench bands` (stored per-case metrics by the target's training popularity)
and `benchmark.perf.recommended_popularity` (how popular the items a checkpoint recommends are)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars
import pytest
import torch

from benchmark.bands import band_means, popularity_bands, popularity_ranks
from benchmark.perf.recommended_popularity import recommended_popularity
from benchmark.registry import ConfigError
from benchmark.store import read_rows
from datamodules.synthetic import SyntheticDataModule
from recbench.data import DataFormatError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stored_popularity(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real smoke-profile popularity row of synthetic_tiny with its per-case file."""
    work = tmp_path_factory.mktemp("bands")
    command = [sys.executable, "-m", "benchmark.cli", "bench", "--dataset", "synthetic_tiny", "--profile", "smoke",
               "--models", "popularity", "--seeds", "1", "--results_dir", "results",
               "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return work / "results"


def test_ranks_put_the_most_trained_item_first_and_padding_last() -> None:
    counts = np.array([0, 3, 7, 3, 0])  # row 0 is the padding id
    assert popularity_ranks(counts).tolist() == [4, 1, 0, 2, 3]


def test_band_means_count_and_average_per_band() -> None:
    counts, means = band_means(np.array([1.0, 0.0, 0.5, 0.25]), np.array([0, 9, 10, 500]), (10, 100))
    assert counts == [2, 1, 1] and means == [0.5, 0.5, 0.25]


def test_popularity_hits_exactly_the_head_band(stored_popularity: Path) -> None:
    table = popularity_bands("synthetic_tiny", metric="recall@10", edges=[5, 50], profile="smoke",
                             results_dir=stored_popularity)
    row = read_rows(stored_popularity / "synthetic-x0.02.csv")[0]
    assert table.totals[0] == pytest.approx(float(row["recall@10"]), abs=1e-6)
    # Popularity ranks by training count with history kept: a target among the 5 most trained items
    # is always in its top 10, one beyond rank 50 never is. A misaligned case order breaks both.
    assert table.means[0][0] == 1.0 and table.means[2][0] == 0.0
    assert sum(table.cases) == int(polars.read_parquet(
        stored_popularity / "runs" / row["run_id"] / "cases.parquet").height)
    written = stored_popularity / "analysis" / "popularity_bands_synthetic-x0.02_smoke_seed1.md"
    assert "| [0, 5) |" in written.read_text()


def test_a_per_case_file_of_other_cases_is_refused(stored_popularity: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    row = read_rows(stored_popularity / "synthetic-x0.02.csv")[0]
    (results / "runs" / row["run_id"]).mkdir(parents=True)
    (results / "synthetic-x0.02.csv").write_text((stored_popularity / "synthetic-x0.02.csv").read_text())
    cases = polars.read_parquet(stored_popularity / "runs" / row["run_id"] / "cases.parquet")
    cases.with_columns(polars.col("user").reverse()).write_parquet(results / "runs" / row["run_id"] / "cases.parquet")
    with pytest.raises(DataFormatError, match="do not match the .* test cases"):
        popularity_bands("synthetic_tiny", profile="smoke", results_dir=results, write=False)


def test_rows_of_other_data_are_refused(stored_popularity: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    text = (stored_popularity / "synthetic-x0.02.csv").read_text()
    fingerprint = read_rows(stored_popularity / "synthetic-x0.02.csv")[0]["data_fingerprint"]
    (results / "synthetic-x0.02.csv").write_text(text.replace(fingerprint, "0123456789abcdef"))
    with pytest.raises(DataFormatError, match=r"synthetic-x0.02.csv:2: .*not this data's"):
        popularity_bands("synthetic_tiny", profile="smoke", results_dir=results, write=False)
    with pytest.raises(ConfigError, match="no converged leave_one_out row .* for sasrec"):
        popularity_bands("synthetic_tiny", configs=["sasrec"], profile="smoke", results_dir=results, write=False)


def test_rows_that_did_not_converge_are_left_out(stored_popularity: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    text = (stored_popularity / "synthetic-x0.02.csv").read_text()
    assert ",complete,True," in text
    (results / "synthetic-x0.02.csv").write_text(text.replace(",complete,True,", ",time limit,False,"))
    with pytest.raises(ConfigError, match="not converged: popularity"):
        popularity_bands("synthetic_tiny", profile="smoke", results_dir=results, write=False)


class _FixedLists(torch.nn.Module):
    """Recommends the same items to everyone."""

    def __init__(self, items: torch.Tensor) -> None:
        super().__init__()
        self.items = items

    def recommend(self, history: torch.Tensor, k: int) -> torch.Tensor:
        return self.items[:k].unsqueeze(0).expand(history.shape[0], k)


def test_recommended_popularity_of_the_head_and_of_the_tail(tiny_data: SyntheticDataModule) -> None:
    ranks = popularity_ranks(tiny_data.train_item_counts().numpy())
    by_rank = torch.from_numpy(np.argsort(ranks))  # item ids, most trained first; padding last
    head = recommended_popularity(_FixedLists(by_rank[:10]), tiny_data, users=50, k=10)  # type: ignore[arg-type]
    assert head["users"] == 50 and head["share_on_top10"] == 1.0 and head["median_rank"] == 4.5
    tail = recommended_popularity(_FixedLists(by_rank[-11:-1]), tiny_data, users=50, k=10)  # type: ignore[arg-type]
    assert tail["share_on_top100"] == 0.0 and tail["median_rank"] == tiny_data.num_items - 5.5
