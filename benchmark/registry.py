"""Configs are the registry: a YAML's ``class_path`` names the class, ``init_args`` its arguments.

Short names resolve to ``benchmark/configs/<kind>/<name>.yaml``; any other value is a path.
Instantiation goes through jsonargparse, so unknown keys and wrong types are errors.

Name look-ups (:func:`resolve_config`, :func:`config_names`, :func:`require_config`) import neither
torch nor Lightning: ``recbench --help`` and ``recbench leaderboard`` use them and must start fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from recbench.data import SeqRecDataModule
    from recbench.model import SeqRecModel

CONFIG_DIR = Path(__file__).parent / "configs"


def resolve_config(kind: str, value: str) -> str:
    """A bare name (``sasrec``) becomes ``configs/<kind>/sasrec.yaml`` when that file exists."""
    candidate = CONFIG_DIR / kind / f"{value}.yaml"
    if "/" not in value and not value.endswith((".yaml", ".yml")) and candidate.exists():
        return str(candidate)
    return value


def config_names(kind: str) -> list[str]:
    return sorted(path.stem for path in (CONFIG_DIR / kind).glob("*.yaml"))


def _overrides(group: str, init_args: dict[str, object]) -> list[str]:
    # Non-strings as JSON (a subset of YAML, which jsonargparse parses), so types survive the command line.
    return [
        f"--{group}.init_args.{key}={value if isinstance(value, str) else json.dumps(value)}"
        for key, value in init_args.items()
    ]


class ConfigError(ValueError):
    """A config that cannot be resolved or instantiated; names the file and the reason."""


def require_config(kind: str, name_or_path: str) -> str:
    """The YAML path of a short name or path; :class:`ConfigError` (one line, listing the valid
    names) when there is none, so a typo fails before any data is read or model is built."""
    path = resolve_config(kind, name_or_path)
    if not Path(path).is_file():
        raise ConfigError(f"unknown {kind} {name_or_path!r}: expected a YAML path or one of {', '.join(config_names(kind))}")
    return path


def _instantiate(group: str, base: type, name_or_path: str, init_args: dict[str, object]) -> object:
    from jsonargparse import ArgumentError, ArgumentParser

    path = require_config(group, name_or_path)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, group, required=True)
    try:
        config = parser.parse_args(["--" + group, path, *_overrides(group, init_args)])
    except ArgumentError as error:  # unknown key, wrong type, unknown class
        raise ConfigError(f"{path}: {error}") from error
    return getattr(parser.instantiate(config), group)


def instantiate_data(name_or_path: str, **init_args: object) -> SeqRecDataModule:
    """Build a datamodule from a short name or YAML, with ``init_args`` overriding the file."""
    from recbench.data import SeqRecDataModule

    return _instantiate("data", SeqRecDataModule, name_or_path, init_args)  # type: ignore[return-value]


def instantiate_model(name_or_path: str, num_items: int, max_len: int, **init_args: object) -> SeqRecModel:
    """Build a model from a short name or YAML; ``num_items`` and ``max_len`` come from the data."""
    from recbench.model import SeqRecModel

    args = {"num_items": num_items, "max_len": max_len, **init_args}
    return _instantiate("model", SeqRecModel, name_or_path, args)  # type: ignore[return-value]
