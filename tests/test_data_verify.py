"""`recbench data verify`: the SHA-256 manifest against a copy of the data."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.data_verify import MANIFEST, check, default_data_dir, read_manifest
from recbench.data import data_root

ROOT = Path(__file__).resolve().parents[1]


def _verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmark.cli", "data", "verify", *args], capture_output=True, text=True,
        timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_manifest_names_every_dataset_folder_once() -> None:
    entries = read_manifest()
    assert len(entries) == 18 and all(len(digest) == 64 for digest in entries.values())
    assert {name.split("/")[0] for name in entries} == {"amazon", "steam", "yoochoose"}


def test_default_data_dir_is_the_libraries() -> None:
    assert default_data_dir() == data_root()


def test_a_changed_and_a_missing_file_are_named(tmp_path: Path) -> None:
    (tmp_path / "data" / "d").mkdir(parents=True)
    (tmp_path / "data" / "d" / "a.txt").write_text("a\n")
    (tmp_path / "data" / "d" / "b.txt").write_text("b\n")
    manifest = tmp_path / "manifest.sha256"
    manifest.write_text(
        "# comment\n"
        "87428fc522803d31065e7bce3cf03fe475096631e5e07bbd7a0fde60c4cf25c7  d/a.txt\n"  # sha256 of "a\n"
        f"{'0' * 64}  d/b.txt\n"
        f"{'1' * 64}  d/c.txt\n"
    )
    results = {result.path: result for result in check("d", tmp_path / "data", manifest)}
    assert results["d/a.txt"].ok
    assert not results["d/b.txt"].ok and "expected 000" in results["d/b.txt"].describe(tmp_path / "data")
    assert results["d/c.txt"].actual is None and "missing" in results["d/c.txt"].describe(tmp_path / "data")


@pytest.mark.data
def test_verify_passes_on_the_data_and_fails_naming_the_file_on_a_modified_copy(tmp_path: Path) -> None:
    ok = _verify("all")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "all 18 files match" in ok.stdout
    copy = tmp_path / "data"
    shutil.copytree(data_root() / "yoochoose", copy / "yoochoose")
    with open(copy / "yoochoose" / "rc15" / "test_sessions.txt", "a") as handle:
        handle.write("1 2 3\n")
    bad = _verify("yoochoose", "--data_dir", str(copy))
    assert bad.returncode != 0
    (line,) = [line for line in bad.stdout.splitlines() if "mismatch" in line]
    assert "yoochoose/rc15/test_sessions.txt" in line and read_manifest(MANIFEST)["yoochoose/rc15/test_sessions.txt"] in line
    assert "1 of 4 files differ" in bad.stderr
