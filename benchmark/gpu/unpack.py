"""Install the recompressed wheels of ``.whl/`` into a site folder (standard library only).

``python3 -m benchmark.gpu.unpack WHEELS_DIR SITE_DIR``

Why: polars' compiled runtime wheel is 54 MB as a zip, which with the other wheels and the carried
caches would not fit the 64 MiB that travels to a GPU machine. :mod:`benchmark.gpu.prepare` stores
its unpacked files (the layout ``pip install --target`` produces: the package plus its
``.dist-info``) as ``<name>-<version>.site.tar.xz``, 31 MB. This module extracts every such archive
into ``SITE_DIR`` and checks each extracted file against the SHA-256 in the wheel's own ``RECORD``,
so what is imported is exactly what PyPI published. It runs before any wheel is installed, so it
imports nothing outside the standard library.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import sys
import tarfile
from pathlib import Path

SITE_ARCHIVE_SUFFIX = ".site.tar.xz"


class UnpackError(RuntimeError):
    """An archive that is damaged or does not match its wheel's RECORD."""


def _record_digest(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def verify_record(site: Path, dist_info: str) -> int:
    """Check every file listed in ``<site>/<dist_info>/RECORD``; returns how many were checked."""
    record = site / dist_info / "RECORD"
    if not record.is_file():
        raise UnpackError(f"{record}: missing")
    checked = 0
    with open(record, newline="") as handle:
        for line, row in enumerate(csv.reader(handle), 1):
            if not row or not row[1]:
                continue  # RECORD lists itself without a hash
            name, expected = row[0], row[1]
            path = site / name
            if not path.is_file():
                raise UnpackError(f"{record}:{line}: {name} is missing after extraction")
            if _record_digest(path) != expected:
                raise UnpackError(f"{record}:{line}: {name} does not match its SHA-256")
            checked += 1
    return checked


def unpack(wheels: Path, site: Path) -> list[str]:
    """Extract and verify every ``*.site.tar.xz`` of ``wheels`` into ``site``; returns their names."""
    site.mkdir(parents=True, exist_ok=True)
    done = []
    for archive in sorted(wheels.glob(f"*{SITE_ARCHIVE_SUFFIX}")):
        with tarfile.open(archive, "r:xz") as tar:
            members = tar.getmembers()
            for member in members:
                if member.name.startswith("/") or ".." in Path(member.name).parts or not (member.isfile() or member.isdir()):
                    raise UnpackError(f"{archive}: unsafe member {member.name!r}")
            tar.extractall(site, members=members, filter="data")  # members checked above as well
        infos = {Path(m.name).parts[0] for m in members if Path(m.name).parts[0].endswith(".dist-info")}
        if len(infos) != 1:
            raise UnpackError(f"{archive}: expected one .dist-info folder, found {sorted(infos)}")
        count = verify_record(site, infos.pop())
        done.append(f"{archive.name} ({count} files verified)")
    return done


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python3 -m benchmark.gpu.unpack WHEELS_DIR SITE_DIR", file=sys.stderr)
        return 2
    try:
        for line in unpack(Path(argv[0]), Path(argv[1])):
            print(f"unpacked {line}")
    except (UnpackError, OSError, tarfile.TarError) as error:
        print(f"benchmark.gpu.unpack: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
