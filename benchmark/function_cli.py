"""``recbench bench|compare|leaderboard|bands``: a jsonargparse command line built from a typed function.

The four commands are the functions :func:`benchmark.run.bench`,
:func:`benchmark.leaderboard.compare`, :func:`benchmark.leaderboard.leaderboard` and
:func:`benchmark.bands.popularity_bands`; their
signatures and docstrings *are* the command line (``parser.add_function_arguments``), so a parameter
added to one of them appears as an option, in ``--help`` and in ``--print_config`` without a change
here. Every command gets the LightningCLI conventions: ``--config FILE`` (YAML; repeatable, later
values win), ``--print_config``, typed values, unknown keys are errors.

Decisions:

- A function that takes ``trainer_overrides`` gets ``--trainer.*`` typed from ``Trainer.__init__``
  (so ``--trainer.logger`` takes a ``class_path``). Only values that differ from the Trainer's own
  defaults are passed on: the profile sets ``max_epochs``, precision and so on, and a default
  printed by ``--print_config`` and fed back must not override it. ``callbacks`` is left out: the
  runner's callbacks (checkpoint and early stopping on ``val/ndcg@10``, the safety time limit) define what a
  row means. The logger is always passed on, as a :class:`~benchmark.loggers.LoggerSpec` built once
  per run; the default is CSV (see :mod:`benchmark.loggers`).
- A bare boolean option is a switch: ``--force`` means ``--force true``.
- Researchers type lists with commas: for a list-typed parameter, ``--models popularity,sasrec``
  means ``--models [popularity,sasrec]`` (and ``--seeds 1`` means ``[1]``).
- ``--results-dir`` is ``--results_dir``: the argparse spelling of the earlier command line (and of
  most tools) keeps working for the function's own parameters.
- The first parameter, when it has no default, may be given bare: ``recbench compare sasrec_h128
  --dataset beauty`` is ``--run_or_config sasrec_h128``.
- ``recbench bench`` writes the resolved config of every run it completes, narrowed to that run's
  model and seed, to ``<results_dir>/runs/<run_id>/config.yaml``;
  ``recbench bench --config <that file>`` runs the same (dataset, model, seed, profile, trainer and
  data options) again. Finished runs are skipped, as always: add ``--force``, or point
  ``--results_dir``/``--work_dir`` elsewhere, to recompute the row.
- Short names are checked before any work: ``--models sasrc`` stops at once with one line that lists
  the valid names (:func:`benchmark.registry.require_config`).
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from benchmark.registry import ConfigError, require_config

if TYPE_CHECKING:
    from benchmark.loggers import LoggerSpec

TRAINER_PARAMETER = "trainer_overrides"
# Owned by the runner: its callbacks decide checkpoint selection and when a fit ends.
TRAINER_SKIP = {"callbacks"}
CONFIG_FILE_NAME = "config.yaml"


def _list_typed(annotation: object) -> bool:
    """``Sequence[...]``/``list[...]``, alone or in a union with None."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_list_typed(arg) for arg in typing.get_args(annotation) if arg is not type(None))
    return origin in (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence)


def normalise_argv(function: Callable[..., object], argv: Sequence[str]) -> list[str]:
    """Comma-separated lists to YAML lists, ``--a-b`` to ``--a_b`` and a bare leading value to the
    first parameter."""
    signature = inspect.signature(function)
    hints = typing.get_type_hints(function)
    list_options = {f"--{name}" for name in signature.parameters if _list_typed(hints.get(name))}
    flag_options = {f"--{name}" for name in signature.parameters if hints.get(name) is bool}
    out = []
    for arg in argv:
        option, equals, value = arg.partition("=")
        underscored = option.replace("-", "_")
        if option.startswith("--") and "-" in option[2:] and underscored[2:] in signature.parameters:
            arg = f"--{underscored[2:]}{equals}{value}"
        out.append(arg)
    first = next(iter(signature.parameters.values()), None)
    if out and not out[0].startswith("-") and first is not None and first.default is inspect.Parameter.empty:
        out[:1] = [f"--{first.name}", out[0]]

    def as_list(value: str) -> str:
        return value if value.lstrip().startswith("[") else f"[{value}]"

    index = 0
    while index < len(out):
        option, equals, value = out[index].partition("=")
        if option in flag_options and not equals:
            # A bare boolean option is a switch (`--force`), as in argparse and the earlier command line.
            following = out[index + 1] if index + 1 < len(out) else None
            if following is None or following.lower() not in ("true", "false"):
                out.insert(index + 1, "true")
            index += 2
            continue
        if option in list_options:
            if equals:
                out[index] = f"{option}={as_list(value)}"
            elif index + 1 < len(out):
                out[index + 1] = as_list(out[index + 1])
                index += 1
        index += 1
    return out


def _description(function: Callable[..., object]) -> str:
    return inspect.getdoc(function).split("\n\n")[0] if function.__doc__ else ""  # type: ignore[union-attr]


