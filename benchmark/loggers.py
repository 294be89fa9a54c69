"""The benchmark's logger: whatever the config names, built once per run.

``recbench bench`` takes ``--trainer.logger`` from the Trainer's own signature, so any Lightning
logger is one flag away::

    recbench bench --trainer.logger lightning.pytorch.loggers.TensorBoardLogger   # needs `tensorboard`
    recbench bench --trainer.logger lightning.pytorch.loggers.WandbLogger --trainer.logger.project P

Decisions:

- A bench is many runs (models x seeds). One logger object shared by all of them would put every
  run into one log directory, so the command line yields a :class:`LoggerSpec` (class path and
  arguments, not an object) and the runner builds a fresh logger per run with :meth:`LoggerSpec.build`.
- Each run's logger gets ``name=<run id>`` where the class takes a ``name`` (CSV, TensorBoard: the
  sub-directory; W&B: the run's display name), so file loggers write to
  ``<save_dir>/<run id>/version_<n>/`` and a resumed run starts the next version beside the first.
- The default is CSV under ``runs/bench`` (the default work directory); a logger given by class path
  alone keeps that ``save_dir`` (jsonargparse carries compatible arguments over when the class
  changes), so ``--trainer.logger ...TensorBoardLogger`` needs no second flag.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"
DEFAULT_SAVE_DIR = Path("runs/bench")


@dataclass(frozen=True)
class LoggerSpec:
    """A logger as a config names it: ``class_path`` and ``init_args``.

    Args:
        class_path: import path of a ``lightning.pytorch.loggers.Logger`` subclass.
        init_args: its constructor arguments, except ``name``, which :meth:`build` sets per run.
    """

    class_path: str
    init_args: Mapping[str, object] = field(default_factory=dict)

    @classmethod
    def csv(cls, save_dir: Path = DEFAULT_SAVE_DIR) -> LoggerSpec:
        """The default: Lightning's CSV logger under ``save_dir``."""
        return cls(CSV_LOGGER, {"save_dir": str(save_dir)})

    def under(self, work_dir: Path) -> LoggerSpec:
        """This spec with a ``save_dir`` left at the default moved to ``work_dir`` (the bench's
        ``--work_dir``), so one flag moves checkpoints and logs together."""
        if Path(str(self.init_args.get("save_dir", ""))) != DEFAULT_SAVE_DIR:
            return self
        return LoggerSpec(self.class_path, {**self.init_args, "save_dir": str(work_dir)})

    def as_config(self) -> dict[str, object]:
        """The ``class_path``/``init_args`` form jsonargparse reads (for a parser default)."""
        return {"class_path": self.class_path, "init_args": dict(self.init_args)}

    def build(self, run_name: str) -> Logger:
        """A new logger for one run, validated and instantiated through jsonargparse, so unknown
        arguments and wrong types are errors here just as on the command line."""
        from jsonargparse import ArgumentParser
        from lightning.pytorch.loggers import Logger

        parser = ArgumentParser(exit_on_error=False)
        parser.add_subclass_arguments(Logger, "logger", required=True)
        init_args = dict(self.init_args)
        config = parser.parse_object({"logger": {"class_path": self.class_path, "init_args": init_args}})
        if "name" in inspect.signature(_class_of(config.logger.class_path)).parameters:
            config.logger.init_args.name = run_name
        return parser.instantiate_classes(config).logger


def _class_of(class_path: str) -> type:
    import importlib

    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)
