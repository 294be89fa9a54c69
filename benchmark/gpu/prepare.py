"""``make gpu-prepare``: build, on the CPU, what a GPU bench needs and cannot make there.

``python -m benchmark.gpu.prepare [--plan beauty:sasrec,tiger;toys:sasrec] [--profile paper]``

Writes two git-ignored folders that a device call carries (``carry: [".whl", ".carry"]``):

- ``.whl/``: the packages the GPU image lacks, pinned to the versions this project is tested with
  (:data:`WHEELS`), as cp312/abi3/pure-Python manylinux wheels (``pip download --no-deps
  --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux...``). The
  polars runtime (54 MB as a wheel) is stored unpacked and xz-compressed as
  ``<name>-<version>.site.tar.xz`` (31 MB), which :mod:`benchmark.gpu.unpack` extracts and checks
  against the wheel's RECORD there. ``wheels.json`` records what is there and its SHA-256, so a
  second run downloads nothing.
- ``.carry/``: for the runs of the plan, in priority order, the prepared data cache of each dataset
  and the item embeddings and semantic IDs of each semantic-ID model (TIGER, DiffGRM), laid out as
  :mod:`benchmark.gpu.carry` describes, plus ``manifest.json`` (the commit, the code digest, what is
  carried for which run and what was left out and why).

Size: what travels is the working tree (tracked and untracked-not-ignored files) plus the carried
paths, 64 MiB at most. The budget for ``.carry`` is 64 MiB minus the tree, minus ``.whl``, minus a
margin (``--margin-mib``, default 2) for rows and files added between this run and the device call.
Artefacts are added run by run in plan order; one that does not fit is left out (its run is skipped
on the GPU with that reason) and smaller ones after it may still fit. Text embeddings too large for
what is left are not computed at all (the MiniLM encoding takes minutes here).

Semantic IDs of datasets without item text (Steam, YooChoose) are left out by default: their
collaborative embeddings are recomputed on the GPU machine (they are not cached) and the carried IDs
would be found only if that ARPACK result were bit-identical there; otherwise the fit needs faiss,
which the GPU image lacks. ``--collaborative-item-side`` carries them anyway.

The raw data is read from ``$RECBENCH_DATA_DIR`` and the caches are built in (and reused from)
``$RECBENCH_CACHE_DIR``, as every recbench command does.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import recbench.semantic_ids
import recbench.text
from benchmark.gpu.carry import (
    CARRY_FORMAT,
    CODE_PATHS,
    MANIFEST,
    PACKED_SUFFIX,
    CarryError,
    atomic_write_json,
    class_path,
    code_digests,
    file_digest,
    folder_bytes,
    pack_tensors,
)
from benchmark.gpu.unpack import SITE_ARCHIVE_SUFFIX
from benchmark.registry import instantiate_data, instantiate_model, resolve_config
from benchmark.run import Profile, git_commit, load_profile, model_config_for
from recbench.data import SeqRecDataModule
from recbench.model import SeqRecModel
from recbench.semantic_id_model import SemanticIDModel
from recbench.text import DEFAULT_ENCODER, default_text_fields

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20
#: What a device call may carry in all (working tree + carried paths).
TRANSFER_LIMIT = 64 * MIB
#: The paper-profile runs in priority order: Beauty's table first (DESIGN §6: the whole Beauty paper
#: table in about 10 minutes on one H200), then the other datasets.
DEFAULT_PLAN: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    (dataset, ("sasrec", "tiger", "diffgrm", "dreamrec")) for dataset in ("beauty", "toys", "sports", "yoochoose", "steam")
)
#: Compressed bytes per float32 of a MiniLM embedding table packed as byte planes (measured on
#: Beauty: 18.59 MB -> 15.61 MB); used to decide whether computing an embedding table is worth it.
PACKED_FLOAT_RATIO = 0.86


@dataclass(frozen=True)
class Wheel:
    """One package the GPU image lacks (KINDS.md's list), pinned to the version tested here."""

    name: str
    version: str
    #: Store as an xz archive of the unpacked wheel (only where the zip is too large to carry).
    recompress: bool = False

    @property
    def dist(self) -> str:
        return self.name.replace("-", "_")


#: polars 2.1.0 is what this project runs on (polars is split into a pure-Python front and an abi3
#: runtime since 1.34); jsonargparse with its ``signatures`` extra (docstring-parser,
#: typeshed-client). PyYAML and typing-extensions, their other needs, are in the image.
WHEELS: tuple[Wheel, ...] = (
    Wheel("polars", "2.1.0"),
    Wheel("polars-runtime-32", "2.1.0", recompress=True),
    Wheel("jsonargparse", "4.53.0"),
    Wheel("docstring-parser", "0.18.0"),
    Wheel("typeshed-client", "2.15.0"),
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def parse_plan(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``"beauty:sasrec,tiger;toys:sasrec"`` -> ``(("beauty", ("sasrec", "tiger")), ("toys", ("sasrec",)))``."""
    plan = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        dataset, sep, models = part.partition(":")
        names = tuple(filter(None, (m.strip() for m in models.split(","))))
        if not sep or not dataset.strip() or not names:
            raise ValueError(f"plan item {part!r}: expected DATASET:MODEL[,MODEL...]")
        plan.append((dataset.strip(), names))
    if not plan:
        raise ValueError("the plan names no run")
    return tuple(plan)


def format_plan(plan: Sequence[tuple[str, Sequence[str]]]) -> str:
    return ";".join(f"{dataset}:{','.join(models)}" for dataset, models in plan)


# ---------------------------------------------------------------------- wheels
def _pip_download(wheel: Wheel, target: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp",
               *(f"--platform={platform}" for platform in PLATFORMS), "-d", str(target),
               f"{wheel.name}=={wheel.version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise CarryError(f"pip download {wheel.name}=={wheel.version} failed:\n{result.stderr.strip()}")
    found = sorted(target.glob("*.whl"))
    if len(found) != 1:
        raise CarryError(f"pip download {wheel.name}=={wheel.version}: expected one wheel, got {[p.name for p in found]}")
    return found[0]


def _recompress(wheel_file: Path, target: Path) -> None:
    """The wheel's files as a tar.xz (sorted, zero times and owners: the same bytes every time)."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".unzip-") as scratch:
        with zipfile.ZipFile(wheel_file) as archive:
            archive.extractall(scratch)
        partial = target.with_name(target.name + ".partial")
        with tarfile.open(partial, "w:xz", preset=9) as tar:
            for path in sorted(Path(scratch).rglob("*")):
                info = tar.gettarinfo(str(path), arcname=str(path.relative_to(scratch)))
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                if path.is_file():
                    with open(path, "rb") as handle:
                        tar.addfile(info, handle)
                else:
                    tar.addfile(info)
        os.replace(partial, target)


def ensure_wheels(wheels_dir: Path, wheels: Sequence[Wheel] = WHEELS) -> dict[str, str]:
    """Fill ``wheels_dir`` with :data:`WHEELS` (downloaded once; kept while their SHA-256 matches
    ``wheels.json``) and remove anything else there: two versions of one package stop the install
    on the GPU machine. Returns ``{file name: sha256}``."""
    wheels_dir.mkdir(parents=True, exist_ok=True)
    index_path = wheels_dir / "wheels.json"
    index: dict[str, str] = json.loads(index_path.read_text()) if index_path.is_file() else {}
    wanted: dict[str, str] = {}
    for wheel in wheels:
        prefix = f"{wheel.dist}-{wheel.version}"
        present = next(
            (name for name in index if name.startswith(prefix + "-") or name == prefix + SITE_ARCHIVE_SUFFIX), None
        )
        if present and (wheels_dir / present).is_file() and file_digest(wheels_dir / present) == index[present]:
            wanted[present] = index[present]
            continue
        with tempfile.TemporaryDirectory(dir=wheels_dir, prefix=".download-") as scratch:
            print(f"gpu-prepare: downloading {wheel.name}=={wheel.version}", flush=True)
            downloaded = _pip_download(wheel, Path(scratch))
            if wheel.recompress:
                name = prefix + SITE_ARCHIVE_SUFFIX
                print(f"gpu-prepare: recompressing {downloaded.name} as {name} (xz -9, a few minutes)", flush=True)
                _recompress(downloaded, wheels_dir / name)
            else:
                name = downloaded.name
                os.replace(downloaded, wheels_dir / name)
        wanted[name] = file_digest(wheels_dir / name)
    for path in wheels_dir.iterdir():
        if path.name not in wanted and path.name != "wheels.json":
            print(f"gpu-prepare: removing {path.name} from {wheels_dir} (not in the pinned list)", flush=True)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    atomic_write_json(index_path, wanted)
    return wanted


# ---------------------------------------------------------------------- sizes
def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of the working tree that a device call sends: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=root, capture_output=True, check=True).stdout.decode().split("\0")
    return sum((root / name).stat().st_size for name in listed if name and (root / name).is_file())


# ---------------------------------------------------------------------- item side
def needs_item_side(model: SeqRecModel) -> bool:
    """Semantic-ID models (TIGER, DiffGRM) read item embeddings and IDs built from the data."""
    return isinstance(model, SemanticIDModel)


def build_item_side(model: SeqRecModel, data: SeqRecDataModule) -> None:
    """Build (or load from the cache) the model's embeddings and semantic IDs, as its setup does."""
    if isinstance(model, SemanticIDModel):
        model.build_semantic_ids(data)


@contextlib.contextmanager
def recorded_tensor_files() -> Iterator[set[Path]]:
    """The tensor files (embeddings, semantic IDs) recbench reads or writes inside the block.

    recbench names them by content hashes it computes internally; watching its two cache functions
    is the one way to know which files of a cache folder a model uses without recomputing those keys.
    """
    seen: set[Path] = set()
    modules = (recbench.text, recbench.semantic_ids)
    originals = [(module, module.load_tensors, module.atomic_save_tensors) for module in modules]

    def load(path: Path, _load=recbench.text.load_tensors):  # type: ignore[no-untyped-def]
        result = _load(path)
        if result is not None:
            seen.add(Path(path))
        return result

    def save(path: Path, tensors: dict, meta: dict, _save=recbench.text.atomic_save_tensors) -> None:  # type: ignore[type-arg]
        _save(path, tensors, meta)
        seen.add(Path(path))

    for module in modules:
        module.load_tensors, module.atomic_save_tensors = load, save  # type: ignore[assignment]
    try:
        yield seen
    finally:
        for module, original_load, original_save in originals:
            module.load_tensors, module.atomic_save_tensors = original_load, original_save  # type: ignore[assignment]


def estimated_item_side_bytes(model: SeqRecModel, data: SeqRecDataModule) -> tuple[int, int]:
    """Packed sizes of the item side before computing it: (the text embedding table, the semantic
    IDs). The table dominates; the IDs' bound is generous (8 int64 digits per item, uncompressed)."""
    dim = 384 if model.hparams.get("text_encoder", DEFAULT_ENCODER) == DEFAULT_ENCODER else 768
    embeddings = (data.num_items + 1) * dim * 4 * PACKED_FLOAT_RATIO if uses_text(model, data) else 0
    return int(embeddings), (data.num_items + 1) * 8 * 8


def uses_text(model: SeqRecModel, data: SeqRecDataModule) -> bool:
    return model.hparams.get("embedding_source", "text") == "text" and bool(default_text_fields(data.items_table))


# ---------------------------------------------------------------------- the carry
class _Budget:
    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    @property
    def left(self) -> int:
        return self.limit - self.used

    def take(self, size: int) -> bool:
        if size > self.left:
            return False
        self.used += size
        return True


def build_carry(
    carry_dir: Path,
    plan: Sequence[tuple[str, Sequence[str]]],
    profile: Profile,
    budget_bytes: int,
    collaborative_item_side: bool = False,
) -> dict[str, Any]:
    """Write the carry for ``plan`` into ``carry_dir`` (replaced atomically); returns the manifest."""
    commit = git_commit()
    if commit == "unknown":
        raise CarryError("no git commit can be read here: run `make gpu-prepare` in a git checkout")
    if commit.endswith("-dirty"):
        print(f"gpu-prepare: WARNING: the tree has uncommitted changes; GPU rows will record {commit}", flush=True)
    code_files = subprocess.run(["git", "ls-files", "--", *CODE_PATHS], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split()
    budget = _Budget(budget_bytes - 64 * 1024)  # the manifest itself
    carry_dir = Path(carry_dir)
    staging = carry_dir.with_name(f"{carry_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    datasets: dict[str, dict[str, Any]] = {}
    packed: dict[str, Any] = {}
    runs: list[dict[str, Any]] = []
    try:
        for dataset, models in plan:
            data = instantiate_data(dataset)
            started = time.perf_counter()
            data.prepare_data()
            cache = data.cache_path
            size = folder_bytes(cache)
            entry: dict[str, Any] = {
                "class": class_path(data), "name": data.name, "cache_dir": cache.name, "fingerprint": data.fingerprint,
                "config_sha256": _sha256_text(Path(resolve_config("data", dataset)).read_text()), "bytes": size,
                "item_side_dir": None,
            }
            if budget.take(size):
                shutil.copytree(cache, staging / "cache" / cache.name)
                print(f"gpu-prepare: {dataset}: data cache {cache.name} ({size / MIB:.1f} MiB, "
                      f"{data.cache_outcome}, {time.perf_counter() - started:.0f} s)", flush=True)
            else:
                entry["left_out"] = f"{size / MIB:.1f} MiB, {budget.left / MIB:.1f} MiB left"
                print(f"gpu-prepare: {dataset}: data cache LEFT OUT ({entry['left_out']})", flush=True)
            datasets[dataset] = entry
            for model_name in models:
                config = model_config_for(model_name, profile)
                run = {"dataset": dataset, "model": model_name, "config": config, "carried": True}
                runs.append(run)
                if entry.get("left_out"):
                    run.update(carried=False, reason=f"the data cache was left out ({entry['left_out']})")
                    continue
                model = instantiate_model(config, data.num_items, data.max_len)
                if not needs_item_side(model):
                    continue
                reason = _carry_item_side(model, data, staging, budget, packed, collaborative_item_side)
                if reason:
                    run.update(carried=False, reason=reason)
                    print(f"gpu-prepare: {dataset} {config}: item side LEFT OUT ({reason})", flush=True)
                else:
                    run["item_side"] = True
                    entry["item_side_dir"] = f"{data.name}-{data.fingerprint}"
        manifest = {
            "format": CARRY_FORMAT,
            "commit": commit,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "profile": profile.name,
            "plan": [[dataset, list(models)] for dataset, models in plan],
            "code": {"paths": list(CODE_PATHS), "files": code_digests(ROOT, code_files)},
            "datasets": datasets,
            "packed": packed,
            "runs": runs,
        }
        atomic_write_json(staging / MANIFEST, manifest)
        _replace_folder(staging, carry_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _carry_item_side(
    model: SeqRecModel,
    data: SeqRecDataModule,
    staging: Path,
    budget: _Budget,
    packed: dict[str, Any],
    collaborative: bool,
) -> str | None:
    """Add the model's embeddings and semantic IDs to the carry; the reason when they are left out."""
    if not uses_text(model, data) and not collaborative:
        return ("no item text: its collaborative embeddings are recomputed there and the semantic IDs fitted with "
                "faiss, which the GPU image lacks (--collaborative-item-side carries them anyway)")
    relative_dir = Path("item_side") / f"{data.name}-{data.fingerprint}"
    embeddings, ids = estimated_item_side_bytes(model, data)
    if any(key.startswith(f"{relative_dir}/item_emb_") for key in packed):
        embeddings = 0  # carried already for an earlier model of this dataset (same encoder and fields)
    if embeddings + ids > budget.left:
        return f"about {(embeddings + ids) / MIB:.1f} MiB packed, {budget.left / MIB:.1f} MiB left (not computed)"
    started = time.perf_counter()
    with recorded_tensor_files() as files:
        build_item_side(model, data)
    added = 0
    staged: list[tuple[str, Path, list[dict[str, Any]]]] = []
    for path in sorted(files):
        relative = str(relative_dir / path.name)
        if relative in packed:
            continue  # shared with an earlier model (the embedding table)
        target = staging / (relative + PACKED_SUFFIX)
        target.parent.mkdir(parents=True, exist_ok=True)
        header = pack_tensors(path, target)
        shutil.copyfile(f"{path}.json", staging / (relative + ".json"))
        size = target.stat().st_size + (staging / (relative + ".json")).stat().st_size
        added += size
        staged.append((relative, target, header))
    if not budget.take(added):
        for relative, target, _ in staged:
            target.unlink()
            (staging / (relative + ".json")).unlink()
        return f"{added / MIB:.1f} MiB packed, {budget.left / MIB:.1f} MiB left"
    for relative, _, header in staged:
        packed[relative] = header
    print(f"gpu-prepare: {data.name} {type(model).__name__}: item side +{added / MIB:.1f} MiB "
          f"({len(files)} tensor files, {time.perf_counter() - started:.0f} s)", flush=True)
    return None


def _replace_folder(staging: Path, target: Path) -> None:
    """Swap ``staging`` in for ``target`` (rename aside, rename in, delete the old one)."""
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.gpu.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--carry", type=Path, default=ROOT / ".carry")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    parser.add_argument("--plan", default=format_plan(DEFAULT_PLAN), help="DATASET:MODEL,MODEL;DATASET:... (priority order)")
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--margin-mib", type=float, default=2.0, help="room kept for the tree to grow before the call")
    parser.add_argument("--no-wheels", action="store_true", help="skip .whl (tests; a machine that has the packages)")
    parser.add_argument("--collaborative-item-side", action="store_true")
    args = parser.parse_args(list(argv))
    try:
        plan = parse_plan(args.plan)
        profile = load_profile(args.profile)
        wheel_bytes = 0
        if not args.no_wheels:
            ensure_wheels(args.wheels)
            wheel_bytes = folder_bytes(args.wheels)
        tree = tree_bytes()
        budget = int(TRANSFER_LIMIT - args.margin_mib * MIB - tree - wheel_bytes)
        print(f"gpu-prepare: working tree {tree / MIB:.2f} MiB, .whl {wheel_bytes / MIB:.2f} MiB, "
              f"margin {args.margin_mib:.1f} MiB: {budget / MIB:.2f} MiB for .carry", flush=True)
        if budget <= 0:
            raise CarryError("no room for .carry under the 64 MiB transfer limit")
        manifest = build_carry(args.carry, plan, profile, budget, args.collaborative_item_side)
    except (CarryError, ValueError, OSError) as error:
        print(f"gpu-prepare: error: {error}", file=sys.stderr)
        return 1
    carry = folder_bytes(args.carry)
    left_out = [f"{r['dataset']} {r['config']}: {r['reason']}" for r in manifest["runs"] if not r["carried"]]
    print(f"gpu-prepare: .carry {carry / MIB:.2f} MiB for {sum(r['carried'] for r in manifest['runs'])} of "
          f"{len(manifest['runs'])} runs; commit {manifest['commit']}; total to carry "
          f"{(tree + wheel_bytes + carry) / MIB:.2f} of {TRANSFER_LIMIT / MIB:.0f} MiB")
    for line in left_out:
        print(f"gpu-prepare: left out: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
