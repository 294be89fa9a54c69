"""The carried folder (``.carry/``): what a GPU machine needs that it cannot build, and how it is read.

Layout (written by :mod:`benchmark.gpu.prepare`, read by :mod:`benchmark.gpu.bench`)::

    .carry/manifest.json                       what is carried, for which runs, the commit, the code digest
    .carry/cache/<name>-<key>/                 a prepared data cache, byte for byte (meta.json + parquet)
    .carry/item_side/<name>-<fingerprint>/     item embeddings and semantic IDs:
        item_emb_<key>.pt.json, sid_<key>.pt.json   the sidecars, byte for byte
        item_emb_<key>.pt.xz, sid_<key>.pt.xz       the tensors, packed (below)

Decisions:

- **Data caches without raw files.** A prepared cache is found by a key that hashes the raw files'
  contents, so :meth:`recbench.data.SeqRecDataModule.cache_path` reads the raw files even when a valid
  cache exists (and the Amazon, Steam and YooChoose ``auto`` formats name their signature after the
  files present). The raw data does not travel, so :func:`carried_caches` gives ``cache_path`` one
  more rule for the duration of a GPU bench: a datamodule whose raw files are absent gets the carried
  cache recorded for its class and name, and one with no carried cache stops with
  :class:`CarryError` naming what to do. The identity of the data is checked separately: the data
  config's text and the cache's fingerprint must equal what ``make gpu-prepare`` recorded
  (:func:`check_dataset`). A hook in ``recbench.data`` (a source manifest stored in ``meta.json``)
  would make this patch unnecessary; until then it is confined to this package.
- **Embeddings packed losslessly.** The semantic-ID cache key hashes the embedding table's bytes, so
  carried embeddings must be bit-identical: no float16. A float32 table is stored as its four byte
  planes (all sign/exponent bytes, then the next byte of every value, ...) compressed with xz, which
  takes Beauty's 18.6 MB MiniLM table to about 15.6 MB; the SHA-256 of every tensor is recorded and
  checked when the file is rebuilt on the GPU machine.
- **The commit.** The copied tree has no ``.git``: the manifest records the commit (``git_commit()``
  when the carry was built) and the SHA-256 of every tracked code file; the GPU side recomputes them
  and appends ``-dirty`` when any differs, as :func:`benchmark.run.git_commit` does for a checkout.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import lzma
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recbench.data import SeqRecDataModule, verify_cache
from recbench.text import atomic_write_bytes

CARRY_FORMAT = 1
MANIFEST = "manifest.json"
#: Tracked paths whose content decides what a row means (code and configs; never results/).
CODE_PATHS = ("recbench", "datamodules", "baselines", "benchmark", "pyproject.toml")
PACKED_SUFFIX = ".xz"


class CarryError(RuntimeError):
    """The carried folder is missing, damaged or does not fit the tree it travelled with."""


# ---------------------------------------------------------------------- small helpers
def atomic_write_json(path: Path, value: object) -> None:
    atomic_write_bytes(Path(path), (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def folder_bytes(path: Path) -> int:
    """Bytes of every regular file under ``path`` (``du -cb`` of the files, as the transfer counts)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def class_path(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def load_manifest(carry_dir: Path) -> dict[str, Any]:
    path = Path(carry_dir) / MANIFEST
    if not path.is_file():
        raise CarryError(f"{path}: no carried folder here; run `make gpu-prepare` on the CPU first and carry `.carry`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:
        raise CarryError(f"{path}: unreadable ({error}); run `make gpu-prepare` again") from error
    if manifest.get("format") != CARRY_FORMAT:
        raise CarryError(f"{path}: carry format {manifest.get('format')!r}, this code reads {CARRY_FORMAT}; "
                         "run `make gpu-prepare` again")
    return manifest


# ---------------------------------------------------------------------- the commit
def code_digests(root: Path, files: list[str]) -> dict[str, str]:
    """SHA-256 of each file (relative to ``root``); a missing file maps to ``"missing"``."""
    return {name: file_digest(root / name) if (root / name).is_file() else "missing" for name in files}


def device_commit(manifest: dict[str, Any], root: Path) -> tuple[str, list[str]]:
    """The commit the GPU rows record, and the code files that differ from the prepared tree.

    The manifest's commit, with ``-dirty`` appended when any recorded code file changed after
    ``make gpu-prepare`` (the rows then come from code no commit holds, and say so)."""
    recorded: dict[str, str] = manifest["code"]["files"]
    now = code_digests(root, sorted(recorded))
    changed = sorted(name for name, digest in recorded.items() if now[name] != digest)
    commit = str(manifest["commit"])
    if changed and not commit.endswith("-dirty"):
        commit += "-dirty"
    return commit, changed


# ---------------------------------------------------------------------- lossless tensor packing
def _bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's bytes in memory order (0-dim tensors too, which ``Tensor.view(uint8)`` refuses)."""
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    digest = hashlib.sha256(f"{tensor.dtype}:{tuple(tensor.shape)}:".encode())
    digest.update(_bytes(tensor.detach().cpu().contiguous()))
    return digest.hexdigest()


def pack_tensors(source: Path, target: Path) -> list[dict[str, Any]]:
    """Write the tensors of ``source`` (a ``torch.save`` dict of tensors) to ``target`` as byte planes
    compressed with xz; returns the header :func:`unpack_tensors` needs (names, dtypes, shapes,
    SHA-256 of each tensor)."""
    tensors = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CarryError(f"{source}: expected a dict of tensors")
    header, blobs = [], []
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous()
        raw = np.frombuffer(_bytes(tensor), np.uint8)
        width = tensor.element_size()
        # Byte planes: the high bytes of floats (sign, exponent) and of small integers repeat, and
        # xz finds that only when equal bytes are adjacent.
        blobs.append(raw.reshape(-1, width).T.tobytes())
        header.append({"name": name, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
                       "sha256": tensor_digest(tensor)})
    atomic_write_bytes(target, lzma.compress(b"".join(blobs), preset=9))
    return header


def unpack_tensors(packed: Path, header: list[dict[str, Any]], target: Path) -> None:
    """Rebuild the ``torch.save`` file ``target`` from :func:`pack_tensors`' output; every tensor's
    SHA-256 is checked, so a damaged carry fails here, not as a semantic-ID cache miss later."""
    data = lzma.decompress(Path(packed).read_bytes())
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for entry in header:
        dtype = getattr(torch, entry["dtype"])
        shape = tuple(entry["shape"])
        width = torch.empty(0, dtype=dtype).element_size()
        size = int(np.prod(shape, dtype=np.int64)) * width
        planes = np.frombuffer(data, np.uint8, count=size, offset=offset).reshape(width, -1)
        offset += size
        raw = torch.from_numpy(planes.T.copy().reshape(-1))
        tensor = raw.view(dtype).reshape(shape) if size else torch.empty(shape, dtype=dtype)
        if tensor_digest(tensor) != entry["sha256"]:
            raise CarryError(f"{packed}: tensor {entry['name']!r} does not match its recorded SHA-256 "
                             "(a damaged carry); run `make gpu-prepare` again")
        tensors[entry["name"]] = tensor
    if offset != len(data):
        raise CarryError(f"{packed}: {len(data) - offset} bytes more than its header describes")
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    atomic_write_bytes(target, buffer.getvalue())


# ---------------------------------------------------------------------- on the GPU machine
def materialise(carry_dir: Path, cache_root: Path) -> dict[str, Any]:
    """Lay the carried caches out under ``cache_root`` (``$RECBENCH_CACHE_DIR``) as recbench wrote them:
    data caches copied, packed tensors rebuilt (checked), sidecars copied after their tensor files
    (a sidecar marks its tensor file complete). Returns the manifest."""
    carry_dir, cache_root = Path(carry_dir), Path(cache_root)
    manifest = load_manifest(carry_dir)
    for entry in manifest["datasets"].values():
        source = carry_dir / "cache" / entry["cache_dir"]
        if not source.is_dir():
            continue  # left out by the size budget: check_dataset says so per run
        target = cache_root / entry["cache_dir"]
        if not target.exists():
            cache_root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=cache_root, prefix=f".{entry['cache_dir']}.tmp-"))
            shutil.copytree(source, staging, dirs_exist_ok=True)
            os.replace(staging, target)
    packed: dict[str, Any] = manifest.get("packed", {})
    for relative, header in packed.items():
        target = cache_root / relative
        if not target.is_file():
            unpack_tensors(carry_dir / (relative + PACKED_SUFFIX), header, target)
    for sidecar in sorted((carry_dir / "item_side").glob("*/*.json")):
        target = cache_root / "item_side" / sidecar.parent.name / sidecar.name
        if not target.is_file():
            atomic_write_bytes(target, sidecar.read_bytes())
    return manifest