def build_parser(function: Callable[..., object], prog: str) -> ArgumentParser:
    """The command line of ``function``, with ``--config``, ``--print_config`` and, where it takes
    ``trainer_overrides``, the typed ``--trainer.*`` group."""
    parser = ArgumentParser(prog=prog, description=_description(function), exit_on_error=True)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML config (as --print_config writes it)")
    takes_trainer = TRAINER_PARAMETER in inspect.signature(function).parameters
    parser.add_function_arguments(function, skip={TRAINER_PARAMETER} if takes_trainer else None)
    if takes_trainer:
        from lightning.pytorch import Trainer

        from benchmark.loggers import LoggerSpec

        parser.add_class_arguments(
            Trainer, "trainer", fail_untyped=False, instantiate=False, sub_configs=True, skip=TRAINER_SKIP
        )
        parser.set_defaults({"trainer.logger": LoggerSpec.csv().as_config()})
    return parser


def _logger_spec(value: object) -> LoggerSpec | bool:
    from benchmark.loggers import LoggerSpec

    if value is None or value is True:
        return LoggerSpec.csv()
    if value is False:
        return False
    if isinstance(value, Namespace) and "class_path" in value:
        init_args = value.get("init_args")
        return LoggerSpec(value.class_path, init_args.as_dict() if isinstance(init_args, Namespace) else {})
    raise ConfigError(f"--trainer.logger: one logger per bench (a class_path, or false for none), got {value!r}")


def trainer_overrides(parser: ArgumentParser, config: Namespace) -> dict[str, object]:
    """The ``--trainer.*`` values that differ from the Trainer's defaults, instantiated, plus the
    logger as a :class:`~benchmark.loggers.LoggerSpec`."""
    defaults = parser.get_defaults()["trainer"]
    given = config["trainer"]
    changed = [key for key in given.keys() if "." not in key and key != "logger" and given[key] != defaults[key]]
    without_logger = config.clone()
    without_logger["trainer.logger"] = None
    instantiated = parser.instantiate(without_logger)["trainer"]
    overrides: dict[str, object] = {key: instantiated[key] for key in changed}
    overrides["logger"] = _logger_spec(given["logger"])
    return overrides


def function_arguments(function: Callable[..., object], parser: ArgumentParser, config: Namespace) -> dict[str, object]:
    """The keyword arguments of ``function`` from a parsed config."""
    arguments: dict[str, object] = {}
    for name in inspect.signature(function).parameters:
        if name == TRAINER_PARAMETER:
            arguments[name] = trainer_overrides(parser, config)
        elif name in config:
            value = config[name]
            arguments[name] = value.as_dict() if isinstance(value, Namespace) else value
    return arguments


def parse(function: Callable[..., object], prog: str, argv: Sequence[str]) -> tuple[ArgumentParser, Namespace]:
    parser = build_parser(function, prog)
    return parser, parser.parse_args(normalise_argv(function, argv))


def _check_names(config: Namespace, models: bool) -> None:
    """Short names resolve before any data is read (:class:`ConfigError`, which
    :func:`benchmark.errors.reports_errors` prints as one line, otherwise)."""
    for model in (config.get("models") or []) if models else []:
        require_config("model", model)
    require_config("data", config["dataset"])
    require_config("profile", config["profile"])


# ---------------------------------------------------------------------- the commands
def bench_command(argv: Sequence[str]) -> None:
    from benchmark.run import bench

    parser, config = parse(bench, "recbench bench", argv)
    _check_names(config, models=True)  # ConfigError: one line from benchmark.errors
    rows = bench(**function_arguments(bench, parser, config))  # type: ignore[arg-type]
    for row in rows:
        save_run_config(parser, config, row)


def save_run_config(parser: ArgumentParser, config: Namespace, row: dict[str, object]) -> Path:
    """``<results_dir>/runs/<run_id>/config.yaml``: the bench config narrowed to one run."""
    from benchmark.store import atomic_write_text, resolve_results_dir

    one_run = config.clone()
    one_run["models"] = [str(row["config"])]
    one_run["seeds"] = [int(str(row["seed"]))]
    if "config" in one_run:
        del one_run["config"]  # the files it came from are already merged into the values
    path = resolve_results_dir(config["results_dir"]) / "runs" / str(row["run_id"]) / CONFIG_FILE_NAME
    atomic_write_text(path, parser.dump(one_run))
    return path


def compare_command(argv: Sequence[str]) -> None:
    from benchmark.leaderboard import compare

    parser, config = parse(compare, "recbench compare", argv)
    _check_names(config, models=False)
    compare(**function_arguments(compare, parser, config))  # type: ignore[arg-type]


def bands_command(argv: Sequence[str]) -> None:
    from benchmark.bands import popularity_bands

    parser, config = parse(popularity_bands, "recbench bands", argv)
    _check_names(config, models=False)
    popularity_bands(**function_arguments(popularity_bands, parser, config))  # type: ignore[arg-type]


def leaderboard_command(argv: Sequence[str]) -> None:
    from benchmark.leaderboard import leaderboard

    parser, config = parse(leaderboard, "recbench leaderboard", argv)
    leaderboard(**function_arguments(leaderboard, parser, config))  # type: ignore[arg-type]
