"""``recbench data verify DATASET``: check a copy of the data against the SHA-256 manifest.

``benchmark/data_manifest.sha256`` lists every file the tests and the stored leaderboard were run
with, as ``sha256sum`` writes it (paths relative to ``RECBENCH_DATA_DIR``), so
``cd $RECBENCH_DATA_DIR && sha256sum -c <manifest>`` checks the same thing without recbench.
``DATASET`` is a data config name (``beauty``, ``steam``, ...), a folder of the data directory
(``amazon``), or ``all``. Files that the manifest does not list (the official raw downloads, say) are
not checked. Every mismatch is reported with the file, the expected and the actual checksum; any
mismatch or missing file exits non-zero.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from benchmark.registry import ConfigError

MANIFEST = Path(__file__).with_name("data_manifest.sha256")
# The folder of each data config's files under RECBENCH_DATA_DIR (benchmark/configs/data/*.yaml).
DATASET_FOLDERS = {
    "beauty": "amazon/beauty",
    "sports": "amazon/sports",
    "toys": "amazon/toys",
    "steam": "steam",
    "yoochoose": "yoochoose",
}


@dataclass(frozen=True)
class FileCheck:
    """One manifest entry checked against the data directory; ``actual`` is None for a missing file."""

    path: str
    expected: str
    actual: str | None

    @property
    def ok(self) -> bool:
        return self.actual == self.expected

    def describe(self, data_dir: Path) -> str:
        where = data_dir / self.path
        if self.actual is None:
            return f"{where}: missing (expected SHA-256 {self.expected})"
        if not self.ok:
            return f"{where}: SHA-256 mismatch: expected {self.expected}, found {self.actual}"
        return f"{where}: ok"


def default_data_dir() -> Path:
    """``recbench.data.data_root()``, restated so that checksumming does not import torch and
    Lightning (seconds, for a check that takes a fraction of one); a test keeps the two equal."""
    return Path(os.environ.get("RECBENCH_DATA_DIR", "data"))


def read_manifest(path: Path = MANIFEST) -> dict[str, str]:
    """``relative path -> sha256`` from a ``sha256sum``-format file (``#`` lines are comments)."""
    entries: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, separator, name = line.partition("  ")
        if not separator or len(digest) != 64:
            raise ValueError(f"{path}:{number}: expected '<sha256>  <path>', got {line!r}")
        entries[name] = digest
    return entries


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def select(manifest: dict[str, str], dataset: str) -> dict[str, str]:
    """The manifest entries of one dataset (config name, folder, or ``all``)."""
    if dataset == "all":
        return dict(manifest)
    folder = DATASET_FOLDERS.get(dataset, dataset).strip("/")
    chosen = {name: digest for name, digest in manifest.items() if name.startswith(folder + "/")}
    if not chosen:
        folders = sorted({name.split("/")[0] for name in manifest} - set(DATASET_FOLDERS))
        names = ", ".join(["all", *DATASET_FOLDERS, *folders])
        raise ConfigError(f"no manifest entries for {dataset!r}: expected one of {names}")
    return chosen


def check(dataset: str, data_dir: Path, manifest: Path = MANIFEST) -> list[FileCheck]:
    """Hash every manifest file of ``dataset`` under ``data_dir``."""
    results = []
    for name, expected in sorted(select(read_manifest(manifest), dataset).items()):
        path = data_dir / name
        results.append(FileCheck(name, expected, sha256(path) if path.is_file() else None))
    return results


def verify(dataset: str, data_dir: Path | None = None, manifest: Path = MANIFEST) -> None:
    """Check a copy of the data against the SHA-256 manifest the tests were run with.

    Args:
        dataset: a data config name (beauty, sports, toys, steam, yoochoose), a folder of the data
            directory (amazon), or all.
        data_dir: the data directory (default: $RECBENCH_DATA_DIR, else ./data).
        manifest: a sha256sum-format file (default: the one shipped with recbench).
    """
    if data_dir is None:
        data_dir = default_data_dir()
    results = check(dataset, data_dir, manifest)
    failed = [result for result in results if not result.ok]
    for result in results:
        print(result.describe(data_dir))
    if failed:
        raise SystemExit(f"recbench data verify: {len(failed)} of {len(results)} files differ from {manifest}")
    print(f"{dataset}: all {len(results)} files match {manifest.name}")


def main(argv: list[str]) -> None:
    from benchmark.function_cli import parse

    _, config = parse(verify, "recbench data verify", argv)
    verify(config["dataset"], config["data_dir"], config["manifest"])
