"""Shared pieces of the perf scripts: environment facts and atomic report writing."""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmark.run import atomic_write_text, device_name, git_commit


def environment() -> dict[str, object]:
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_report(out_dir: Path, name: str, payload: dict[str, object], markdown: str) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` atomically; returns both paths."""
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    atomic_write_text(json_path, json.dumps(payload, indent=2, default=str))
    atomic_write_text(md_path, markdown)
    return json_path, md_path


def checkpoint_parser(doc: str | None, report: str) -> argparse.ArgumentParser:
    """Options of a script that measures ONE trained checkpoint on a dataset's validation subset:
    ``--checkpoint``, ``--dataset``, ``--profile``, ``--out-dir``, ``--name``."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--profile", default="quick", help="whose validation subset to use")
    parser.add_argument("--out-dir", type=Path, default=Path("results/perf/recipe_checks"))
    parser.add_argument("--name", default=None, help=f"report name (default: {report}_<dataset>)")
    return parser


def parse_checkpoint_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, and refuse a checkpoint path that is not a file before anything loads."""
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"no checkpoint at {args.checkpoint}")
    return args
