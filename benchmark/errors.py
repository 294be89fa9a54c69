"""How the ``recbench`` command reports the project's own errors: one message, a non-zero exit code.

A user who names a file that is broken or missing, or a config that does not exist, needs the
located message, not the library frames that led to it. :func:`reports_errors` wraps the
entry point (``benchmark.cli.main``) and turns

- :class:`~recbench.data.DataFormatError` (file, line, reason) and
  :class:`~recbench.data.MissingDataError` (which files, where, where from) into exit code
  :data:`EXIT_DATA` (1),
- :class:`~benchmark.registry.ConfigError` (an unknown config name, with the valid names, or a
  config that does not instantiate) into :data:`EXIT_CONFIG` (2, argparse's code for a usage
  error). Commands check every config name through :func:`benchmark.registry.require_config`
  before they read data or build a model, so an unknown name always arrives as this error.

Each is printed as ``recbench: error: <message>`` on stderr. Every other exception is a bug and
keeps its traceback. ``--debug`` (anywhere on the command line; removed before the command sees
its arguments) or ``RECBENCH_DEBUG=1`` lets the project's errors through with their tracebacks too.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence

from benchmark.registry import ConfigError

EXIT_DATA = 1
EXIT_CONFIG = 2
DEBUG_FLAG = "--debug"
DEBUG_ENV = "RECBENCH_DEBUG"
Main = Callable[[Sequence[str] | None], None]


def debug_requested(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _data_errors() -> tuple[type[Exception], ...]:
    """DataFormatError and MissingDataError, looked up only once recbench.data is loaded: importing
    it costs seconds (torch, Lightning) that `recbench --help` must not pay, and an exception of
    these types cannot exist before the module that defines them is imported."""
    data = sys.modules.get("recbench.data")
    return (data.DataFormatError, data.MissingDataError) if data is not None else ()


def _fail(message: str, code: int) -> None:
    print(f"recbench: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def reports_errors(main: Main) -> Main:
    """Wrap the entry point as described in the module docstring."""

    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None) -> None:
        args = list(sys.argv[1:] if argv is None else argv)
        debug = debug_requested(args)
        args = [arg for arg in args if arg != DEBUG_FLAG]
        if debug:
            main(args)
            return
        try:
            main(args)
        except Exception as error:
            if isinstance(error, _data_errors()):
                _fail(str(error), EXIT_DATA)
            if isinstance(error, ConfigError):
                _fail(str(error), EXIT_CONFIG)
            raise

    return wrapper
