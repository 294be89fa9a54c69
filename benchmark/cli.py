"""The ``recbench`` command.

- ``recbench fit|validate|test|predict``: LightningCLI over any model and datamodule. ``--model`` and
  ``--data`` take a config path or a short name from ``benchmark/configs/{model,data}/``
  (``--model sasrec --data beauty``). ``num_items`` and ``max_len`` are linked from the datamodule,
  never typed twice. The trainer defaults (early stopping and checkpointing on ``val/ndcg@10``) come
  from ``benchmark/configs/trainer/default.yaml``.
- ``recbench data stats|prepare DATASET``: dataset statistics and cache preparation.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from benchmark.errors import reports_errors
from benchmark.registry import CONFIG_DIR, resolve_config
from recbench.data import SeqRecDataModule
from recbench.model import SeqRecModel

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def expand_short_names(argv: Sequence[str]) -> list[str]:
    """Rewrite ``--model NAME`` / ``--data=NAME`` short names into config paths."""
    expanded: list[str] = []
    pending: str | None = None
    for arg in argv:
        if pending is not None:
            expanded.append(resolve_config(pending, arg))
            pending = None
            continue
        for kind in ("model", "data"):
            if arg == f"--{kind}":
                pending = kind
            elif arg.startswith(f"--{kind}="):
                arg = f"--{kind}={resolve_config(kind, arg.split('=', 1)[1])}"
        expanded.append(arg)
    return expanded


class RecBenchCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
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
    trainer_defaults = {"default_config_files": [str(CONFIG_DIR / "trainer" / "default.yaml")]}
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
            parser_kwargs={command: trainer_defaults for command in LIGHTNING_SUBCOMMANDS},
            save_config_kwargs={"overwrite": True},
        )


@reports_errors  # the project's errors as one message and an exit code; --debug shows tracebacks
def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "data":
        from benchmark.data_commands import main as data_main

        data_main(argv[1:])
        return
    if argv and argv[0] == "bench":
        from benchmark.run import main as bench_main

        bench_main(argv[1:])
        return
    if argv and argv[0] in ("leaderboard", "compare"):
        from benchmark import leaderboard

        (leaderboard.leaderboard_main if argv[0] == "leaderboard" else leaderboard.compare_main)(argv[1:])
        return
    lightning_main(argv)


if __name__ == "__main__":
    main()
