"""Metrics with 2 DDP processes (gloo, CPU) equal metrics with 1, on an uneven user count."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("ddp_eval.py")


def _run(devices: int, tmp_path: Path) -> dict:
    out = tmp_path / f"metrics-{devices}.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(devices), str(out), str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_processes_give_exactly_the_metrics_of_one(tmp_path: Path) -> None:
    single, double = _run(1, tmp_path), _run(2, tmp_path)
    assert double["world_size"] == 2 and single["world_size"] == 1
    assert len(single["users"]) == 447, "the fixture must have an odd number of users"
    assert double["users"] == single["users"], "a user was evaluated twice or not at all"
    assert double["metrics"] == single["metrics"]
