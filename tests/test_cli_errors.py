"""The ``recbench`` entry point turns the project's own errors into one message and an exit code.

Issue 15, item 8: ``recbench data prepare`` on a broken file printed 22 lines of traceback before the
located message, and ``recbench bench --models <unknown>`` a bare ``FileNotFoundError`` (before).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.cli import main
from recbench.data import DataFormatError

ROOT = Path(__file__).resolve().parents[1]
# The documented exit codes (benchmark/errors.py): 1 for bad or missing data, 2 for a wrong name.
EXIT_DATA, EXIT_CONFIG = 1, 2


def _broken_beauty(tmp_path: Path) -> tuple[Path, Path]:
    """A data YAML whose sequences.txt has a bad id on line 2; returns (yaml, sequences path)."""
    folder = tmp_path / "beauty"
    folder.mkdir()
    sequences = folder / "sequences.txt"
    sequences.write_text("1 1 2\n2 1 x3\n")
    (folder / "items.jsonl").write_text('{"item": 1, "asin": "A1"}\n{"item": 2, "asin": "A2"}\n')
    config = tmp_path / "broken.yaml"
    config.write_text(
        "class_path: datamodules.amazon.AmazonDataModule\ninit_args:\n  category: beauty\n"
        f"  data_dir: {folder}\n  cache_dir: {tmp_path / 'cache'}\n"
    )
    return config, sequences


def test_data_format_error_is_one_message_and_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config, sequences = _broken_beauty(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "prepare", str(config)])
    assert exit_info.value.code == EXIT_DATA
    err = capsys.readouterr().err
    assert err.strip() == f"recbench: error: {sequences}:2: non-integer id 'x3' (ids are positive integers)"


def test_debug_flag_and_environment_show_the_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, _ = _broken_beauty(tmp_path)
    with pytest.raises(DataFormatError):
        main(["--debug", "data", "prepare", str(config)])
    monkeypatch.setenv("RECBENCH_DEBUG", "1")
    with pytest.raises(DataFormatError):
        main(["data", "prepare", str(config)])


def test_missing_data_is_one_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "nowhere.yaml"
    config.write_text(
        "class_path: datamodules.amazon.AmazonDataModule\ninit_args:\n  category: toys\n"
        f"  data_dir: {tmp_path / 'none'}\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "stats", str(config)])
    assert exit_info.value.code == EXIT_DATA
    err = capsys.readouterr().err
    assert err.startswith("recbench: error: amazon/toys (auto): raw data not found.")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["data", "stats", "beuaty"], "unknown data 'beuaty': expected a YAML path or one of beauty, "),
        # The unknown name comes first, so nothing is trained before the error.
        (
            ["bench", "--dataset", "synthetic_tiny", "--profile", "smoke", "--models", "nope,sasrec"],
            "unknown model 'nope': expected a YAML path or one of ",
        ),
        # Every name is checked before the first fit, whatever its place in the list.
        (
            ["bench", "--dataset", "synthetic_tiny", "--profile", "smoke", "--models", "sasrec,nope"],
            "unknown model 'nope': expected a YAML path or one of ",
        ),
        (["bench", "--dataset", "synthetic_tiny", "--profile", "quik", "--models", "sasrec"],
         "unknown profile 'quik': expected a YAML path or one of paper, quick, smoke"),
        (["compare", "nope", "--dataset", "synthetic_tiny"], "unknown model 'nope': expected a YAML path or one of "),
    ],
)
def test_unknown_names_list_the_valid_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], expected: str
) -> None:
    if argv[0] == "bench":
        argv = [*argv, "--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith(f"recbench: error: {expected}")
    listed = "toys" if argv[0] == "data" else ("smoke" if "quik" in argv else "sasrec")
    assert listed in err and "Traceback" not in err


def test_installed_command_prints_no_traceback(tmp_path: Path) -> None:
    """The same through a real process: one line on stderr, exit code 1."""
    config, sequences = _broken_beauty(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "benchmark.cli", "data", "prepare", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == EXIT_DATA
    assert result.stderr.strip().splitlines() == [
        f"recbench: error: {sequences}:2: non-integer id 'x3' (ids are positive integers)"
    ]
