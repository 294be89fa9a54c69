"""The benchmark runner: rows, atomic locked appends, kill-and-resume, paired statistics."""

import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from benchmark.leaderboard import paired_test
from benchmark.run import (
    KEY_COLUMNS,
    METRIC_COLUMNS,
    ROW_COLUMNS,
    append_row,
    device_name,
    device_slug,
    read_rows,
)

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path: Path, *args: str, wait: bool = True):
    command = [sys.executable, "-m", "benchmark.cli", "bench", "--dataset", "synthetic_tiny",
               "--trainer.enable_progress_bar", "false", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    if not wait:
        return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_smoke_bench_writes_complete_rows_and_skips_done_runs(tmp_path: Path) -> None:
    result = _bench(tmp_path, "--profile", "smoke", "--models", "popularity,sasrec", "--seeds", "1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = read_rows(tmp_path / "results" / "synthetic-x0.02.csv")
    assert [row["config"] for row in rows] == ["popularity", "sasrec"]
    for row in rows:
        assert list(row) == list(ROW_COLUMNS)
        assert all(0.0 <= float(row[m]) <= 1.0 for m in METRIC_COLUMNS)
        assert float(row["recall@5"]) <= float(row["recall@10"]) <= float(row["recall@20"])
        assert row["profile"] == "smoke" and row["protocol"] == "leave_one_out" and row["world_size"] == "1"
        run = tmp_path / "results" / "runs" / row["run_id"]
        assert {p.name for p in run.iterdir()} == {"config.json", "config.yaml", "metrics.json", "cases.parquet"}
    assert "sasrec" in rows[1]["run_id"] and int(rows[1]["parameters"]) > 0
    again = _bench(tmp_path, "--profile", "smoke", "--models", "popularity", "--seeds", "1")
    assert "skip" in again.stdout and len(read_rows(tmp_path / "results" / "synthetic-x0.02.csv")) == 2


def _row(seed: int) -> dict[str, object]:
    row: dict[str, object] = {column: "" for column in ROW_COLUMNS}
    row.update(dataset="d", protocol="p", model="M", config="c", seed=seed, profile="smoke")
    return row


def _append_many(path: str, start: int) -> None:
    for seed in range(start, start + 25):
        append_row(Path(path), _row(seed))


def test_concurrent_appends_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(str(path), start)) for start in (0, 100)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(600)  # spawn + imports are slow on a loaded 2-core machine
        assert worker.exitcode == 0
    seeds = sorted(int(row["seed"]) for row in read_rows(path))
    assert seeds == list(range(25)) + list(range(100, 125))
    with pytest.raises(ValueError, match="exists already"):
        append_row(path, _row(3))
    append_row(path, {**_row(3), "notes": "replaced"}, replace=True)
    assert [r["notes"] for r in read_rows(path) if r["seed"] == "3"] == ["replaced"]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_kill_9_mid_run_leaves_no_row_and_the_rerun_resumes(tmp_path: Path) -> None:
    profile = tmp_path / "long.yaml"
    profile.write_text("name: long\nmax_epochs: 6\npatience: 10\nlimit_train_batches: 2\nval_subset: 50\n")
    process = _bench(tmp_path, "--profile", str(profile), "--models", "sasrec", wait=False)
    run_id = f"synthetic_tiny-sasrec-long-seed1-{device_slug(device_name())}"
    checkpoint = tmp_path / "runs" / "bench" / run_id / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert checkpoint.exists(), "no checkpoint was written"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    csv_path = tmp_path / "results" / "synthetic-x0.02.csv"
    assert not csv_path.exists() or read_rows(csv_path) == []
    rerun = _bench(tmp_path, "--profile", str(profile), "--models", "sasrec")
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    rows = read_rows(csv_path)
    assert len(rows) == 1 and rows[0]["epochs"] == "6"
    assert json.loads(rows[0]["notes"])["resumed"] is True
    assert len({tuple(r[k] for k in KEY_COLUMNS) for r in rows}) == 1


def test_paired_test_against_hand_computation() -> None:
    new = np.array([1.0, 0.5, 0.0, 1.0, 0.63, 0.0, 1.0, 0.5])
    old = np.array([0.5, 0.5, 0.0, 0.0, 0.63, 0.5, 1.0, 0.0])
    diff = new - old  # 0.5, 0, 0, 1, 0, -0.5, 0, 0.5 -> mean 0.1875
    mean, sd = diff.mean(), diff.std(ddof=1)
    t = mean / (sd / math.sqrt(len(diff)))
    p_hand = 2 * stats.t.sf(abs(t), df=len(diff) - 1)
    result = paired_test(new, old, "ndcg@10")
    assert result.mean_difference == pytest.approx(0.1875)
    assert result.effect_size_dz == pytest.approx(mean / sd)
    assert result.t_pvalue == pytest.approx(p_hand)
    assert 0.0 < result.bootstrap_pvalue < 1.0
    same = paired_test(new, new.copy(), "ndcg@10")
    assert same.t_pvalue == 1.0 and same.mean_difference == 0.0
    strong = paired_test(np.ones(200), np.zeros(200) + np.linspace(0, 0.1, 200), "recall@10")
    assert strong.t_pvalue < 1e-10 and strong.bootstrap_pvalue == 0.0


def test_time_budget_ends_a_fit_mid_epoch_and_the_best_checkpoint_is_tested(tmp_path: Path) -> None:
    # 0.3 s of budget against 200 epochs: only the budget can end this fit.
    profile = tmp_path / "budget.yaml"
    profile.write_text("name: budget\nmax_epochs: 200\npatience: 200\nval_subset: 50\nmax_minutes: 0.005\n")
    result = _bench(tmp_path, "--profile", str(profile), "--models", "sasrec")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (row,) = read_rows(tmp_path / "results" / "synthetic-x0.02.csv")
    notes = json.loads(row["notes"])
    assert notes["stopped_by"] == "time budget"
    assert int(row["epochs"]) < 200 and row["best_epoch"] != ""
    assert notes["best_checkpoint"].endswith("best.ckpt") and Path(tmp_path, notes["best_checkpoint"]).exists()


def test_rows_from_two_devices_are_two_runs_and_never_averaged(tmp_path: Path) -> None:
    import polars

    from benchmark.leaderboard import summarise

    path = tmp_path / "d.csv"
    for device, ndcg in (("cpu A", 0.1), ("gpu B", 0.3)):
        append_row(path, {**_row(1), "device": device, "ndcg@10": ndcg})
    append_row(path, {**_row(2), "device": "gpu B", "ndcg@10": 0.5})
    with pytest.raises(ValueError, match="exists already"):
        append_row(path, {**_row(1), "device": "cpu A"})
    table = polars.DataFrame(read_rows(path)).with_columns(polars.col(c).cast(polars.Float64, strict=False)
                                                          for c in METRIC_COLUMNS)
    table = table.with_columns(polars.lit(1.0).alias(c) for c in ("train_seconds", "test_users_per_second",
                                                                   "parameters"))
    summary = {row["device"]: (row["seeds"], row["ndcg@10"]) for row in summarise(table).iter_rows(named=True)}
    assert summary == {"cpu A": (1, pytest.approx(0.1)), "gpu B": (2, pytest.approx(0.4))}


@pytest.fixture(scope="module")
def tensorboard_bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One smoke bench with the TensorBoard logger, shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("tensorboard-bench")
    result = _bench(tmp_path, "--profile", "smoke", "--models", "sasrec", "--seeds", "1",
                    "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return tmp_path


def test_bench_with_the_tensorboard_logger_writes_event_files(tensorboard_bench: Path) -> None:
    (row,) = read_rows(tensorboard_bench / "results" / "synthetic-x0.02.csv")
    events = list((tensorboard_bench / "runs" / "bench" / row["run_id"]).glob("version_*/events.out.tfevents.*"))
    assert events and all(path.stat().st_size > 0 for path in events)
    assert not list(tensorboard_bench.glob("runs/bench/**/metrics.csv")), "the CSV logger ran as well"


def test_a_saved_run_config_reruns_to_the_same_row(tensorboard_bench: Path) -> None:
    (row,) = read_rows(tensorboard_bench / "results" / "synthetic-x0.02.csv")
    config = tensorboard_bench / "results" / "runs" / row["run_id"] / "config.yaml"
    assert "TensorBoardLogger" in config.read_text()
    rerun = _bench(tensorboard_bench, "--config", str(config), "--results_dir", "again", "--work_dir", "again-runs")
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    (again,) = read_rows(tensorboard_bench / "again" / "synthetic-x0.02.csv")
    for column in (*KEY_COLUMNS, *METRIC_COLUMNS, "epochs", "best_epoch", "config_hash", "data_fingerprint"):
        assert again[column] == row[column], column
