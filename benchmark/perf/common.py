"""Shared pieces of the perf scripts: environment facts and atomic report writing."""

from __future__ import annotations

import json
import platform
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
