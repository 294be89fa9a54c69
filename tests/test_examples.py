"""The examples run as the README says: a 40-line model through `compare`, and a plain script."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(*command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{EXAMPLES}", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_the_example_model_keeps_the_contract() -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        from mean_pool import MeanPool
    finally:
        sys.path.remove(str(EXAMPLES))
    model = MeanPool(num_items=7, max_len=4, hidden_size=8)
    history = torch.tensor([[0, 0, 1, 2], [0, 0, 0, 3]])
    ranked = model.recommend(history, k=10)
    assert ranked.shape == (2, 10) and ranked.dtype == torch.long
    for row in ranked.tolist():
        real = [item for item in row if item != 0]
        assert len(real) == 7 and sorted(real) == list(range(1, 8)) and row[7:] == [0, 0, 0]
    assert torch.isfinite(model.loss({"history": history, "target": torch.tensor([3, 4])}))


def test_compare_ranks_the_example_model(tmp_path: Path) -> None:
    common = ("--dataset", "synthetic_tiny", "--profile", "smoke")
    stored = _run("-m", "benchmark.cli", "bench", "--models", "popularity", "--results_dir", "ref", *common, cwd=tmp_path)
    assert stored.returncode == 0, stored.stdout[-2000:] + stored.stderr[-2000:]
    result = _run("-m", "benchmark.cli", "compare", str(EXAMPLES / "mean_pool.yaml"), "--reference_dir", "ref",
                  *common, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = result.stdout.split("rank among the stored converged rows", 1)[1]  # after the progress bars
    ranking = [line.split()[1] for line in table.splitlines() if line.strip()[:1].isdigit() and "  " in line]
    assert "mean_pool" in ranking and "popularity" in ranking
    assert any(line.startswith("popularity") and "ndcg@10" in line for line in result.stdout.splitlines())
    assert "needs >= 2 converged seeds of mean_pool" in result.stdout  # one seed: no seed-level test


def test_own_lightning_script_prints_the_benchmark_metrics(tmp_path: Path) -> None:
    result = _run(str(EXAMPLES / "own_lightning_script.py"), "--epochs", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "'test/ndcg@10'" in result.stdout and "'test/recall@20'" in result.stdout
