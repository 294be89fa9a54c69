"""The before/after speed table: rows matched by config (or a pair), ratios, like-with-like check."""

import json
from pathlib import Path

import pytest

from benchmark.perf.speed_ratios import main


def _report(path: Path, commit: str, models: list[tuple[str, float, float]], threads: int = 2) -> Path:
    rows = [
        {"model": name, "extrapolated": False, "seconds_per_epoch": seconds, "steps_per_second": 1.0,
         "padding_share": 0.5, "peak_memory_mb": 100.0, "test_users_per_second": users}
        for name, seconds, users in models
    ]
    path.write_text(json.dumps({"device": "cpu x", "dataset": "beauty", "threads": threads, "git_commit": commit,
                                "date": "today", "models": rows}))
    return path


def test_ratios_pair_renamed_configs_and_refuse_unlike_reports(tmp_path: Path) -> None:
    before = _report(tmp_path / "b.json", "aaaa", [("sasrec", 30.0, 100.0), ("tiger", 400.0, 50.0)])
    after = _report(tmp_path / "a.json", "bbbb", [("sasrec", 15.0, 200.0), ("tiger", 50.0, 50.0), ("new", 1.0, 1.0)])
    main(["--before", str(before), "--after", str(after), "--out", str(tmp_path / "out")])
    text = (tmp_path / "out.md").read_text()
    assert "| sasrec | sasrec | 30.0 | 15.0 | 2.00x |" in text and "| 100 | 200 | 2.00x |" in text
    assert "| tiger | tiger | 400.0 | 50.0 | 8.00x |" in text and "| new |" not in text
    main(["--before", str(before), "--after", str(after), "--pair", "new=sasrec", "--out", str(tmp_path / "paired")])
    assert "| new | sasrec | 30.0 | 1.0 | 30.00x |" in (tmp_path / "paired.md").read_text()
    other = _report(tmp_path / "o.json", "cccc", [("sasrec", 15.0, 200.0)], threads=1)
    with pytest.raises(SystemExit, match="threads"):
        main(["--before", str(before), "--after", str(other), "--out", str(tmp_path / "x")])
