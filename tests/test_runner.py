"""The benchmark runner: rows, atomic locked appends, kill-and-resume, paired statistics."""

import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from benchmark.leaderboard import holm_adjusted, paired_test, seed_test
from benchmark.run import (
    EXCLUDED_METRIC_COLUMNS,
    KEY_COLUMNS,
    METRIC_COLUMNS,
    ROW_COLUMNS,
    EarlyStoppingAfter,
    append_row,
    read_rows,
    stop_reason,
)

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path: Path, *args: str, wait: bool = True):
    command = [sys.executable, "-m", "benchmark.cli", "bench", "--dataset", "synthetic_tiny",
               "--trainer.enable_progress_bar", "false", *args]
    # RESULTS_DIR=results: these tests check the stored layout; the default local directory has its own test.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "RECBENCH_RESULTS_DIR": "results"}
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
        assert all(0.0 <= float(row[m]) <= 1.0 for m in (*METRIC_COLUMNS, *EXCLUDED_METRIC_COLUMNS))
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
    (old,) = append_row(path, {**_row(3), "notes": "replaced"}, replace=True)
    assert old["seed"] == "3" and old["notes"] == ""
    assert [r["notes"] for r in read_rows(path) if r["seed"] == "3"] == ["replaced"]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_kill_9_mid_run_leaves_no_row_and_the_rerun_resumes(tmp_path: Path) -> None:
    profile = tmp_path / "long.yaml"
    profile.write_text("name: long\nmax_epochs: 6\npatience: 10\nlimit_train_batches: 2\nval_subset: 50\n")
    process = _bench(tmp_path, "--profile", str(profile), "--models", "sasrec", wait=False)
    deadline = time.time() + 300
    checkpoints: list[Path] = []
    while not checkpoints and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
        checkpoints = list((tmp_path / "runs" / "bench").glob("synthetic_tiny-sasrec-long-seed1-*/checkpoints/last.ckpt"))
    assert checkpoints, "no checkpoint was written"
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


