"""The ``recbench`` command: one dispatcher, one convention (jsonargparse) for every subcommand.

- ``fit|validate|test|predict``: LightningCLI (:mod:`benchmark.lightning_cli`);
- ``bench|compare|leaderboard|bands``: command lines built from the typed functions
  :func:`benchmark.run.bench`, :func:`benchmark.leaderboard.compare`,
  :func:`benchmark.leaderboard.leaderboard` and :func:`benchmark.bands.popularity_bands`
  (:mod:`benchmark.function_cli`);
- ``data``: dataset statistics, preparation, semantic IDs and checksum verification.

Every subcommand's module is imported only when it runs: ``recbench --help`` imports neither torch
nor Lightning (several seconds), and ``recbench leaderboard`` needs neither.
:func:`main` is :func:`dispatch` wrapped by :func:`benchmark.errors.reports_errors`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from benchmark.errors import reports_errors
from benchmark.registry import resolve_config


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one line of help, and what runs it with the remaining arguments."""

    name: str
    summary: str
    run: Callable[[list[str]], None]


def _lightning(subcommand: str) -> Callable[[list[str]], None]:
    def run(argv: list[str]) -> None:
        from benchmark.lightning_cli import lightning_main

        lightning_main([subcommand, *argv])

    return run


def _bench(argv: list[str]) -> None:
    from benchmark.function_cli import bench_command

    bench_command(argv)


def _compare(argv: list[str]) -> None:
    from benchmark.function_cli import compare_command

    compare_command(argv)


def _leaderboard(argv: list[str]) -> None:
    from benchmark.function_cli import leaderboard_command

    leaderboard_command(argv)


def _bands(argv: list[str]) -> None:
    from benchmark.function_cli import bands_command

    bands_command(argv)


def _data(argv: list[str]) -> None:
    if argv and argv[0] == "verify":
        from benchmark.data_verify import main as verify_main

        verify_main(argv[1:])
        return
    from benchmark.data_commands import main as data_main

    data_main(argv)


COMMANDS: tuple[Command, ...] = (
    Command("fit", "train a model on a dataset (LightningCLI; early stopping on val/ndcg@10)", _lightning("fit")),
    Command("validate", "evaluate a checkpoint on the validation cases (LightningCLI)", _lightning("validate")),
    Command("test", "evaluate a checkpoint on the test cases (LightningCLI)", _lightning("test")),
    Command("predict", "top-k recommendations from a checkpoint (LightningCLI)", _lightning("predict")),
    Command("bench", "fit and test model configs x seeds under a profile; one stored row per run", _bench),
    Command("compare", "train or load a run and rank it against stored rows, with paired tests", _compare),
    Command("leaderboard", "render stored rows as mean ± std per model (Markdown and plots)", _leaderboard),
    Command("bands", "stored runs' test scores by the training popularity of the target", _bands),
    Command("data", "dataset statistics, cache preparation, semantic IDs, checksum verification", _data),
)
COMMAND_NAMES = tuple(command.name for command in COMMANDS)


def usage() -> str:
    width = max(len(name) for name in COMMAND_NAMES)
    lines = [
        "usage: recbench COMMAND [options]   (recbench COMMAND --help for a command's options)",
        "",
        "A benchmark suite for sequential and generative recommendation on PyTorch Lightning.",
        "Every command but data takes --config FILE and --print_config, as LightningCLI does.",
        "",
        "commands:",
        *(f"  {command.name:<{width}}  {command.summary}" for command in COMMANDS),
    ]
    return "\n".join(lines)


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


def dispatch(argv: Sequence[str]) -> None:
    """Run the subcommand ``argv[0]`` with the rest of ``argv``."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        if not argv:
            raise SystemExit(2)
        return
    command = next((command for command in COMMANDS if command.name == argv[0]), None)
    if command is None:
        raise SystemExit(f"recbench: unknown command {argv[0]!r}; expected one of {', '.join(COMMAND_NAMES)}")
    command.run(argv[1:])


@reports_errors  # the project's errors as one message and an exit code; --debug shows tracebacks
def main(argv: Sequence[str] | None = None) -> None:
    dispatch(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
