"""``recbench fit|validate|test|predict``: LightningCLI over any model and datamodule.

``--model`` and ``--data`` take a config path or a short name from
``benchmark/configs/{model,data}/`` (``--model sasrec --data beauty``), on the command line and in
``--config`` files alike (``model: sasrec``). ``num_items`` and ``max_len`` are linked from the
datamodule, never typed twice. The trainer defaults (early stopping and checkpointing on
``val/ndcg@10``, a CSV logger) come from ``benchmark/configs/trainer/default.yaml``; any Lightning
logger is one flag away (``--trainer.logger lightning.pytorch.loggers.TensorBoardLogger
--trainer.logger.save_dir runs``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import yaml
from jsonargparse import get_loader, set_loader
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from benchmark.registry import CONFIG_DIR, resolve_config
from recbench.data import SeqRecDataModule
from recbench.model import SeqRecModel

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
PARSER_MODE = "recbench"
_yaml_load = get_loader("yaml")


def _resolve_short_names(config: dict[str, object]) -> None:
    for kind in ("model", "data"):
        value = config.get(kind)
        if isinstance(value, str):
            config[kind] = resolve_config(kind, value)


def load_with_short_names(text: str) -> object:
    """jsonargparse's YAML loader, plus: a ``model:``/``data:`` short name in a config file (at the
    top, or under a subcommand key) becomes the path of its YAML, as on the command line.

    jsonargparse resolves a subclass value given as a string as a class name or a file path only;
    a loader is the one place that sees a config file's keys before that happens.
    """
    value = _yaml_load(text)
    if isinstance(value, dict):
        _resolve_short_names(value)
        for subcommand in LIGHTNING_SUBCOMMANDS:
            if isinstance(value.get(subcommand), dict):
                _resolve_short_names(value[subcommand])
    return value


set_loader(PARSER_MODE, load_with_short_names, (yaml.YAMLError,))


class RecBenchCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_items", "model.init_args.num_items", apply_on="instantiate")
        parser.link_arguments("data.max_len", "model.init_args.max_len", apply_on="instantiate")

    def after_fit(self) -> None:
        checkpoint = self.trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "")
        if best:
            if self.trainer.is_global_zero:
                print(f"best checkpoint ({checkpoint.monitor}={float(checkpoint.best_model_score):.5f}): {best}")
            return
        # Lightning checkpoints only after optimiser steps; a counting model (popularity) never
        # steps, so save its fitted state explicitly for `recbench test`.
        directory = Path(checkpoint.dirpath) if checkpoint is not None and checkpoint.dirpath else Path(self.trainer.log_dir or ".")
        final = directory / "final.ckpt"
        self.trainer.save_checkpoint(final)
        if self.trainer.is_global_zero:
            print(f"no optimiser step was taken; fitted state saved to {final}")


def lightning_main(argv: Sequence[str]) -> None:
    from benchmark.cli import expand_short_names

    subcommand_kwargs = {
        "default_config_files": [str(CONFIG_DIR / "trainer" / "default.yaml")],
        "parser_mode": PARSER_MODE,
    }
    with warnings.catch_warnings():
        # We pass the rewritten argv on purpose; Lightning warns when sys.argv is also non-empty.
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        RecBenchCLI(
            SeqRecModel,
            SeqRecDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            args=expand_short_names(argv),
            parser_kwargs={
                "parser_mode": PARSER_MODE,
                **{command: subcommand_kwargs for command in LIGHTNING_SUBCOMMANDS},
            },
            save_config_kwargs={"overwrite": True},
        )