def check_dataset(manifest: dict[str, Any], config: str, config_text: str, data: SeqRecDataModule) -> str | None:
    """Why the carried cache of data config ``config`` cannot serve ``data``, or ``None`` when it can.

    The config's text must be what ``make gpu-prepare`` read, and the cache must be present,
    verify (row counts, SHA-256) and have the recorded fingerprint."""
    entry = manifest["datasets"].get(config)
    if entry is None:
        return f"no carried cache for the data config {config!r}; run `make gpu-prepare` with it in the plan"
    if entry.get("left_out"):
        return f"its data cache was left out of .carry ({entry['left_out']})"
    if hashlib.sha256(config_text.encode()).hexdigest() != entry["config_sha256"]:
        return f"benchmark/configs/data/{config}.yaml changed after `make gpu-prepare`; run it again"
    path = data.cache_path
    if not path.exists():
        return f"the carried cache {path} is missing"
    problem = verify_cache(path, path.name.rsplit("-", 1)[-1])
    if problem is not None:
        return f"the carried cache {path} does not verify: {problem}"
    if data.fingerprint != entry["fingerprint"]:
        return f"the cache's fingerprint {data.fingerprint} is not the recorded {entry['fingerprint']}"
    return None


@contextlib.contextmanager
def carried_caches(manifest: dict[str, Any]) -> Iterator[None]:
    """While active, a datamodule whose raw files are absent finds its prepared cache through the
    manifest (by class and dataset name) instead of hashing the raw files; one without a carried
    cache raises :class:`CarryError`. A datamodule whose raw files are all present, or that has none
    (synthetic data), keeps recbench's own rule. See the module docstring for why this is a patch."""
    carried = {
        (entry["class"], entry["name"]): entry["cache_dir"]
        for entry in manifest["datasets"].values()
        if not entry.get("left_out")
    }
    original = SeqRecDataModule.__dict__["cache_path"]

    def cache_path(self: SeqRecDataModule) -> Path:
        files = self.source_files()
        if all(path.exists() for path in files):
            return original.fget(self)
        directory = carried.get((class_path(self), self.name))
        if directory is None:
            missing = ", ".join(str(path) for path in files if not path.exists())
            raise CarryError(
                f"{self.name}: its raw files are not on this machine ({missing}) and .carry holds no prepared "
                f"cache for {class_path(self)} {self.name!r}: add the dataset to the plan of `make gpu-prepare`"
            )
        return self._cache_root() / directory

    SeqRecDataModule.cache_path = property(cache_path, doc=original.__doc__)  # type: ignore[method-assign]
    try:
        yield
    finally:
        SeqRecDataModule.cache_path = original  # type: ignore[method-assign]
