"""The GPU script path on the CPU: prepare a carry, run ``benchmark/gpu/run.sh`` without raw data,
import the archive it leaves in ``$OUT``, and reject damaged archives with located reasons.

The dataset is synthetic_tiny's tables written as a preprocessed Amazon set named ``beauty``
(sequences.txt + items.jsonl) in a temporary ``RECBENCH_DATA_DIR``: a source with raw files, so the
GPU side must find its prepared cache through the carry once those files are gone.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import polars
import pytest
import torch

from benchmark.gpu import unpack
from benchmark.gpu.bench import fit_limit_minutes
from benchmark.gpu.carry import CarryError, carried_caches, pack_tensors, unpack_tensors
from benchmark.gpu.import_rows import import_rows
from benchmark.gpu.import_rows import main as import_main
from benchmark.gpu.prepare import parse_plan
from benchmark.registry import instantiate_data
from benchmark.run import ROW_COLUMNS, read_rows
from datamodules.synthetic import SyntheticDataModule

ROOT = Path(__file__).resolve().parents[1]


def write_tiny_amazon(folder: Path) -> None:
    """synthetic_tiny as the preprocessed Amazon format (user lines of item ids + item JSON lines)."""
    data = SyntheticDataModule(scale=0.02, cache_dir=str(folder / "scratch-cache"))
    data.prepare_data()
    interactions = polars.read_parquet(data.cache_path / "interactions.parquet")
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        " ".join(str(v) for v in [user, *items])
        for user, items in interactions.group_by("user", maintain_order=True).agg("item").iter_rows()
    ]
    (folder / "sequences.txt").write_text("\n".join(lines) + "\n")
    with open(folder / "items.jsonl", "w") as handle:
        for row in data.items_table.iter_rows(named=True):
            record = {"item": row["item"], "asin": f"S{row['item']:05d}", "title": row["title"],
                      "categories": [row["categories"]]}
            handle.write(json.dumps(record) + "\n")
    shutil.rmtree(folder / "scratch-cache")


def _python_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECBENCH_", "GPU_"))}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def _prepare(tmp: Path, plan: str) -> subprocess.CompletedProcess[str]:
    write_tiny_amazon(tmp / "data" / "amazon" / "beauty")
    env = _python_env(RECBENCH_DATA_DIR=str(tmp / "data"), RECBENCH_CACHE_DIR=str(tmp / "prep-cache"))
    return subprocess.run(
        [sys.executable, "-m", "benchmark.gpu.prepare", "--no-wheels", "--profile", "smoke", "--plan", plan,
         "--carry", str(tmp / "carry")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )


def _run_script(tmp: Path, stored: Path, out: Path, test_seconds: int = 0, work: Path | None = None) -> subprocess.CompletedProcess[str]:
    """run.sh as on the GPU machine: no raw data (RECBENCH_DATA_DIR unset; the script points it at an
    empty folder), a fresh cache, no wheels to install (this venv has the packages); the CUDA tests
    after the bench only when ``test_seconds`` > 0."""
    (tmp / "no-wheels").mkdir(exist_ok=True)
    env = _python_env(
        OUT=str(out), PYTHON=sys.executable, GPU_SITE=str(tmp / "site"), GPU_WORK=str(work or tmp / "work"),
        GPU_WHEELS=str(tmp / "no-wheels"), GPU_CARRY=str(tmp / "carry"), GPU_TEST_SECONDS=str(test_seconds),
        GPU_BENCH_ARGS=f"--stored-results {stored} --reserve-seconds 0 --min-fit-seconds 0",
    )
    return subprocess.run(["bash", str(ROOT / "benchmark" / "gpu" / "run.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def gpu_round(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """prepare -> run.sh without raw data -> the archive in a fake $OUT (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("gpu")
    prepared = _prepare(tmp, "beauty:popularity,sasrec")
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    shutil.rmtree(tmp / "data")  # the raw files do not travel
    stored = tmp / "stored"
    stored.mkdir()
    run = _run_script(tmp, stored, tmp / "out", test_seconds=120)  # a cap; pytest's start-up alone can take a minute on a loaded CPU
    return {"tmp": tmp, "prepared": prepared, "run": run, "out": tmp / "out"}


def test_the_script_runs_from_the_carried_caches_and_its_rows_import(gpu_round: dict, tmp_path: Path) -> None:
    run, out = gpu_round["run"], gpu_round["out"]
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpu-bench.log", "gpu-tests.log", "results.tar.gz", "summary.json"]
    # The CUDA tests ran after the bench; without CUDA each one skips.
    tests_log = (out / "gpu-tests.log").read_text()
    assert " skipped" in tests_log and "failed" not in tests_log and "error" not in tests_log.lower(), tests_log
    assert "CUDA tests exit 0" in run.stdout, run.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["config"], r["status"]) for r in summary["runs"]] == [("popularity", "stored"), ("sasrec", "stored")]
    assert summary["commit"] not in ("", "unknown")
    manifest = json.loads((gpu_round["tmp"] / "carry" / "manifest.json").read_text())
    assert manifest["datasets"]["beauty"]["cache_dir"].startswith("beauty-")

    results = tmp_path / "results"
    imported = import_rows(out, results, profile="smoke")
    assert not imported.rejected and not imported.already_stored, [r.problems for r in imported.rejected]
    rows = read_rows(results / "beauty.csv")
    assert [row["config"] for row in rows] == ["popularity", "sasrec"]
    for row in rows:
        assert row["git_commit"] == summary["commit"] and row["profile"] == "smoke"
        assert {p.name for p in (results / "runs" / row["run_id"]).iterdir()} >= {"config.json", "metrics.json",
                                                                                 "cases.parquet"}
    # Importing the same files again is safe: both rows are reported as stored already, none is
    # stored twice or rejected; a row of a stored key that differs from the stored one is rejected.
    before = (results / "beauty.csv").read_text()
    again = import_rows(out, results, profile="smoke")
    assert (len(again.stored), len(again.already_stored), len(again.rejected)) == (0, 2, 0)
    assert (results / "beauty.csv").read_text() == before
    changed = _damaged(out, tmp_path / "changed", lambda r: (_edit_row(r, 3, **{"ndcg@10": "0.5"}),
                                                             _edit_metrics(r, 3, **{"ndcg@10": 0.5})))
    mixed = import_rows(changed, results, profile="smoke")
    assert (len(mixed.stored), len(mixed.already_stored), len(mixed.rejected)) == (0, 1, 1)
    assert "is stored already in" in mixed.rejected[0].problems[0] and "settled" in mixed.rejected[0].problems[0]
    assert (results / "beauty.csv").read_text() == before

    # Rerunning with those rows stored fits nothing (on another machine: the fixture's stays as the
    # first call left it, for the warm-machine test below).
    rerun = _run_script(gpu_round["tmp"], results, tmp_path / "out2", work=tmp_path / "another-machine")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    statuses = [(r["status"], r.get("reason")) for r in json.loads((tmp_path / "out2" / "summary.json").read_text())["runs"]]
    assert statuses == [("skipped", "stored already")] * 2


