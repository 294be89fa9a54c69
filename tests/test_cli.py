"""The `recbench` command: short names, linked arguments, strict configs."""

import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.cli import expand_short_names
from benchmark.registry import CONFIG_DIR, instantiate_model

ROOT = Path(__file__).resolve().parents[1]


def _recbench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmark.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )


def test_short_names_expand_to_configs() -> None:
    args = expand_short_names(["fit", "--model", "sasrec", "--data=synthetic_tiny", "--trainer.max_epochs", "2"])
    assert args[2] == str(CONFIG_DIR / "model" / "sasrec.yaml")
    assert args[3] == f"--data={CONFIG_DIR / 'data' / 'synthetic_tiny.yaml'}"
    assert expand_short_names(["--model", "my/own.yaml"])[1] == "my/own.yaml"


def test_print_config_links_and_rejects_unknown_keys(tmp_path: Path) -> None:
    result = _recbench("fit", "--model", "sasrec", "--data", "synthetic_tiny", "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "baselines.sasrec.SASRec" in result.stdout and "monitor: val/ndcg@10" in result.stdout
    bad = _recbench("fit", "--model", "sasrec", "--data", "synthetic_tiny", "--model.init_args.hiden_size", "8",
                    "--print_config", cwd=tmp_path)
    assert bad.returncode != 0 and "hiden_size" in bad.stderr


def test_unknown_yaml_key_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text("class_path: baselines.sasrec.SASRec\ninit_args:\n  hiden_size: 8\n")
    with pytest.raises(Exception, match="hiden_size"):
        instantiate_model(str(config), num_items=10, max_len=5)


@pytest.mark.slow
def test_fit_then_test_prints_metrics(tmp_path: Path) -> None:
    fit = _recbench("fit", "--model", "sasrec", "--data", "synthetic_tiny", "--trainer.max_epochs", "1", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-2000:]
    best = next(tmp_path.glob("runs/recbench/version_0/checkpoints/best*.ckpt"))
    test = _recbench("test", "--model", "sasrec", "--data", "synthetic_tiny", "--ckpt_path", str(best), cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-2000:]
    assert "test/ndcg@10" in test.stdout and "test/recall@20" in test.stdout