@pytest.mark.slow
def test_last_checkpoint_follows_every_epoch_and_a_resume_keeps_the_history(tmp_path: Path) -> None:
    # lr 0: validation is the same after every epoch, so no epoch after the first improves it -- the
    # case in which Lightning's save_last left last.ckpt at the first epoch.
    model = tmp_path / "sasrec_frozen.yaml"
    model.write_text("class_path: baselines.sasrec.SASRec\ninit_args:\n  lr: 0.0\n")
    profile = tmp_path / "flat.yaml"
    profile.write_text("name: flat\nmax_epochs: 4\npatience: 10\nlimit_train_batches: 2\nval_subset: 50\n")
    first = _bench(tmp_path, "--profile", str(profile), "--models", str(model), "--trainer.max_epochs", "2")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    (last,) = (tmp_path / "runs" / "bench").glob("synthetic_tiny-sasrec_frozen-flat-seed1-*/checkpoints/last.ckpt")
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["epoch"] == 1
    assert [len(state["callbacks"]["_EpochLog"][key]) for key in ("val_history", "epoch_seconds")] == [2, 2]
    assert not list(last.parent.glob("*.partial"))
    csv_path = tmp_path / "results" / "synthetic-x0.02.csv"
    csv_path.unlink()  # drop the 2-epoch row: the same command now resumes the run at epoch 2
    second = _bench(tmp_path, "--profile", str(profile), "--models", str(model))
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    (row,) = read_rows(csv_path)
    assert json.loads(row["notes"])["resumed"] is True and row["epochs"] == "4"
    assert row["best_epoch"] == "0"  # the epoch-log state came back with the checkpoint (epochs 0-3 tie)

    last.write_bytes(b"torn")
    csv_path.unlink()
    third = _bench(tmp_path, "--profile", str(profile), "--models", str(model))
    assert third.returncode != 0
    said = third.stdout + third.stderr
    assert f"{last.relative_to(tmp_path)}: cannot resume from this checkpoint (UnpicklingError" in said


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
    half = stats.t.ppf(0.975, len(diff) - 1) * sd / math.sqrt(len(diff))
    assert (result.ci_low, result.ci_high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    same = paired_test(new, new.copy(), "ndcg@10")
    assert same.t_pvalue == 1.0 and same.mean_difference == 0.0
    strong = paired_test(np.ones(200), np.zeros(200) + np.linspace(0, 0.1, 200), "recall@10")
    assert strong.t_pvalue < 1e-10 and strong.bootstrap_pvalue == 0.0


def test_a_fit_whose_rate_anneals_to_zero_trains_to_the_end_of_its_schedule(tmp_path: Path) -> None:
    """Early stopping never cuts a schedule that decays to 0 at ``decay_epochs``: validation is flat
    here (lr 0), so patience 1 would stop after two epochs; the fit trains its four and is complete
    (after the fourth the model cannot change), not stopped by the profile's cap of six."""
    model = tmp_path / "tiger_annealed.yaml"
    model.write_text(
        "class_path: baselines.tiger.TIGER\ninit_args:\n  hidden_size: 16\n  num_heads: 2\n  ffn_size: 32\n"
        "  encoder_layers: 1\n  decoder_layers: 1\n  codebook_size: 16\n  embedding_source: collaborative\n"
        "  lr: 0.0\n  lr_schedule: cosine\n  warmup_steps: 1\n  decay_epochs: 4\n"
    )
    profile = tmp_path / "impatient.yaml"
    profile.write_text("name: impatient\nmax_epochs: 6\npatience: 1\nmin_epochs: 0\nlimit_train_batches: 2\nval_subset: 50\n")
    result = _bench(tmp_path, "--profile", str(profile), "--models", str(model))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (row,) = read_rows(tmp_path / "results" / "synthetic-x0.02.csv")
    assert (row["epochs"], row["stopped_by"], row["converged"]) == ("4", "complete", "True")


def test_time_limit_is_a_safety_net_its_rows_are_unconverged_and_never_averaged(tmp_path: Path) -> None:
    # 0.3 s of time limit against 200 epochs and patience 200: only the safety net can end this fit.
    profile = tmp_path / "limit.yaml"
    profile.write_text("name: limit\nmax_epochs: 200\npatience: 200\nval_subset: 50\ntime_limit_minutes: 0.005\n")
    result = _bench(tmp_path, "--profile", str(profile), "--models", "sasrec,popularity")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = {row["config"]: row for row in read_rows(tmp_path / "results" / "synthetic-x0.02.csv")}
    limited, counted = rows["sasrec"], rows["popularity"]
    assert limited["stopped_by"] == "time limit" and limited["converged"] == "False"
    assert int(limited["epochs"]) < 200 and limited["best_epoch"] != ""
    notes = json.loads(limited["notes"])
    assert notes["best_checkpoint"].endswith("best.ckpt") and Path(tmp_path, notes["best_checkpoint"]).exists()
    assert counted["stopped_by"] == "complete" and counted["converged"] == "True"

    from benchmark.leaderboard import load_results, render_markdown, summarise

    summary = summarise(load_results(tmp_path / "results"))
    assert summary["config"].to_list() == ["popularity"]  # the time-limited row is not averaged
    markdown = render_markdown(load_results(tmp_path / "results"), references=[])
    assert "Not in the means" in markdown and "| sasrec | 1 | time limit |" in markdown


@pytest.mark.slow
def test_a_fit_the_safety_net_cut_resumes_under_a_larger_one_and_replaces_its_row(tmp_path: Path) -> None:
    """The safety net is not part of a run's identity: rerun under a larger one, the cut fit goes on
    from its last checkpoint (same run id) and its finished row replaces the time-limited one; a
    finished row is then skipped as usual."""
    fit = "name: limit\nmax_epochs: 4\npatience: 100\nval_subset: 50\n"
    (tmp_path / "cut.yaml").write_text(fit + "time_limit_minutes: 0.002\n")
    (tmp_path / "long.yaml").write_text(fit + "time_limit_minutes: 60\n")
    table = tmp_path / "results" / "synthetic-x0.02.csv"

    first = _bench(tmp_path, "--profile", "cut.yaml", "--models", "sasrec")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    (cut,) = read_rows(table)
    assert cut["stopped_by"] == "time limit" and int(cut["epochs"]) < 4, cut

    second = _bench(tmp_path, "--profile", "long.yaml", "--models", "sasrec")
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "its stored row was ended by the time limit after" in second.stdout
    (finished,) = read_rows(table)
    assert finished["run_id"] == cut["run_id"] and finished["stopped_by"] == "epoch cap", finished
    assert json.loads(finished["notes"])["resumed"] is True
    assert int(finished["global_steps"]) > int(cut["global_steps"])
    assert float(finished["train_seconds"]) >= float(cut["train_seconds"])  # the cut fit's time counts

    third = _bench(tmp_path, "--profile", "long.yaml", "--models", "sasrec")
    assert third.returncode == 0 and "skip sasrec seed 1: already in" in third.stdout, third.stdout[-2000:]
    assert read_rows(table) == [finished]


def test_seconds_per_epoch_counts_every_epoch_not_only_those_up_to_the_best(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Testing the best checkpoint restores the callbacks' states saved in it, whose epoch log ends at
    the best epoch; the row's epoch figures are read before that. Each epoch is timed here as
    100 s x (its index + 1), and patience 1 ends the fit at least one epoch after its best."""
    from benchmark import run

    monkeypatch.setattr(run._EpochLog, "on_train_epoch_end",
                        lambda self, trainer, module: self.epoch_seconds.append(100.0 * (trainer.current_epoch + 1)))
    profile = tmp_path / "impatient.yaml"
    profile.write_text("name: impatient\nmax_epochs: 30\npatience: 1\nval_subset: 50\n")
    (row,) = run.bench("synthetic_tiny", ["sasrec"], profile=str(profile), results_dir=tmp_path / "results",
                       reference_dir=tmp_path / "results", work_dir=tmp_path / "work", threads=1,
                       trainer_overrides={"enable_progress_bar": False})
    assert row["stopped_by"] == "early stopping" and row["best_epoch"] < row["epochs"] - 1, row
    assert row["seconds_per_epoch"] == 100.0 * (row["epochs"] + 1) / 2  # the mean over all epochs


def test_bench_without_models_fits_the_profiles_model_list(tmp_path: Path) -> None:
    from benchmark import run

    profile = tmp_path / "picked.yaml"
    profile.write_text("name: picked\nmax_epochs: 1\npatience: 1\nval_subset: 20\nmodels: [popularity]\n")
    rows = run.bench("synthetic_tiny", None, profile=str(profile), results_dir=tmp_path / "results",
                     reference_dir=tmp_path / "results", work_dir=tmp_path / "work", threads=1,
                     trainer_overrides={"enable_progress_bar": False})
    assert [row["config"] for row in rows] == ["popularity"]
    # The list names what to fit, not how: it is in neither a run's id nor its resolved config.
    picked = run.load_profile(str(profile))
    unpicked = dataclasses.replace(picked, models=None)
    assert run.RunSpec("synthetic_tiny", "popularity", 1, picked).run_id == rows[0]["run_id"]
    assert run.RunSpec("synthetic_tiny", "popularity", 1, unpicked).run_id == rows[0]["run_id"]
    config = json.loads((tmp_path / "results" / "runs" / rows[0]["run_id"] / "config.json").read_text())
    assert "models" not in config["profile"]
    # Without a list: every base config; the shipped profiles name one existing config per family.
    assert run.default_models(run.load_profile("paper")) == run.default_models()
    for name in ("quick", "smoke", "paper"):
        models = run.default_models(run.load_profile(name))
        assert sorted(model.split("_")[0] for model in models) == sorted(run.default_models()), models
        assert all((run.CONFIG_DIR / "model" / f"{model}.yaml").exists() for model in models)


def test_a_model_that_trained_every_useful_batch_is_complete_even_when_the_clock_ran_out(tiny_data) -> None:
    # Popularity's one useful epoch: stopped by the clock after its first batch it is incomplete (a
    # time limit); run to the end, an expired clock does not make it unconverged.
    from datetime import timedelta

    from conftest import quiet_trainer
    from lightning.pytorch.callbacks import Timer

    from baselines.popularity import Popularity

    class ExpiredClock:
        def time_remaining(self) -> float:
            return 0.0

    def fit(timer: Timer):
        model = Popularity(tiny_data.num_items)
        stopper = EarlyStoppingAfter(0, "val/ndcg@10", mode="max", patience=5)
        trainer = quiet_trainer(1, callbacks=[timer, stopper])
        trainer.fit(model, datamodule=tiny_data)
        assert trainer.num_training_batches > 1
        return trainer, stopper, model

    clock = Timer(timedelta(microseconds=1))  # not spent at the fit's start, spent after one batch
    trainer, stopper, model = fit(clock)
    assert trainer.fit_loop.epoch_loop.batch_progress.current.completed == 1
    assert stop_reason(clock, stopper, trainer, model, 1, None) == "time limit"
    clock = Timer(timedelta(hours=1))
    trainer, stopper, model = fit(clock)
    assert stop_reason(clock, stopper, trainer, model, 1, None) == "complete"
    assert stop_reason(ExpiredClock(), stopper, trainer, model, 1, None) == "complete"


@pytest.mark.slow
def test_quick_semantics_end_by_patience_or_the_epoch_cap(tmp_path: Path) -> None:
    # No clock in the profile: patience 1 on a 30-epoch cap ends by early stopping (validation on 50
    # users saturates within a few epochs); a 2-epoch cap with patience 10 ends by the cap.
    patient = tmp_path / "patient.yaml"
    patient.write_text("name: patient\nmax_epochs: 30\npatience: 1\nlimit_train_batches: 2\nval_subset: 50\n")
    capped = tmp_path / "capped.yaml"
    capped.write_text("name: capped\nmax_epochs: 2\npatience: 10\nlimit_train_batches: 2\nval_subset: 50\n")
    for profile in (patient, capped):
        result = _bench(tmp_path, "--profile", str(profile), "--models", "sasrec")
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = {row["profile"]: row for row in read_rows(tmp_path / "results" / "synthetic-x0.02.csv")}
    assert rows["patient"]["stopped_by"] == "early stopping" and rows["patient"]["converged"] == "True"
    assert int(rows["patient"]["epochs"]) < 30
    assert rows["capped"]["stopped_by"] == "epoch cap" and rows["capped"]["converged"] == "False"
    assert rows["capped"]["epochs"] == "2"


def test_the_same_key_from_two_devices_is_one_run_and_the_leaderboard_shows_both(tmp_path: Path) -> None:
    import polars

    from benchmark.leaderboard import PublishedFigure, render_markdown, summarise

    path = tmp_path / "d.csv"
    append_row(path, {**_row(1), "device": "cpu A", "ndcg@10": 0.1, "converged": True})
    with pytest.raises(ValueError, match="exists already"):
        append_row(path, {**_row(1), "device": "gpu B", "ndcg@10": 0.3, "converged": True})
    append_row(path, {**_row(2), "device": "gpu B", "ndcg@10": 0.3, "converged": True})
    table = polars.DataFrame(read_rows(path)).with_columns(
        [polars.col(c).cast(polars.Float64, strict=False)
         for c in (*METRIC_COLUMNS, *EXCLUDED_METRIC_COLUMNS, "epochs", "best_epoch", "train_seconds",
                   "seconds_per_epoch", "test_users_per_second", "peak_memory_mb", "parameters")]
        + [(polars.col("converged") == "True").alias("converged")]
    )
    (summary,) = summarise(table).iter_rows(named=True)
    assert summary["seeds"] == 2 and summary["ndcg@10"] == pytest.approx(0.2)
    assert summary["devices"] == "cpu A, gpu B"
    assert "cpu A, gpu B" in render_markdown(table, references=[])
    assert "Published figures: none for this data and protocol" in render_markdown(table, references=[])
    figure = PublishedFigure("a paper", "M", "d", "kept", "V", {"ndcg@10": 0.1})
    same_split = render_markdown(table.with_columns(polars.lit("leave_one_out").alias("protocol")), [figure])
    assert "Published figures (reference lines" in same_split and "Published figures: none" not in same_split


def test_bench_writes_to_the_local_dir_and_prints_the_stored_reference_beside(tmp_path: Path) -> None:
    stored = _bench(tmp_path, "--profile", "smoke", "--models", "popularity")
    assert stored.returncode == 0, stored.stdout[-2000:] + stored.stderr[-2000:]
    command = [sys.executable, "-m", "benchmark.cli", "bench", "--dataset", "synthetic_tiny", "--profile", "smoke",
               "--models", "popularity", "--trainer.enable_progress_bar", "false"]
    env = {key: value for key, value in os.environ.items() if key != "RECBENCH_RESULTS_DIR"}
    env |= {"PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    mine = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert mine.returncode == 0, mine.stdout[-2000:] + mine.stderr[-2000:]
    assert "skip" not in mine.stdout  # the stored row in results/ is the reference, not the user's run
    (row,) = read_rows(tmp_path / "runs" / "results" / "synthetic-x0.02.csv")
    assert len(read_rows(tmp_path / "results" / "synthetic-x0.02.csv")) == 1
    assert "beside the stored reference" in mine.stdout
    line = next(line for line in mine.stdout.splitlines() if line.startswith("popularity "))
    # same config, same seed, same cases: identical counts, zero difference, p = 1
    assert line.split()[-3:] == ["1", "+0.0000", "1.00e+00"], line


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_bench_into_an_empty_local_dir_runs_and_compares(tmp_path: Path) -> None:
    local = tmp_path / "local"
    result = subprocess.run(
        ["make", "-s", "bench", f"VENV={Path(sys.executable).parent.parent}", "DATASET=synthetic_tiny",
         "PROFILE=smoke", "MODELS=popularity", f"RESULTS_DIR={local}", f"WORK_DIR={tmp_path / 'work'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "skip" not in result.stdout and "bench finished: 1 runs" in result.stdout
    assert len(read_rows(local / "synthetic-x0.02.csv")) == 1
    assert "beside the stored reference" in result.stdout


def test_leaderboard_for_one_dataset_keeps_the_other_sections(tmp_path: Path) -> None:
    from benchmark.leaderboard import leaderboard

    for dataset, ndcg in (("alpha", 0.1), ("beta", 0.2)):
        row = {**_row(1), "dataset": dataset, "ndcg@10": ndcg, "recall@10": ndcg, "converged": True,
               "stopped_by": "early stopping", "device": "cpu", "train_seconds": 1.0, "run_id": f"{dataset}-run"}
        append_row(tmp_path / f"{dataset}.csv", row)
    printed = leaderboard(tmp_path, dataset="alpha")
    assert "## alpha" in printed and "## beta" not in printed
    written = (tmp_path / "LEADERBOARD.md").read_text()
    assert "## alpha" in written and "## beta" in written
    plots = tmp_path / "plots"
    assert {p.name for p in plots.glob("*.png")} == {
        "alpha-p-smoke.png", "alpha-p-smoke-compute.png", "beta-p-smoke.png", "beta-p-smoke-compute.png"}
    # Unchanged sections keep their PNGs; a changed section is redrawn, and only that one.
    drawn = {p.name: p.stat().st_mtime_ns for p in plots.glob("*.png")}
    time.sleep(0.01)
    leaderboard(tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in plots.glob("*.png")} == drawn
    append_row(tmp_path / "beta.csv", {**_row(2), "dataset": "beta", "ndcg@10": 0.3, "recall@10": 0.3,
                                       "converged": True, "stopped_by": "early stopping", "device": "cpu",
                                       "train_seconds": 2.0, "run_id": "beta-run-2"})
    leaderboard(tmp_path)
    redrawn = {p.name for p in plots.glob("*.png") if p.stat().st_mtime_ns != drawn[p.name]}
    assert redrawn == {"beta-p-smoke.png", "beta-p-smoke-compute.png"}


_PEAK_PROBE = """
from benchmark.run import PeakMemory
earlier = PeakMemory()
ballast = b"\\x01" * (300 * 2**20)  # an earlier run's peak: 300 MB above whatever the process holds
lifetime_peak = earlier.peak_mb()
del ballast
memory = PeakMemory()
memory.start()
print(memory.scope, memory.peak_mb(), lifetime_peak)
"""


def test_peak_memory_is_the_runs_own_not_the_process_lifetime() -> None:
    # In a fresh interpreter: a test worker's heap, grown and fragmented by earlier tests, may keep
    # the freed ballast's pages, which would make the check depend on the tests run before it.
    probe = subprocess.run([sys.executable, "-c", _PEAK_PROBE], capture_output=True, text=True, timeout=120,
                           cwd=Path(__file__).resolve().parents[1])
    assert probe.returncode == 0, probe.stderr
    scope, run_peak, lifetime_peak = probe.stdout.split()
    if scope != "run":
        pytest.skip("this kernel cannot reset the peak RSS")
    assert float(run_peak) < float(lifetime_peak) - 200


def test_holm_adjustment_against_hand_computation() -> None:
    # sorted p: 0.01 (x4), 0.02 (x3 -> 0.06), 0.03 (x2 -> 0.06), 0.5 (x1); monotone step-down
    assert holm_adjusted([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    assert holm_adjusted([0.9, 0.8]) == pytest.approx([1.0, 1.0])
    assert holm_adjusted([]) == []


def test_seed_test_is_welchs_test_over_seeds() -> None:
    new, stored = [0.0131, 0.0155, 0.0114], [0.0156, 0.0141, 0.0149]
    result = seed_test(new, stored, "ndcg@10")
    assert (result.seeds_new, result.seeds_stored) == (3, 3)
    assert result.mean_difference == pytest.approx(sum(new) / 3 - sum(stored) / 3)
    assert result.pvalue == pytest.approx(stats.ttest_ind(new, stored, equal_var=False).pvalue)
    assert result.ci_low < result.mean_difference < result.ci_high and result.ci_low < 0 < result.ci_high
    # a deterministic stored config (popularity: one value on every seed) has no spread of its own
    clear = seed_test([0.0131, 0.0155, 0.0114], [0.0051] * 3, "ndcg@10")
    t_statistic = clear.mean_difference / (statistics.stdev([0.0131, 0.0155, 0.0114]) / 3**0.5)
    assert clear.pvalue == pytest.approx(2 * stats.t.sf(t_statistic, 2))  # Welch's df: the new side's n - 1
    assert clear.pvalue < 0.05 and clear.ci_low > 0
    assert seed_test([0.2, 0.2], [0.1, 0.1], "ndcg@10").pvalue == 0.0
    with pytest.raises(ValueError, match=">= 2 seeds"):
        seed_test([0.1], [0.1, 0.2], "ndcg@10")


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


def test_a_profile_sets_the_training_batch_size_and_records_compilation(tmp_path: Path) -> None:
    profile = tmp_path / "big.yaml"
    profile.write_text("name: big\nmax_epochs: 1\npatience: 1\nval_subset: 20\nlimit_train_batches: 1\nbatch_size: 7\n")
    result = _bench(tmp_path, "--profile", str(profile), "--models", "sasrec")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (row,) = read_rows(tmp_path / "results" / "synthetic-x0.02.csv")
    assert json.loads(row["notes"])["compiled"] is False
    (config,) = (tmp_path / "results" / "runs").glob("*/config.json")
    resolved = json.loads(config.read_text())
    assert resolved["data"]["batch_size"] == 7 and resolved["profile"]["batch_size"] == 7


def test_early_stopping_waits_for_min_epochs_and_then_stops_on_patience() -> None:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from recbench.model import SELECTION_METRIC

    # Validation flat for 5 epochs (a plateau at chance level), then two improvements, then flat.
    curve = [0.1] * 5 + [0.2, 0.3] + [0.3] * 13

    class Scripted(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch: list[torch.Tensor], index: int) -> torch.Tensor:
            return self.layer(batch[0]).sum()

        def validation_step(self, batch: list[torch.Tensor], index: int) -> None:
            self.log(SELECTION_METRIC, curve[self.current_epoch])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(torch.ones(2, 1)), batch_size=2)

        def val_dataloader(self) -> DataLoader:
            return self.train_dataloader()

    def fit(min_epochs: int) -> tuple[int, EarlyStoppingAfter]:
        stopper = EarlyStoppingAfter(min_epochs, SELECTION_METRIC, mode="max", patience=2)
        trainer = pl.Trainer(
            max_epochs=len(curve), callbacks=[stopper], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        )
        trainer.fit(Scripted())
        return trainer.current_epoch, stopper

    epochs, stopper = fit(0)
    assert epochs == 3 and stopper.stopped_epoch == 2  # patience 2 ends the plateau
    epochs, stopper = fit(8)
    # The plateau's stops are withdrawn, the improvements at epochs 5 and 6 reset the wait, and the
    # first validation at or after 8 epochs with 2 non-improving ones ends the fit.
    assert epochs == 9 and stopper.stopped_epoch == 8
    assert stopper.best_score.item() == pytest.approx(0.3)
    with pytest.raises(ValueError, match="min_epochs"):
        EarlyStoppingAfter(-1, SELECTION_METRIC)