def test_a_warm_machine_does_not_archive_an_earlier_calls_rows_again(gpu_round: dict, tmp_path: Path) -> None:
    """A second call on a machine kept warm finds the first call's results folder: its rows count as
    fitted, but only this call's rows travel back (the first call's came back with its files), so
    importing both calls' files stores each row once and rejects nothing."""
    warm = tmp_path / "warm-machine"
    shutil.copytree(gpu_round["tmp"] / "work", warm)
    nothing_stored = tmp_path / "stored"
    nothing_stored.mkdir()
    second = _run_script(gpu_round["tmp"], nothing_stored, tmp_path / "out2", work=warm)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "from an earlier call on this machine set aside as" in second.stdout
    runs = json.loads((tmp_path / "out2" / "summary.json").read_text())["runs"]
    assert [(r["config"], r["status"]) for r in runs] == [("popularity", "skipped"), ("sasrec", "skipped")]
    assert all(r["reason"].startswith("fitted by an earlier call on this machine") for r in runs), runs
    with tarfile.open(tmp_path / "out2" / "results.tar.gz") as tar:
        assert not [name for name in tar.getnames() if name.endswith(".csv")], tar.getnames()

    results = tmp_path / "results"
    first, second = import_rows(gpu_round["out"], results, profile="smoke"), import_rows(tmp_path / "out2", results, profile="smoke")
    assert [len(first.stored), len(first.rejected), len(second.stored), len(second.rejected)] == [2, 0, 0, 0]
    assert [row["config"] for row in read_rows(results / "beauty.csv")] == ["popularity", "sasrec"]


