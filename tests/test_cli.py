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


# ---------------------------------------------------------------------- one convention for every command
def test_help_lists_every_subcommand_without_importing_torch(tmp_path: Path) -> None:
    result = _recbench("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["fit", "validate", "test", "predict", "bench", "compare", "leaderboard", "bands", "data"]
    # `recbench --help` and `recbench leaderboard` must start fast: neither imports torch.
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, benchmark.cli, benchmark.leaderboard, benchmark.function_cli, "
         "benchmark.data_verify; print(sorted(m for m in ('torch', 'lightning', 'scipy') if m in sys.modules))"],
        capture_output=True, text=True, cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stdout + probe.stderr


def _command(name: str):
    from benchmark.leaderboard import compare, leaderboard
    from benchmark.run import bench

    return {"bench": bench, "compare": compare, "leaderboard": leaderboard}[name]


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("bench", ["--dataset", "synthetic_tiny", "--models", "popularity,sasrec", "--seeds", "1,2", "--profile",
                   "smoke", "--trainer.enable_progress_bar", "false", "--trainer.logger",
                   "lightning.pytorch.loggers.TensorBoardLogger", "--trainer.max_time", "00:00:10:00",
                   "--data_overrides", "{batch_size: 32}"]),
        ("compare", ["sasrec_h128", "--dataset", "beauty", "--seed", "3"]),
        ("leaderboard", ["--dataset", "beauty", "--profile", "quick"]),
    ],
)
def test_print_config_fed_back_resolves_the_same_arguments(
    name: str, argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmark.function_cli import function_arguments, parse

    function = _command(name)
    with pytest.raises(SystemExit) as printed:
        parse(function, f"recbench {name}", [*argv, "--print_config"])
    assert printed.value.code in (0, None)
    config = tmp_path / "config.yaml"
    config.write_text(capsys.readouterr().out)
    parser, direct = parse(function, f"recbench {name}", argv)
    reparser, fed_back = parse(function, f"recbench {name}", ["--config", str(config)])
    expected = function_arguments(function, parser, direct)
    assert function_arguments(function, reparser, fed_back) == expected
    if name == "bench":
        assert expected["models"] == ["popularity", "sasrec"] and expected["seeds"] == [1, 2]
        overrides = expected["trainer_overrides"]
        assert overrides["logger"].class_path.endswith("TensorBoardLogger")
        assert overrides["enable_progress_bar"] is False and "max_epochs" not in overrides
        assert expected["data_overrides"] == {"batch_size": 32}


def test_trainer_options_are_typed(tmp_path: Path) -> None:
    from benchmark.function_cli import parse
    from benchmark.run import bench

    with pytest.raises(SystemExit):
        parse(bench, "recbench bench", ["--trainer.max_epochs", "many"])
    with pytest.raises(SystemExit):
        parse(bench, "recbench bench", ["--trainer.no_such_option", "1"])


def test_unknown_model_name_is_one_line_listing_the_valid_names(tmp_path: Path) -> None:
    result = _recbench("bench", "--dataset", "synthetic_tiny", "--profile", "smoke", "--models", "sasrc", cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "'sasrc'" in lines[0] and "sasrec" in lines[0] and "popularity" in lines[0] and "tiger" in lines[0]


def test_short_names_work_inside_config_files(tmp_path: Path) -> None:
    config = tmp_path / "fit.yaml"
    config.write_text("model: sasrec\ndata: synthetic_tiny\ntrainer:\n  max_epochs: 3\n")
    result = _recbench("fit", "--config", str(config), "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: baselines.sasrec.SASRec" in result.stdout
    assert "class_path: datamodules.synthetic.SyntheticDataModule" in result.stdout
    assert "max_epochs: 3" in result.stdout


def test_comma_lists_dashed_options_and_a_bare_first_value_are_normalised() -> None:
    from benchmark.function_cli import normalise_argv
    from benchmark.leaderboard import compare
    from benchmark.run import bench

    assert normalise_argv(bench, ["--models", "a,b", "--seeds=1", "--results-dir", "r", "--trainer.max_epochs", "2"]) == [
        "--models", "[a,b]", "--seeds=[1]", "--results_dir", "r", "--trainer.max_epochs", "2"]
    assert normalise_argv(bench, ["--models", "[a, b]"]) == ["--models", "[a, b]"]
    assert normalise_argv(compare, ["sasrec_h128", "--dataset", "beauty"])[:2] == ["--run_or_config", "sasrec_h128"]
    # a bare boolean option is a switch; an explicit value stays
    assert normalise_argv(bench, ["--force", "--seeds", "1"]) == ["--force", "true", "--seeds", "[1]"]
    assert normalise_argv(bench, ["--seeds", "1", "--force"]) == ["--seeds", "[1]", "--force", "true"]
    assert normalise_argv(bench, ["--force", "false"]) == ["--force", "false"]
