"""`SeqRecDataModule`: raw files -> canonical tables -> cache -> split -> batches.

Every dataset goes through this one pipeline, so every model sees the same cases.

Canonical tables (polars, cached as parquet):

- interactions: ``user`` (int64), ``item`` (int64, 1..N), ``order`` (int64: a timestamp, or the
  position in the source file where the source has none). Sorted by ``(user, order)`` with a stable
  sort: **ties keep file order**, never item id.
- items: ``item`` 1..N (contiguous), plus whatever text the source has and its raw id.

A subclass parses one source format: it implements :meth:`SeqRecDataModule.source_files`,
:meth:`SeqRecDataModule.preprocessing_signature` and :meth:`SeqRecDataModule.read_tables`.

Cache: ``prepare_data`` writes the tables once into ``<cache_root>/<name>-<key>/``.

- The key hashes the CONTENT of every source file (SHA-256, with its file name), the dataset name
  and class, the preprocessing signature, and the parser and cache-format versions. It does not
  cover where the files are (a copy of the same files elsewhere shares the cache) nor their
  times: a same-size edit that keeps the mtime (``cp -p``, ``rsync -t``, ``tar``) changes the key,
  and a ``touch`` does not. Hashing is memoised in ``<cache_root>/source-hashes/`` by (device,
  inode, size, mtime, ctime): ctime cannot be set from user space and changes on every write, so a
  changed file is always hashed again, and the 1.4 GB YooChoose clicks file is hashed once, not on
  every run. A file changed less than 2 s before it was hashed is not memoised (a second write
  within the clock tick of the first could keep its ctime).
- ``meta.json`` records each table's row count, byte size and SHA-256. A cache is verified before
  it is trusted (once per datamodule object); one that does not verify (a truncated or replaced
  parquet, a missing or unreadable ``meta.json``, a directory left by an interrupted write) is
  rebuilt, with a WARNING that says why (:attr:`SeqRecDataModule.cache_problem`).
- The directory is written under a temporary name and renamed, so a crashed or concurrent prepare
  never leaves a half-written cache; a damaged directory is first renamed aside, then replaced.
  ``setup`` only reads.
- ``fingerprint`` (in every result row) hashes everything a model can read: the interactions and
  every column of the items table (text included), so two item-text versions never share one.
- Duplicates are KEPT and counted in ``meta["duplicates"]`` (and ``recbench data stats``): exact
  duplicate interactions (same user, item and order), repeat interactions (a user's item seen
  before; exact duplicates included), and items whose raw id (``asin``, ``app_id`` or
  ``raw_item_id``) repeats an earlier item's. Kept, because the published counts of every source
  include them and repeat consumption is real; counted, so that a user who wants them dropped
  knows how many there are.

Splits (``split=``):

- ``leave_one_out`` (default): per user, the last item is the test target, the second-to-last the
  validation target, everything before is the training prefix. A user needs 2 items for a test
  case (non-empty history) and 3 for a validation case; users below that are counted in
  :attr:`SplitCounts`, never silently dropped.
- ``session``: users (sessions) are split 8:1:1 by a seeded permutation; every prefix of a held-out
  session with a non-empty history is an evaluation case (the DreamRec protocol).
- ``temporal``: a global time cut (only where ``order`` is a real timestamp): interactions up to the
  ``temporal_quantiles[0]`` quantile of time train, those up to ``temporal_quantiles[1]`` are
  validation targets, the rest test targets; histories are everything before the target.

Training targets are every position (after the first) of every training prefix, for every model.
``train_format="sequence"`` serves them as left-padded windows of ``max_len + 1`` items (SASRec's
all-position loss; a prefix longer than that is cut into consecutive windows so that every target is
served exactly once), ``"pairs"`` as one ``(history, target)`` case per position (sliding windows
with the history truncated to the last ``max_len`` items). ``"auto"`` asks the attached model's
``training_view``.

Training batches are length-bucketed (``length_buckets``, :data:`DEFAULT_LENGTH_BUCKETS`; ``None``
gives plain shuffled batches). Each epoch, :class:`LengthBucketSampler`
sorts the training rows by real length (ties broken at random), cuts the sorted order into
``length_buckets`` buckets of equal row count, shuffles each bucket, cuts the bucket-ordered rows
into batches and shuffles the order of all batches. Pairs-view batches hold ``batch_size`` rows;
sequence-view batches hold ``batch_size`` rows' worth of TARGETS (a token budget), so that a
per-batch mean loss weighs every target of an epoch alike. Only the epoch's last batch can be
short. The collate function (on the host, train and evaluation alike) drops the leading columns that are
padding in every row, so a batch is exactly as wide as its longest real row. Every training
target is still served exactly once per epoch; the order is a function of ``(seed, epoch)``, the
seed being ``torch.initial_seed()`` when the loader is built (what ``seed_everything`` sets, the
same on every DDP rank whatever the RNG consumed before). Under DDP each rank takes every
``world_size``-th batch; when the batch count does not divide, the largest batches are halved until
it does, so ranks run the same number of steps and no row is repeated (Lightning's
DistributedSampler would repeat rows instead). Why buckets of equal COUNT rather than fixed length
ranges: Beauty's rows are mostly 1-10 items long, so equal-count buckets put their boundaries
where the rows are, and every bucket is large enough to give well-mixed batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import polars
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from recbench import __version__
from recbench.batch import CASE, HISTORY, PAD_ID, SEQUENCE, TARGET, USER, Batch, left_pad_windows

log = logging.getLogger(__name__)

# 3: content-keyed caches, verified tables, duplicate counts, a fingerprint that covers item text.
CACHE_FORMAT_VERSION = 3
_TABLES = ("interactions.parquet", "items.parquet")
# Raw item id columns, in the order a source would have them (the duplicates rule above).
RAW_ID_COLUMNS = ("asin", "app_id", "raw_item_id")
DUPLICATE_EVENTS = "exact duplicate interactions (same user, item and order as another row; kept)"
REPEAT_EVENTS = "repeat interactions (the user's item seen before, exact duplicates included; kept)"
DUPLICATE_RAW_IDS = "items sharing a raw id with an earlier item (kept)"
TEXT_FIELDS: tuple[str, ...] = (
    "title",
    "title_fragment",
    "brand",
    "categories",
    "price",
    "description",
    "genres",
    "tags",
)

SplitName = Literal["leave_one_out", "session", "temporal"]
TrainFormat = Literal["auto", "sequence", "pairs"]
#: The bucket count of the training loader (see the module docstring). Measured on the synthetic
#: Beauty-shaped set (scale 0.2, batch 256), padded slots / all slots of the trimmed batches, pairs
#: view: random batches 0.81, 8 buckets 0.35, 16 0.19, 32 0.11, 64 0.08 (sequence view: 0.77, 0.34,
#: 0.23, 0.12, 0.12). 32 keeps about 16 batches per bucket on Beauty's pairs (512 batches an epoch).
#: Sequence-view batches are cut at equal target counts (:class:`LengthBucketSampler`): with equal
#: ROW counts a batch of short rows weighed as much as a batch of long ones under a per-batch mean
#: loss, and Beauty SASRec (quick, seed 1) fell from test NDCG@10 0.0393 (unbucketed) to 0.0323.
DEFAULT_LENGTH_BUCKETS: int | None = 32


def data_root() -> Path:
    """Where raw data lives: ``$RECBENCH_DATA_DIR``, default ``./data``."""
    return Path(os.environ.get("RECBENCH_DATA_DIR", "data"))


def cache_root() -> Path:
    """Where prepared tables live: ``$RECBENCH_CACHE_DIR``, default ``~/.cache/recbench``."""
    default = Path.home() / ".cache" / "recbench"
    return Path(os.environ.get("RECBENCH_CACHE_DIR", default))


class DataFormatError(ValueError):
    """A raw input problem, always located: ``<file>:<line>: <reason>``."""

    def __init__(self, path: Path | str, line: int | None, reason: str) -> None:
        self.path = Path(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else f"{self.path}"
        super().__init__(f"{where}: {reason}")


class MissingDataError(FileNotFoundError):
    """Raw files are absent and cannot be downloaded; says what, where and where from."""

    def __init__(self, dataset: str, missing: Sequence[Path], where_from: str) -> None:
        files = "\n  ".join(str(p) for p in missing)
        super().__init__(
            f"{dataset}: raw data not found. Looked for:\n  {files}\n"
            f"Set RECBENCH_DATA_DIR to the folder that holds them (now: {data_root()}).\n"
            f"Where they come from: {where_from}"
        )


@dataclass
class CanonicalTables:
    """What a parser returns.

    ``filtered`` counts rows the parser deliberately left out, by reason (e.g. ``"duplicate
    click": 12``); the counts are logged and kept in the cache metadata so nothing disappears
    silently. ``order_is_time`` says whether ``order`` holds real timestamps.
    """

    interactions: polars.DataFrame
    items: polars.DataFrame
    order_is_time: bool
    filtered: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DatasetStats:
    name: str
    users: int
    items: int
    interactions: int
    mean_length: float
    median_length: float
    density: float
    items_with_field: dict[str, int]
    filtered: dict[str, int]
    cache_path: str
    fingerprint: str
    duplicates: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SplitCounts:
    """How many cases each split has, and how many users could not give one (and why)."""

    train_targets: int
    val_cases: int
    test_cases: int
    users_without_test_case: int
    users_without_val_case: int
    users_without_train_target: int
    val_subset: int | None


@dataclass(frozen=True)
class _Cases:
    """Evaluation or pair-training cases: history = items[start:position], target = items[position]."""

    user: torch.Tensor  # (C,) user id
    start: torch.Tensor  # (C,) first index of the user's sequence in the flat item array
    position: torch.Tensor  # (C,) index of the target in the flat item array

    def __len__(self) -> int:
        return int(self.position.numel())

    def subset(self, index: torch.Tensor) -> _Cases:
        return _Cases(self.user[index], self.start[index], self.position[index])


class _IndexDataset(Dataset):
    """Yields case indices; the collate function gathers the whole batch in one vectorised step.

    Under :class:`LengthBucketSampler` the "index" is a whole batch (a list), passed through as is.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


class _CaseCollate:
    """(history, target) batches. ``trim``: the history is as wide as its longest real row, cut on
    the host (the datamodule always trims, so no model reads a device tensor to learn a width)."""

    def __init__(self, items: torch.Tensor, cases: _Cases, max_len: int, trim: bool = False) -> None:
        self.items, self.cases, self.max_len, self.trim = items, cases, max_len, trim

    def __call__(self, indices: list[int]) -> Batch:
        index = torch.as_tensor(indices, dtype=torch.long)
        start, position = self.cases.start[index], self.cases.position[index]
        width = max(1, int((position - start).clamp(max=self.max_len).max())) if self.trim else self.max_len
        return {
            HISTORY: left_pad_windows(self.items, start, position, width),  # (B, L'), L' <= L
            TARGET: self.items[position],  # (B,)
            USER: self.cases.user[index],  # (B,)
            CASE: index,  # (B,)
        }


class _WindowCollate:
    """Sequence batches; ``trim`` as in :class:`_CaseCollate` (windows hold at most ``max_len + 1``)."""

    def __init__(self, items: torch.Tensor, windows: _Cases, max_len: int, trim: bool = False) -> None:
        # For windows, ``position`` is the exclusive end of the window.
        self.items, self.windows, self.max_len, self.trim = items, windows, max_len, trim

    def __call__(self, indices: list[int]) -> Batch:
        index = torch.as_tensor(indices, dtype=torch.long)
        start, end = self.windows.start[index], self.windows.position[index]
        width = int((end - start).max()) if self.trim else self.max_len + 1
        return {
            SEQUENCE: left_pad_windows(self.items, start, end, width),  # (B, L' + 1), L' <= L
            USER: self.windows.user[index],
        }


class LengthBucketSampler(DistributedSampler):
    """Batches (lists of row indices) of similar real length; the rule is in the module docstring.

    A :class:`~torch.utils.data.distributed.DistributedSampler` whose items are whole batches, so
    Lightning neither injects a sampler of its own under DDP (it would repeat rows) nor needs one,
    and its fit loop calls :meth:`set_epoch` every epoch. Use it with ``DataLoader(batch_size=None)``.

    Args:
        lengths: LongTensor ``(C,)``, the real length of every row (what it would be trimmed to).
        batch_size: rows per batch (per rank, as Lightning's ``batch_size``); with ``targets``, the
            batch holds ``batch_size`` rows' worth of targets on average instead.
        buckets: number of length buckets (1 = shuffled batches, trimmed).
        seed: base seed; epoch ``e`` uses ``seed + e``.
        num_replicas, rank: the DDP world size and this process's rank.
        targets: LongTensor ``(C,)``, the training targets of every row (sequence view: one per
            position after the first). Batches are then cut at equal target counts (a token budget
            of ``batch_size`` x the mean targets per row), so a batch of short rows holds more rows
            and a per-batch mean loss weighs every target of the epoch alike, as unbucketed
            batches do on average. ``None``: one target per row (pairs view), ``batch_size`` rows.
    """

    def __init__(
        self,
        lengths: torch.Tensor,
        batch_size: int,
        buckets: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        targets: torch.Tensor | None = None,
    ) -> None:
        if buckets < 1 or batch_size < 1:
            raise ValueError(f"buckets and batch_size must be >= 1, got {buckets} and {batch_size}")
        if len(lengths) < num_replicas:
            raise ValueError(f"{len(lengths)} training rows cannot be shared by {num_replicas} processes")
        if targets is not None and (targets.shape != lengths.shape or bool((targets < 1).any())):
            raise ValueError("targets must give every row at least one target, one value per row")
        super().__init__(
            _IndexDataset(len(lengths)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed
        )
        self.lengths, self.batch_size = lengths, batch_size
        self.buckets = buckets
        self.targets = torch.ones_like(lengths) if targets is None else targets
        self.target_budget = max(1, round(batch_size * float(self.targets.double().mean())))
        self._batch_counts: dict[int, int] = {}

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """Every batch of epoch ``epoch`` (all ranks, in order; rank ``r`` takes ``r::world``)."""
        n = len(self.lengths)
        generator = torch.Generator().manual_seed((self.seed + epoch) % 2**63)
        shuffled = torch.randperm(n, generator=generator)
        by_length = shuffled[torch.sort(self.lengths[shuffled], stable=True).indices]  # random ties
        order = torch.cat(
            [bucket[torch.randperm(len(bucket), generator=generator)] for bucket in by_length.split(self._bucket_rows())]
        )
        # Cut the bucket-ordered rows at every ``target_budget`` targets: only the epoch's last batch
        # is short, and a batch that straddles two buckets joins neighbouring lengths.
        batch_of_row = (self.targets[order].cumsum(0) - 1) // self.target_budget  # (C,) non-decreasing
        sizes = torch.unique_consecutive(batch_of_row, return_counts=True)[1].tolist()
        batches = list(order.split(sizes))
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in shuffle]
        while len(batches) % self.num_replicas:  # equal step counts per rank, no repeated row
            largest = max(range(len(batches)), key=lambda i: len(batches[i]))
            if len(batches[largest]) < 2:
                raise ValueError(f"{len(self.lengths)} rows cannot fill an equal number of batches on {self.num_replicas} processes")
            half = (len(batches[largest]) + 1) // 2
            batches[largest : largest + 1] = [batches[largest][:half], batches[largest][half:]]
        self._batch_counts[epoch] = len(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:  # type: ignore[override]
        for batch in self.epoch_batches(self.epoch)[self.rank :: self.num_replicas]:
            yield batch.tolist()

    def _bucket_rows(self) -> int:
        """Rows per bucket: a whole number of batches of ``batch_size`` rows."""
        batches = -(-len(self.lengths) // self.batch_size)  # ceil
        return -(-batches // self.buckets) * self.batch_size

    def __len__(self) -> int:
        if self.epoch not in self._batch_counts:  # the count can depend on the order (token budgets)
            self.epoch_batches(self.epoch)
        return self._batch_counts[self.epoch] // self.num_replicas


def _fingerprint(parts: dict[str, object]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _stat_key(path: Path) -> tuple[int, ...]:
    """What identifies one version of a file without reading it (see the module docstring)."""
    stat = path.stat()
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


# A file whose ctime is this close to the moment it was hashed is hashed again next time.
_RACY_NS = 2_000_000_000
# Per process: (resolved path, stat key) -> SHA-256, so a cache_path lookup costs one stat.
_DIGESTS: dict[tuple[str, tuple[int, ...]], str] = {}


def file_sha256(path: Path, memo_dir: Path | None = None) -> str:
    """SHA-256 of a file's bytes, memoised by its stat key (in this process and in ``memo_dir``).

    A memo is used only when device, inode, size, mtime and ctime all match; a file whose stat
    changed while it was hashed is not memoised.
    """
    resolved = str(path.resolve())
    key = _stat_key(path)
    if (resolved, key) in _DIGESTS:
        return _DIGESTS[(resolved, key)]
    memo = memo_dir / f"{hashlib.sha256(resolved.encode()).hexdigest()[:24]}.json" if memo_dir else None
    if memo is not None and memo.is_file():
        try:
            stored = json.loads(memo.read_text())
        except (OSError, ValueError):
            stored = None  # a damaged memo is only a lost shortcut: hash again and rewrite it
        if isinstance(stored, dict) and stored.get("path") == resolved and stored.get("stat") == list(key):
            _DIGESTS[(resolved, key)] = str(stored["sha256"])
            return _DIGESTS[(resolved, key)]
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):  # hashlib.file_digest needs Python 3.11
            sha.update(chunk)
    digest = sha.hexdigest()
    # A file changed within the timestamp granularity of the hash ("racily clean", as git calls it)
    # could change again without a new ctime, so such a hash is used now but not remembered.
    settled = time.time_ns() - key[4] > _RACY_NS
    if settled and _stat_key(path) == key:
        _DIGESTS[(resolved, key)] = digest
        if memo is not None:
            _atomic_write_text(memo, json.dumps({"path": resolved, "stat": list(key), "sha256": digest}))
    return digest


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        staging.write_text(text)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def _table_record(path: Path) -> dict[str, object]:
    """What ``meta.json`` records about one written table, to verify it on read."""
    rows = polars.scan_parquet(path).select(polars.len()).collect().item()
    return {"rows": int(rows), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def verify_cache(directory: Path, cache_key: str) -> str | None:
    """Why the cache in ``directory`` cannot be trusted, or ``None`` when it verifies.

    Checks that ``meta.json`` parses and belongs to this key and format, and that every table has the
    recorded byte size, SHA-256 and row count.
    """
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return "meta.json is missing (an interrupted or foreign write)"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:
        return f"meta.json is unreadable ({error})"
    if not isinstance(meta, dict) or meta.get("cache_format") != CACHE_FORMAT_VERSION or meta.get("cache_key") != cache_key:
        return "meta.json belongs to another cache key or format"
    recorded = meta.get("tables")
    if not isinstance(recorded, dict):
        return "meta.json records no table checksums"
    for name in _TABLES:
        path, expected = directory / name, recorded.get(name)
        if not isinstance(expected, dict):
            return f"meta.json records nothing for {name}"
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected.get("bytes"):
            return f"{name} has {size} bytes, {expected.get('bytes')} were written"
        if file_sha256(path) != expected.get("sha256"):
            return f"{name} does not match its recorded SHA-256"
        try:
            rows = polars.scan_parquet(path).select(polars.len()).collect().item()
        except polars.exceptions.PolarsError as error:
            return f"{name} is not a readable parquet file ({error})"
        if rows != expected.get("rows"):
            return f"{name} has {rows} rows, {expected.get('rows')} were written"
    return None


class SeqRecDataModule(pl.LightningDataModule):
    """Base datamodule: caching, splitting and batching shared by every source.

    Args:
        max_len: history length fed to models (the last ``max_len`` items).
        split: ``leave_one_out``, ``session`` or ``temporal`` (see the module docstring).
        train_format: ``sequence``, ``pairs`` or ``auto`` (ask the model's ``training_view``).
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size.
        num_workers: DataLoader workers.
        val_subset: if set, validate during training on this many validation cases drawn with
            ``split_seed`` (test always uses every case).
        split_seed: seed for the session split and the validation subset.
        session_fractions: train/validation/test shares of sessions for ``split="session"``.
        temporal_quantiles: time quantiles of the validation and test cuts for ``split="temporal"``.
        length_buckets: training batches drawn from this many buckets of similar real length and
            trimmed to their longest row (module docstring); ``None``: plain shuffled batches of full
            width ``max_len`` (the earlier behaviour).
        cache_dir: where prepared tables live (default ``$RECBENCH_CACHE_DIR`` or
            ``~/.cache/recbench``).
    """

    #: Bumped when a subclass's parser changes its output, so old caches are not reused.
    parser_version: int = 1
    #: Short dataset name used for cache directories and result rows.
    name: str = "dataset"
    #: Where the raw files come from, quoted in errors when they are missing.
    source_reference: str = ""

    def __init__(
        self,
        max_len: int = 50,
        split: SplitName = "leave_one_out",
        train_format: TrainFormat = "auto",
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        num_workers: int = 0,
        val_subset: int | None = None,
        split_seed: int = 0,
        session_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        temporal_quantiles: tuple[float, float] = (0.8, 0.9),
        cache_dir: str | None = None,
        length_buckets: int | None = DEFAULT_LENGTH_BUCKETS,
    ) -> None:
        super().__init__()
        if length_buckets is not None and length_buckets < 1:
            raise ValueError(f"length_buckets must be >= 1 or None, got {length_buckets}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if abs(sum(session_fractions) - 1.0) > 1e-9 or min(session_fractions) < 0:
            raise ValueError(f"session_fractions must be non-negative and sum to 1, got {session_fractions}")
        if not 0.0 < temporal_quantiles[0] < temporal_quantiles[1] < 1.0:
            raise ValueError(f"temporal_quantiles must satisfy 0 < q_val < q_test < 1, got {temporal_quantiles}")
        self.max_len = max_len
        self.split = split
        self.train_format = train_format
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.val_subset = val_subset
        self.split_seed = split_seed
        self.session_fractions = tuple(session_fractions)
        self.temporal_quantiles = tuple(temporal_quantiles)
        self.cache_dir = cache_dir
        self.length_buckets = length_buckets
        self._meta: dict[str, object] | None = None
        self._items_table: polars.DataFrame | None = None
        self._flat_items: torch.Tensor | None = None
        # The cache directory this object has verified (or written); checked once, not per read.
        self._verified: Path | None = None
        #: What the last :meth:`prepare_data` found: ``hit`` (a verified cache), ``built`` (none
        #: existed) or ``rebuilt`` (one existed and did not verify: :attr:`cache_problem` says why).
        self.cache_outcome: Literal["hit", "built", "rebuilt"] | None = None
        self.cache_problem: str | None = None

    # ------------------------------------------------------------------ subclass contract
    @abstractmethod
    def source_files(self) -> list[Path]:
        """The raw files :meth:`read_tables` reads (their contents key the cache)."""

    @abstractmethod
    def preprocessing_signature(self) -> str:
        """Every option that changes the canonical tables, as a stable string."""

    @abstractmethod
    def read_tables(self) -> CanonicalTables:
        """Parse the raw files. Raise :class:`DataFormatError` on bad input."""

    def download(self, missing: list[Path]) -> None:
        """Fetch missing raw files. The default cannot, and says where they come from."""
        raise MissingDataError(self.name, missing, self.source_reference or "(no public source recorded)")

    # ------------------------------------------------------------------ cache
    def _cache_root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else cache_root()

    def _source_records(self) -> list[dict[str, object]]:
        """Name and content hash of every source file (downloading missing ones first)."""
        files = self.source_files()
        missing = [p for p in files if not p.exists()]
        if missing:
            self.download(missing)
        memo = self._cache_root() / "source-hashes"
        return [{"name": p.name, "sha256": file_sha256(p, memo)} for p in files]

    @property
    def cache_path(self) -> Path:
        """The cache directory for these source contents and preprocessing options."""
        parts = {
            "name": self.name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "signature": self.preprocessing_signature(),
            "parser_version": self.parser_version,
            "cache_format": CACHE_FORMAT_VERSION,
            "files": self._source_records(),
        }
        return self._cache_root() / f"{self.name}-{_fingerprint(parts)}"

    def prepare_data(self) -> None:
        """Parse the raw files once and cache the canonical tables (atomic; safe to race).

        An existing cache is verified first (:func:`verify_cache`) and rebuilt when it does not
        verify; :attr:`cache_outcome` and :attr:`cache_problem` say which happened.
        """
        target = self.cache_path
        if self._verified == target:
            self.cache_outcome, self.cache_problem = "hit", None
            return
        problem = verify_cache(target, _cache_key(target)) if target.exists() else None
        if target.exists() and problem is None:
            self._verified, self.cache_outcome, self.cache_problem = target, "hit", None
            return
        if problem is not None:
            log.warning("%s: the cache %s did not verify (%s); rebuilding it", self.name, target, problem)
        started = time.perf_counter()
        log.info("preparing %s into %s", self.name, target)
        stats_before = {str(p): _stat_key(p) for p in self.source_files()}
        tables = self.read_tables()
        changed = [p for p in self.source_files() if stats_before.get(str(p)) != _stat_key(p)]
        if changed:
            raise DataFormatError(changed[0], None, "the file changed while it was being read; run again")
        interactions, items = _canonicalise(tables, self.name)
        lengths = interactions.group_by("user").len()["len"]
        duplicates = _count_duplicates(interactions, items)
        for reason, count in tables.filtered.items():
            log.warning("%s: %d rows filtered (%s)", self.name, count, reason)
        for reason in (DUPLICATE_EVENTS, DUPLICATE_RAW_IDS):
            if duplicates.get(reason):
                log.warning("%s: %d %s", self.name, duplicates[reason], reason)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        staging.mkdir()
        try:
            interactions.write_parquet(staging / "interactions.parquet")
            items.write_parquet(staging / "items.parquet")
            meta = {
                "name": self.name,
                "signature": self.preprocessing_signature(),
                "cache_key": _cache_key(target),
                "cache_format": CACHE_FORMAT_VERSION,
                "fingerprint": _content_hash(interactions, items),
                "recbench_version": __version__,
                "order_is_time": tables.order_is_time,
                "users": int(lengths.len()),
                "items": int(items.height),
                "interactions": int(interactions.height),
                "filtered": dict(tables.filtered),
                "duplicates": duplicates,
                "notes": list(tables.notes),
                "source_files": [
                    {"path": str(p.resolve()), **record}
                    for p, record in zip(self.source_files(), self._source_records(), strict=True)
                ],
                "tables": {name: _table_record(staging / name) for name in _TABLES},
                "prepare_seconds": round(time.perf_counter() - started, 3),
            }
            (staging / "meta.json").write_text(json.dumps(meta, indent=2))
            _install(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        self._verified = target
        self._meta = None  # a rebuilt cache may differ from what an earlier read saw
        self._items_table = None
        self.cache_outcome = "rebuilt" if problem is not None else "built"
        self.cache_problem = problem

    @property
    def meta(self) -> dict[str, object]:
        """The cache metadata (prepares the cache on first use)."""
        if self._meta is None:
            self.prepare_data()
            self._meta = json.loads((self.cache_path / "meta.json").read_text())
        return self._meta

    @property
    def num_items(self) -> int:
        """N: item ids run 1..N. Linked into models by the CLI."""
        return int(self.meta["items"])  # type: ignore[arg-type]

    @property
    def fingerprint(self) -> str:
        """Hash of the canonical tables' content: equal on every machine that has the same data."""
        return str(self.meta["fingerprint"])

    @property
    def items_table(self) -> polars.DataFrame:
        """The items table (``item`` 1..N in order, plus text columns)."""
        if self._items_table is None:
            self.prepare_data()
            self._items_table = polars.read_parquet(self.cache_path / "items.parquet")
        return self._items_table

    def stats(self) -> DatasetStats:
        self.prepare_data()
        interactions = polars.read_parquet(self.cache_path / "interactions.parquet")
        lengths = interactions.group_by("user").len()["len"]
        items = self.items_table
        with_field = {
            column: int(_non_empty(items[column]).sum()) for column in TEXT_FIELDS if column in items.columns
        }
        users, n_items = int(lengths.len()), items.height
        return DatasetStats(
            name=self.name,
            users=users,
            items=n_items,
            interactions=interactions.height,
            mean_length=float(lengths.mean()),
            median_length=float(lengths.median()),
            density=interactions.height / (users * n_items),
            items_with_field=with_field,
            filtered=dict(self.meta["filtered"]),  # type: ignore[arg-type]
            cache_path=str(self.cache_path),
            fingerprint=self.fingerprint,
            duplicates=dict(self.meta["duplicates"]),  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------------ splits
    def setup(self, stage: str | None = None) -> None:
        if self._flat_items is not None:
            return
        order_is_time = bool(self.meta["order_is_time"])  # prepares the cache when used outside a Trainer
        interactions = polars.read_parquet(self.cache_path / "interactions.parquet")
        users = interactions["user"].to_numpy()
        boundaries = np.flatnonzero(np.diff(users)) + 1
        offsets = np.concatenate([[0], boundaries, [len(users)]])
        self._flat_items = torch.from_numpy(interactions["item"].to_numpy().astype(np.int64))
        self._user_ids = torch.from_numpy(users[offsets[:-1]].astype(np.int64))
        self._offsets = torch.from_numpy(offsets.astype(np.int64))
        order = torch.from_numpy(interactions["order"].to_numpy().astype(np.int64))
        if self.split == "leave_one_out":
            self._split_leave_one_out()
        elif self.split == "session":
            self._split_sessions()
        elif self.split == "temporal":
            if not order_is_time:
                raise ValueError(
                    f"{self.name}: split='temporal' needs real timestamps, but this source only has "
                    "the chronological order of items; use split='leave_one_out'"
                )
            self._split_temporal(order)
        else:
            raise ValueError(f"unknown split {self.split!r}; expected leave_one_out, session or temporal")
        self._val_eval = self._val_cases
        if self.val_subset is not None and self.val_subset < len(self._val_cases):
            generator = torch.Generator().manual_seed(self.split_seed)
            chosen = torch.randperm(len(self._val_cases), generator=generator)[: self.val_subset]
            self._val_eval = self._val_cases.subset(chosen.sort().values)
        log.info("%s split %s: %s", self.name, self.split, self.split_counts)

    def _split_leave_one_out(self) -> None:
        starts, ends = self._offsets[:-1], self._offsets[1:]
        lengths = ends - starts
        has_test, has_val = lengths >= 2, lengths >= 3
        self._test_cases = _Cases(self._user_ids[has_test], starts[has_test], ends[has_test] - 1)
        self._val_cases = _Cases(self._user_ids[has_val], starts[has_val], ends[has_val] - 2)
        self._train_prefixes = (self._user_ids, starts, (ends - 2).clamp(min=starts))
        self._users_without = (int((~has_test).sum()), int((~has_val).sum()))

    def _split_sessions(self) -> None:
        n = len(self._user_ids)
        generator = torch.Generator().manual_seed(self.split_seed)
        permutation = torch.randperm(n, generator=generator)
        n_train = round(n * self.session_fractions[0])
        n_val = round(n * self.session_fractions[1])
        parts = (permutation[:n_train], permutation[n_train : n_train + n_val], permutation[n_train + n_val :])
        train, val, test = (part.sort().values for part in parts)
        starts, ends = self._offsets[:-1], self._offsets[1:]
        self._train_prefixes = (self._user_ids[train], starts[train], ends[train])
        self._val_cases = self._every_prefix(self._user_ids[val], starts[val], ends[val])
        self._test_cases = self._every_prefix(self._user_ids[test], starts[test], ends[test])
        single = (ends - starts) < 2
        self._users_without = (int(single[test].sum()), int(single[val].sum()))

    def _split_temporal(self, order: torch.Tensor) -> None:
        q_val, q_test = (float(q) for q in np.quantile(order.numpy(), self.temporal_quantiles))
        starts, ends = self._offsets[:-1], self._offsets[1:]
        user_of = torch.repeat_interleave(torch.arange(len(starts)), ends - starts)
        position = torch.arange(len(order))
        has_history = position > starts[user_of]
        in_train = order <= q_val
        # Sorted by time within a user, so the training interactions form a prefix.
        train_counts = torch.zeros_like(starts).index_add_(0, user_of, in_train.long())
        train_end = starts + train_counts
        val_mask = (order > q_val) & (order <= q_test) & has_history
        test_mask = (order > q_test) & has_history
        self._train_prefixes = (self._user_ids, starts, train_end)
        self._val_cases = _Cases(self._user_ids[user_of[val_mask]], starts[user_of[val_mask]], position[val_mask])
        self._test_cases = _Cases(
            self._user_ids[user_of[test_mask]], starts[user_of[test_mask]], position[test_mask]
        )
        self._users_without = (
            int(len(starts) - torch.unique(user_of[test_mask]).numel()),
            int(len(starts) - torch.unique(user_of[val_mask]).numel()),
        )

    @staticmethod
    def _every_prefix(user: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> _Cases:
        """One case per position ``p`` in ``start + 1 .. end - 1`` (non-empty history)."""
        counts = (end - start - 1).clamp(min=0)
        row = torch.repeat_interleave(torch.arange(len(start)), counts)
        first = torch.cumsum(counts, 0) - counts
        step = torch.arange(int(counts.sum())) - first[row]
        return _Cases(user[row], start[row], start[row] + 1 + step)

    def _train_pairs(self) -> _Cases:
        user, start, end = self._train_prefixes
        return self._every_prefix(user, start, end)

    def _train_windows(self) -> _Cases:
        """Consecutive windows of ``max_len + 1`` items ending at the prefix end, each target once."""
        user, start, end = self._train_prefixes
        targets = (end - start - 1).clamp(min=0)
        n_windows = (targets + self.max_len - 1) // self.max_len  # ceil
        row = torch.repeat_interleave(torch.arange(len(start)), n_windows)
        first = torch.cumsum(n_windows, 0) - n_windows
        k = torch.arange(int(n_windows.sum())) - first[row]
        window_end = end[row] - k * self.max_len
        window_start = torch.maximum(start[row], window_end - self.max_len - 1)
        return _Cases(user[row], window_start, window_end)

    @property
    def split_counts(self) -> SplitCounts:
        user, start, end = self._train_prefixes
        targets = (end - start - 1).clamp(min=0)
        without_test, without_val = self._users_without
        return SplitCounts(
            train_targets=int(targets.sum()),
            val_cases=len(self._val_cases),
            test_cases=len(self._test_cases),
            users_without_test_case=without_test,
            users_without_val_case=without_val,
            users_without_train_target=int((targets == 0).sum()),
            val_subset=len(self._val_eval) if self._val_eval is not self._val_cases else None,
        )

    def train_item_mask(self) -> torch.Tensor:
        """BoolTensor (N + 1,): items that occur anywhere in a training prefix (row 0 False).

        Item-side fitting (PCA, quantisers) uses only these, so validation/test-only items never
        shape the codebooks.
        """
        return self.train_item_counts() > 0

    def train_item_counts(self) -> torch.Tensor:
        """LongTensor (N + 1,): occurrences of every item in the training prefixes (row 0 is 0);
        the training popularity that orders items sharing a semantic ID."""
        items, _ = self.train_sequences()
        counts = torch.bincount(items, minlength=self.num_items + 1)
        counts[PAD_ID] = 0
        return counts

    def test_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(users, targets)``, each ``(C,)``: the user and target item of every test case, in the
        case order of the per-case test metrics (:attr:`recbench.model.SeqRecModel.test_cases`)."""
        self.setup()
        return self._test_cases.user, self._flat_items[self._test_cases.position]

    def train_sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training prefixes as a flat item array and offsets ``(U + 1,)`` (CSR layout)."""
        self.setup()
        user, start, end = self._train_prefixes
        lengths = (end - start).clamp(min=0)
        row = torch.repeat_interleave(torch.arange(len(start)), lengths)
        first = torch.cumsum(lengths, 0) - lengths
        index = start[row] + torch.arange(int(lengths.sum())) - first[row]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
        return self._flat_items[index], offsets

    # ------------------------------------------------------------------ loaders
    def _resolved_train_format(self) -> Literal["sequence", "pairs"]:
        if self.train_format != "auto":
            return self.train_format
        model = self.trainer.lightning_module if self.trainer is not None else None
        view = getattr(model, "training_view", None)
        if view not in ("sequence", "pairs"):
            raise ValueError(
                "train_format='auto' needs a model with training_view 'sequence' or 'pairs'; "
                "set data.train_format explicitly"
            )
        return view

    def resolved_batch_size(self) -> int:
        """The training batch size: the attached model's recipe (``training_batch_size``) where it
        sets one, else ``batch_size``."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        recipe = getattr(model, "training_batch_size", None)
        if recipe is None:
            return self.batch_size
        if not isinstance(recipe, int) or recipe < 1:
            raise ValueError(f"the model's training_batch_size must be a positive int, got {recipe!r}")
        return recipe

    def train_rows(self) -> tuple[_Cases, torch.Tensor, Literal["sequence", "pairs"]]:
        """The training rows of the resolved view, their real lengths ``(C,)`` and the view.

        A row's real length is what it is trimmed to: the history length (at most ``max_len``) for
        pairs, the window length (at most ``max_len + 1``) for sequences.
        """
        self.setup()
        view = self._resolved_train_format()
        if view == "sequence":
            rows = self._train_windows()
            lengths = rows.position - rows.start  # (C,)
        else:
            rows = self._train_pairs()
            lengths = (rows.position - rows.start).clamp(max=self.max_len)  # (C,)
        return rows, lengths, view

    def train_dataloader(self) -> DataLoader:
        rows, lengths, view = self.train_rows()
        if len(rows) == 0:
            raise ValueError(f"{self.name}: the training split has no targets")
        bucketed = self.length_buckets is not None
        collate_class = _WindowCollate if view == "sequence" else _CaseCollate
        collate = collate_class(self._flat_items, rows, self.max_len, trim=True)
        batch_size = self.resolved_batch_size()
        if not bucketed:
            return DataLoader(
                _IndexDataset(len(rows)),
                batch_size=batch_size,
                shuffle=True,
                collate_fn=collate,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                pin_memory=self.pin_memory,
            )
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = LengthBucketSampler(
            lengths,
            batch_size,
            self.length_buckets,
            seed=torch.initial_seed(),
            num_replicas=world,
            rank=rank,
            targets=(lengths - 1).clamp(min=1) if view == "sequence" else None,
        )
        return DataLoader(
            _IndexDataset(len(rows)),
            batch_size=None,  # the sampler yields whole batches
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    @property
    def pin_memory(self) -> bool:
        """Batches are built in page-locked memory when the trainer runs on CUDA: a copy from pageable
        memory is staged by the driver, which may wait for the kernels already queued (a host-device
        synchronisation per batch); from pinned memory Lightning's ``non_blocking`` copy is truly
        asynchronous, so the host queues the next step while the device runs this one."""
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def _eval_loader(self, cases: _Cases) -> DataLoader:
        dataset = _IndexDataset(len(cases))
        sampler = None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            # Lightning's default DistributedSampler pads by repeating cases; this one never does,
            # so every case is counted exactly once across ranks.
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            sampler=sampler,
            collate_fn=_CaseCollate(self._flat_items, cases, self.max_len, trim=True),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._eval_loader(self._val_eval)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._eval_loader(self._test_cases)

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        return self._eval_loader(self._test_cases)

    def describe(self) -> dict[str, object]:
        """What a result row records about the data."""
        counts = self.split_counts
        return {
            "dataset": self.name,
            "protocol": self.split,
            "fingerprint": self.fingerprint,
            "batch_size": self.resolved_batch_size(),
            "length_buckets": self.length_buckets,
            **asdict(counts),
        }


def _cache_key(directory: Path) -> str:
    return directory.name.rsplit("-", 1)[-1]


def _install(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` directory to ``target``.

    When ``target`` exists it either verifies (another process finished the same cache first: its
    content is identical, keep it) or it is damaged: it is renamed aside (atomic, so readers see
    the old or the new directory, never a mix), replaced, and deleted.
    """
    for _ in range(3):
        try:
            staging.rename(target)
            return
        except OSError:
            if not target.exists():
                continue  # it vanished between the two calls (another process moved it aside)
            if verify_cache(target, _cache_key(target)) is None:
                return
            stale = target.with_name(f".{target.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                target.rename(stale)
            except FileNotFoundError:
                continue  # another process moved it aside first
            shutil.rmtree(stale, ignore_errors=True)
    raise OSError(f"could not install the cache {target}: another process keeps replacing it")


def _content_hash(interactions: polars.DataFrame, items: polars.DataFrame) -> str:
    """Hash of everything a model can read: the interactions and every column of the items table.

    Item columns are hashed by name, type and values (JSON, so text, lists and numbers are all
    covered with one stable encoding; polars' own row hash is not stable across versions).
    """
    digest = hashlib.sha256()
    for column in ("user", "item", "order"):
        digest.update(np.ascontiguousarray(interactions[column].to_numpy(), dtype=np.int64).tobytes())
    digest.update(str(items.height).encode())
    for column in items.columns:
        values = json.dumps(items[column].to_list(), ensure_ascii=False, separators=(",", ":"))
        digest.update(f"\0{column}\0{items[column].dtype}\0".encode())
        digest.update(values.encode())
    return digest.hexdigest()[:16]


def _count_duplicates(interactions: polars.DataFrame, items: polars.DataFrame) -> dict[str, int]:
    """The duplicate counts of the module docstring's rule (all duplicates are kept)."""
    counts = {
        DUPLICATE_EVENTS: interactions.height - interactions.unique(["user", "item", "order"]).height,
        REPEAT_EVENTS: interactions.height - interactions.unique(["user", "item"]).height,
    }
    raw = next((column for column in RAW_ID_COLUMNS if column in items.columns), None)
    if raw is not None:
        ids = items[raw].drop_nulls()
        counts[DUPLICATE_RAW_IDS] = ids.len() - ids.n_unique()
    return counts


def _non_empty(column: polars.Series) -> polars.Series:
    if column.dtype == polars.String:
        return column.is_not_null() & (column.str.strip_chars().str.len_chars() > 0)
    if isinstance(column.dtype, polars.List):
        return column.is_not_null() & (column.list.len() > 0)
    return column.is_not_null()


def _canonicalise(tables: CanonicalTables, name: str) -> tuple[polars.DataFrame, polars.DataFrame]:
    """Check the contract and sort interactions stably by (user, order)."""
    interactions, items = tables.interactions, tables.items
    for column in ("user", "item", "order"):
        if column not in interactions.columns:
            raise ValueError(f"{name}: the interactions table lacks the column {column!r}")
        if interactions[column].null_count():
            raise ValueError(f"{name}: the interactions column {column!r} has missing values")
    if "item" not in items.columns:
        raise ValueError(f"{name}: the items table lacks the column 'item'")
    interactions = interactions.select(
        polars.col("user").cast(polars.Int64), polars.col("item").cast(polars.Int64), polars.col("order").cast(polars.Int64)
    )
    items = items.with_columns(polars.col("item").cast(polars.Int64)).sort("item")
    expected = np.arange(1, items.height + 1)
    if items.height == 0:
        raise ValueError(f"{name}: the items table is empty")
    if not np.array_equal(items["item"].to_numpy(), expected):
        raise ValueError(f"{name}: item ids must be exactly 1..N (N={items.height}) with 0 free for padding")
    if interactions.height == 0:
        raise ValueError(f"{name}: no interactions")
    unknown = interactions.filter((polars.col("item") < 1) | (polars.col("item") > items.height))
    if unknown.height:
        row = unknown.row(0, named=True)
        raise ValueError(
            f"{name}: {unknown.height} interactions name items missing from the item table "
            f"(first: user {row['user']}, item {row['item']})"
        )
    return interactions.sort(["user", "order"], maintain_order=True), items