def _damaged(out: Path, target: Path, change) -> Path:  # type: ignore[no-untyped-def]
    """A copy of the archive in ``out`` with ``change(results_folder)`` applied."""
    unpacked = target / "unpacked"
    with tarfile.open(out / "results.tar.gz") as tar:
        tar.extractall(unpacked, filter="data")
    change(unpacked / "results")
    files = target / "files"
    files.mkdir()
    with tarfile.open(files / "results.tar.gz", "w:gz") as tar:
        tar.add(unpacked / "results", arcname="results")
    return files


def _edit_row(results: Path, line: int, **values: str) -> None:
    table = results / "beauty.csv"
    rows = read_rows(table)
    rows[line - 2].update(values)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ROW_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    table.write_text(buffer.getvalue())


def _edit_metrics(results: Path, line: int, **values: object) -> None:
    run_id = read_rows(results / "beauty.csv")[line - 2]["run_id"]
    path = results / "runs" / run_id / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def _drop_cases(results: Path) -> None:
    (results / "runs" / read_rows(results / "beauty.csv")[1]["run_id"] / "cases.parquet").unlink()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_drop_cases, "lacks cases.parquet"),
        (lambda r: _edit_row(r, 3, **{"ndcg@10": "0.999"}), "metrics.json differs from the row in 1 column(s): ndcg@10"),
        (lambda r: (_edit_row(r, 3, schema_version="1"), _edit_metrics(r, 3, schema_version=1)),
         "schema_version is '1', expected 2"),
        (lambda r: (_edit_row(r, 3, git_commit="unknown"), _edit_metrics(r, 3, git_commit="unknown")),
         "git_commit is 'unknown'"),
    ],
    ids=["missing-cases", "metrics-differ", "schema-version", "commit-unknown"],
)
def test_a_damaged_archive_is_rejected_with_a_located_reason(gpu_round: dict, tmp_path: Path, capsys, change,  # type: ignore[no-untyped-def]
                                                              reason: str) -> None:
    files = _damaged(gpu_round["out"], tmp_path, change)
    results = tmp_path / "results"
    assert import_main([str(files), "--results-dir", str(results), "--profile", "smoke"]) == 1
    printed = capsys.readouterr()
    assert "REJECTED results.tar.gz:results/beauty.csv:3 (run beauty-sasrec-smoke-seed1-" in printed.err
    assert reason in printed.err
    assert "1 row(s) stored, 0 stored already, 1 rejected" in printed.out  # the intact popularity row is stored
    assert [row["config"] for row in read_rows(results / "beauty.csv")] == ["popularity"]


def test_a_wrong_profile_and_a_repeated_key_are_rejected(gpu_round: dict, tmp_path: Path) -> None:
    imported = import_rows(gpu_round["out"], tmp_path / "results", profile="paper")
    stored, rejected = imported.stored, imported.rejected
    assert not stored and len(rejected) == 2
    assert all("profile is 'smoke', expected 'paper'" in " ".join(r.problems) for r in rejected)

    def repeat(results: Path) -> None:
        rows = read_rows(results / "beauty.csv")
        with open(results / "beauty.csv", "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=ROW_COLUMNS).writerow(rows[1])

    files = _damaged(gpu_round["out"], tmp_path, repeat)
    imported = import_rows(files, tmp_path / "results2", profile="smoke")
    stored, rejected = imported.stored, imported.rejected
    assert len(stored) == 2 and len(rejected) == 1
    assert rejected[0].location.startswith("results.tar.gz:results/beauty.csv:4")
    assert "its key repeats results.tar.gz:results/beauty.csv:3" in rejected[0].problems[0]


def _store_as_cut_by_the_clock(results: Path, config: str, train_seconds: str | None = None) -> str:
    """Turn the stored row of ``config`` into one of another run that the time limit ended (as an
    earlier GPU call whose clock cut the fit leaves it); returns that run id."""
    rows = read_rows(results / "beauty.csv")
    row = next(r for r in rows if r["config"] == config)
    old_run = row["run_id"] + "-earlier-call"
    (results / "runs" / row["run_id"]).rename(results / "runs" / old_run)
    row.update(run_id=old_run, converged="False", stopped_by="time limit", train_seconds=train_seconds or row["train_seconds"])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ROW_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    (results / "beauty.csv").write_text(buffer.getvalue())
    return old_run


@pytest.mark.slow
def test_a_row_the_call_clock_cut_is_fitted_again_and_superseded(gpu_round: dict, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A stored row the time limit ended does not block its key: the bench fits it again and a row
    that ends otherwise (here the smoke profile's epoch cap) replaces it on import, its run folder
    kept; rows that ended otherwise are never refitted, and a time-limited row never replaces one."""
    results = tmp_path / "results"
    import_rows(gpu_round["out"], results, profile="smoke")
    old_run = _store_as_cut_by_the_clock(results, "sasrec")

    rerun = _run_script(gpu_round["tmp"], results, tmp_path / "out2", work=tmp_path / "fresh-machine")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    summary = json.loads((tmp_path / "out2" / "summary.json").read_text())
    assert [(r["config"], r["status"]) for r in summary["runs"]] == [("popularity", "skipped"), ("sasrec", "stored")]
    assert "beauty sasrec seed 1: a time limit ended it after" in rerun.stdout
    assert "in an earlier call; fitting it again with" in rerun.stdout

    status = import_main([str(tmp_path / "out2"), "--results-dir", str(results), "--profile", "smoke"])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert f"replacing the time-limited row of run {old_run}" in printed.out
    rows = read_rows(results / "beauty.csv")
    assert [(r["config"], r["stopped_by"]) for r in rows] == [("popularity", "complete"), ("sasrec", "epoch cap")]
    assert (results / "runs" / old_run / "metrics.json").is_file()

    # A call that cannot offer 1.25 times the training time the clock cut does not start the fit.
    long_cut = tmp_path / "long-cut"
    import_rows(gpu_round["out"], long_cut, profile="smoke")
    _store_as_cut_by_the_clock(long_cut, "sasrec", train_seconds="100000.0")
    short = _run_script(gpu_round["tmp"], long_cut, tmp_path / "out3", work=tmp_path / "another-machine")
    assert short.returncode == 0, short.stdout + short.stderr
    (_, sasrec) = json.loads((tmp_path / "out3" / "summary.json").read_text())["runs"]
    assert sasrec["status"] == "skipped" and sasrec["reason"].startswith(
        "a time limit ended it after 100000 s of training in an earlier call and this call offers"), sasrec

    # Stored and archived rows both ended by the time limit: rejected (a second cut fit adds nothing).
    other = tmp_path / "other"
    import_rows(gpu_round["out"], other, profile="smoke")
    _store_as_cut_by_the_clock(other, "sasrec")
    cut = _damaged(gpu_round["out"], tmp_path / "cut", lambda r: (_edit_row(r, 3, stopped_by="time limit"),
                                                                    _edit_metrics(r, 3, stopped_by="time limit")))
    imported = import_rows(cut, other, profile="smoke")
    assert [item.row["config"] for item in imported.already_stored] == ["popularity"]
    assert not imported.stored and len(imported.rejected) == 1
    assert "stored already" in imported.rejected[0].problems[0] and "ended by the time limit" in imported.rejected[0].problems[0]


def test_without_raw_files_or_a_carried_cache_the_error_says_what_to_do(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("RECBENCH_DATA_DIR", str(tmp_path / "nothing"))
    monkeypatch.setenv("RECBENCH_CACHE_DIR", str(tmp_path / "cache"))
    with carried_caches({"datasets": {}}), pytest.raises(CarryError, match="add the dataset to the plan of `make gpu-prepare`"):
        _ = instantiate_data("beauty").cache_path
    # Synthetic data has no raw files: its cache key is computed as always.
    with carried_caches({"datasets": {}}):
        assert instantiate_data("synthetic_tiny").cache_path.name.startswith("synthetic-")


def test_tensors_are_packed_losslessly_and_damage_is_caught(tmp_path: Path) -> None:
    tensors = {"vectors": torch.nn.functional.normalize(torch.randn(101, 24), dim=1),
               "codes": torch.randint(0, 256, (101, 4)), "empty": torch.zeros(0, 3),
               "scalar": torch.tensor(2.5, dtype=torch.float64)}
    torch.save(tensors, tmp_path / "t.pt")
    header = pack_tensors(tmp_path / "t.pt", tmp_path / "t.pt.xz")
    unpack_tensors(tmp_path / "t.pt.xz", header, tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))
    header[1]["sha256"] = "0" * 64
    with pytest.raises(CarryError, match="does not match its recorded SHA-256"):
        unpack_tensors(tmp_path / "t.pt.xz", header, tmp_path / "again.pt")


def test_a_site_archive_is_checked_against_the_wheels_record(tmp_path: Path) -> None:
    import base64
    import hashlib

    def record_line(name: str, data: bytes) -> str:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        return f"{name},sha256={digest},{len(data)}"

    files = {"pkg/__init__.py": b"VALUE = 1\n"}
    record = "\n".join([record_line(n, d) for n, d in files.items()] + ["pkg-1.0.dist-info/RECORD,,"]) + "\n"
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in {**files, "pkg-1.0.dist-info/RECORD": record.encode()}.items():
            archive.writestr(name, data)
    from benchmark.gpu.prepare import _recompress

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _recompress(wheel, wheels / "pkg-1.0.site.tar.xz")
    assert unpack.unpack(wheels, tmp_path / "site") == ["pkg-1.0.site.tar.xz (1 files verified)"]
    (tmp_path / "site" / "pkg" / "__init__.py").write_text("VALUE = 2\n")
    with pytest.raises(unpack.UnpackError, match=r"RECORD:1: pkg/__init__.py does not match its SHA-256"):
        unpack.verify_record(tmp_path / "site", "pkg-1.0.dist-info")


def test_the_safety_net_leaves_the_reserve_and_stops_starting_fits() -> None:
    assert fit_limit_minutes(540, 120, 90) == 7.0
    assert fit_limit_minutes(300, 120, 90) == 3.0
    assert fit_limit_minutes(200, 120, 90) is None
    assert parse_plan("beauty:sasrec,tiger; toys:sasrec") == (("beauty", ("sasrec", "tiger")), ("toys", ("sasrec",)))
    with pytest.raises(ValueError, match="expected DATASET:MODEL"):
        parse_plan("beauty")


@pytest.mark.slow
def test_a_semantic_id_model_runs_from_carried_embeddings_and_ids(tmp_path: Path) -> None:
    """TIGER (smoke) on the tiny set: MiniLM embeddings and residual k-means IDs built here, packed,
    rebuilt there bit for bit (a semantic-ID cache miss would need faiss and a fresh encoding)."""
    prepared = _prepare(tmp_path, "beauty:tiger")
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    manifest = json.loads((tmp_path / "carry" / "manifest.json").read_text())
    assert sorted(Path(k).name.split("_")[0] for k in manifest["packed"]) == ["item", "sid"]
    shutil.rmtree(tmp_path / "data")
    stored = tmp_path / "stored"
    stored.mkdir()
    run = _run_script(tmp_path, stored, tmp_path / "out")
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["stored"]
    # The item side came from the carry: nothing was encoded or fitted there.
    cache = tmp_path / "work" / "cache" / "item_side"
    assert sorted(p.name for p in cache.glob("*/*.pt")) == sorted(Path(k).name for k in manifest["packed"])
    imported = import_rows(tmp_path / "out", tmp_path / "results", profile="smoke")
    assert len(imported.stored) == 1 and not imported.rejected, [r.problems for r in imported.rejected]
    (row,) = read_rows(tmp_path / "results" / "beauty.csv")
    assert row["config"] == "tiger" and row["profile"] == "smoke"
