"""YooChoose (RecSys Challenge 2015) click sessions: DreamRec's RC15 subset, GRU4Rec TSVs, or the
official .dat files.

Provenance and terms: the YooChoose data set of the ACM RecSys Challenge 2015
(https://recsys.acm.org/recsys15/challenge/; D. Ben-Shimon et al., RecSys 2015), released for
research, non-commercial use only. Keep this attribution wherever the data or numbers derived from
it go. Each "user" of recbench is one session here.

Protocol defaults: ``split="session"`` (sessions split 8:1:1 by a seeded permutation, every prefix
of a held-out session is an evaluation case: the DreamRec protocol) and ``max_len=10``.

Source formats (``source_format``):

``rc15`` (``<data_dir>/rc15/valid_sessions.txt`` + ``test_sessions.txt``): the real validation and
test sessions of DreamRec's YooChoose data, one session per line, items in click order, ids
1..9,514 (DreamRec's id + 1). These 25,694 sessions (12,847 + 12,847; 57,062 + 55,245 clicks) are
the AVAILABLE SUBSET, not the full published set (9,514 items, 128,468 sessions, 539,436
interactions: DreamRec's training split is not available); ``notes`` says so, and the split is
re-done over the subset by ``split="session"``. Sessions are numbered 1.. in file order (valid file
first). ``order`` is the position in the line (``order_is_time`` False). Choice: the item table
keeps DreamRec's ids 1..9,514 as given, although only 4,721 of them occur in the subset, so item
ids (and ``num_items``) match DreamRec's; items that never occur are simply never targets (their
count is in ``notes``). An id above 9,514 is an error.

``clicks_tsv`` (``<data_dir>/clicks-100k/train.tsv`` + ``test.tsv``): the GRU4Rec format, a header
``SessionId<TAB>ItemId<TAB>Time`` (further columns ignored), ``Time`` in (fractional) unix
seconds. Both files are read, train first; a session id names one session across both files, and
the session id is kept as the user id. ``order`` is the time in milliseconds (``order_is_time``
True); clicks of a session are sorted by time with a STABLE sort, so equal times keep file order.
Item ids are renumbered 1.. densely in first-seen order of the files (train then test), and the raw
id is kept in the items table as ``raw_item_id``.

``official`` (``<data_dir>/yoochoose-clicks.dat``): the challenge's CSV without header: session id,
ISO timestamp (``2014-04-07T10:51:09.277Z``), item id, category; every row must have exactly
these 4 non-empty fields (buys: session, timestamp, item, price, quantity: 5), so a wider or
narrower row (a CR-only file read as one wide row, a buys row in the clicks file) is a located
error instead of silently losing what the other fields hold. Same rules as ``clicks_tsv``
(order = timestamp in ms, stable ties, items renumbered in first-seen order, ``raw_item_id``
kept). The category column is not used: it describes the click context ("0", "S" for a special
offer, 1..12 or a brand id) and changes between clicks of one item, so it is not item text.
``yoochoose-buys.dat`` is not read by default. With ``include_buys=True`` it is required, and its
purchases (session, timestamp, item, price, quantity) become extra events of their sessions, as in
the SQN/DreamRec RC15 construction; a purchase with the same timestamp as a click comes after it
(file order: clicks, then buys).

``auto`` (default) picks the first complete set of ``rc15``, ``official``, ``clicks_tsv``: the
DreamRec subset first (the published protocol), then the full official data, then the 100k sample.

Dataset name (cache directories, result rows): ``yoochoose`` for rc15, ``yoochoose-official`` and
``yoochoose-clicks-tsv`` for the others: different session sets, whose numbers must not be compared.

Filtering: none by default. ``min_session_length`` drops sessions with fewer clicks (GRU4Rec used
2, SQN/DreamRec 3); the dropped clicks are counted in ``filtered`` and the dropped sessions in
``notes``. Sessions of length 1 are otherwise kept: they give no case, and the split counts say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import polars

from datamodules._io import cast_int_column, read_delimited, read_id_sequences
from recbench.data import (
    DEFAULT_LENGTH_BUCKETS,
    CanonicalTables,
    DataFormatError,
    MissingDataError,
    SeqRecDataModule,
    SplitName,
    TrainFormat,
    data_root,
)

YooChooseFormat = Literal["auto", "rc15", "clicks_tsv", "official"]

#: DreamRec's item count (its ids 0..9513, stored here as 1..9514).
RC15_NUM_ITEMS = 9_514
#: |Time| limit of the TSV reader: milliseconds below it fit int64 (2**63 ms is about 9.2e15 s).
_MAX_TIME_SECONDS = 9e15
#: Every field of a row of the official files, in order (a row must have exactly these).
CLICKS_DAT_COLUMNS = ["session", "timestamp", "item", "category"]
BUYS_DAT_COLUMNS = ["session", "timestamp", "item", "price", "quantity"]
#: The full DreamRec/SQN RC15 set, of which only the validation and test sessions are available.
RC15_PUBLISHED = {"items": 9_514, "sessions": 128_468, "interactions": 539_436}

YOOCHOOSE_SOURCE = (
    "RecSys Challenge 2015 YooChoose data (research, non-commercial use): https://recsys.acm.org/recsys15/challenge/ "
    "(yoochoose-clicks.dat, yoochoose-buys.dat). rc15/*_sessions.txt: the validation and test sessions of "
    "DreamRec's release (https://github.com/YangZhengyi98/DreamRec); clicks-100k/*.tsv: a sample in the GRU4Rec "
    "format (https://github.com/hidasib/GRU4Rec); see the recbench data README."
)


class YooChooseDataModule(SeqRecDataModule):
    """YooChoose sessions (see the module docstring for the formats and every rule).

    Args:
        source_format: ``rc15``, ``clicks_tsv``, ``official`` or ``auto``.
        data_dir: the folder holding the YooChoose files (default ``$RECBENCH_DATA_DIR/yoochoose``).
        include_buys: ``official`` only: add the purchases of ``yoochoose-buys.dat`` as events.
        min_session_length: drop sessions with fewer clicks than this (1 keeps every session).
        max_len, split, train_format, batch_size, eval_batch_size, num_workers, val_subset,
        split_seed, session_fractions, temporal_quantiles, cache_dir, length_buckets:
            :class:`~recbench.data.SeqRecDataModule` options (here ``max_len=10``,
            ``split="session"`` by default).
    """

    parser_version = 1
    source_reference = YOOCHOOSE_SOURCE

    def __init__(
        self,
        source_format: YooChooseFormat = "auto",
        data_dir: str | None = None,
        include_buys: bool = False,
        min_session_length: int = 1,
        max_len: int = 10,
        split: SplitName = "session",
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
        super().__init__(
            max_len=max_len,
            split=split,
            train_format=train_format,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            val_subset=val_subset,
            split_seed=split_seed,
            session_fractions=session_fractions,
            temporal_quantiles=temporal_quantiles,
            cache_dir=cache_dir,
            length_buckets=length_buckets,
        )
        if source_format not in ("auto", "rc15", "clicks_tsv", "official"):
            raise ValueError(
                f"source_format must be auto, rc15, clicks_tsv or official, got {source_format!r}"
            )
        if min_session_length < 1:
            raise ValueError(f"min_session_length must be >= 1, got {min_session_length}")
        if include_buys and source_format not in ("auto", "official"):
            raise ValueError(f"include_buys applies to the official files only, not {source_format!r}")
        self.source_format = source_format
        self.data_dir = data_dir
        self.include_buys = include_buys
        self.min_session_length = min_session_length

    @property
    def name(self) -> str:  # type: ignore[override]
        """``yoochoose`` for the rc15 subset (the leaderboard's YooChoose); the other sources are
        different session sets, named apart so their result rows never mix with it."""
        chosen = self.resolved_format()
        return {"official": "yoochoose-official", "clicks_tsv": "yoochoose-clicks-tsv"}.get(
            chosen or "", "yoochoose"
        )

    @property
    def folder(self) -> Path:
        return Path(self.data_dir) if self.data_dir else data_root() / "yoochoose"

    def files_of(self, source_format: Literal["rc15", "clicks_tsv", "official"]) -> list[Path]:
        if source_format == "rc15":
            return [self.folder / "rc15" / "valid_sessions.txt", self.folder / "rc15" / "test_sessions.txt"]
        if source_format == "clicks_tsv":
            return [self.folder / "clicks-100k" / "train.tsv", self.folder / "clicks-100k" / "test.tsv"]
        files = [self.folder / "yoochoose-clicks.dat"]
        return files + [self.folder / "yoochoose-buys.dat"] if self.include_buys else files

    def resolved_format(self) -> Literal["rc15", "clicks_tsv", "official"] | None:
        if self.source_format != "auto":
            return self.source_format
        for candidate in ("rc15", "official", "clicks_tsv"):
            if all(p.exists() for p in self.files_of(candidate)):
                return candidate
        return None

    def source_files(self) -> list[Path]:
        chosen = self.resolved_format()
        if chosen is not None:
            return self.files_of(chosen)
        return self.files_of("rc15") + self.files_of("official") + self.files_of("clicks_tsv")

    def download(self, missing: list[Path]) -> None:
        where = f"expected in {self.folder}. " + YOOCHOOSE_SOURCE
        if self.resolved_format() is None:
            where = (
                f"source_format='auto' needs one complete set (rc15, official or clicks_tsv) in {self.folder}. "
                + YOOCHOOSE_SOURCE
            )
        raise MissingDataError(f"yoochoose ({self.source_format})", missing, where)

    def preprocessing_signature(self) -> str:
        chosen = self.resolved_format()
        buys = self.include_buys and chosen == "official"
        return f"format={chosen};include_buys={buys};min_session_length={self.min_session_length}"

    def read_tables(self) -> CanonicalTables:
        chosen = self.resolved_format()
        if chosen is None:
            self.download([p for p in self.source_files() if not p.exists()])
        if chosen == "rc15":
            tables = read_rc15(*self.files_of("rc15"))
        elif chosen == "clicks_tsv":
            tables = read_clicks_tsv(self.files_of("clicks_tsv"))
        else:
            clicks, *buys = self.files_of("official")
            tables = read_official(clicks, buys[0] if buys else None)
        if self.include_buys and chosen != "official":
            # auto resolved to a source without purchases: say so instead of ignoring the option.
            tables.notes.append(f"include_buys=True has no effect: the {chosen} files have no purchases")
        return drop_short_sessions(tables, self.min_session_length, renumber_items=chosen != "rc15")


def read_rc15(*paths: Path) -> CanonicalTables:
    """DreamRec's session files (``item item …`` per line) -> tables with items 1..9,514."""
    users, items, orders = [], [], []
    offset = 0
    counts = []
    for path in paths:
        sequences = read_id_sequences(path, with_user=False)
        sequences.check_items(path, RC15_NUM_ITEMS)
        users.append(np.repeat(sequences.keys + offset, sequences.lengths))
        items.append(sequences.items)
        orders.append(sequences.positions())
        offset += len(sequences.keys)
        counts.append(f"{path.name}: {len(sequences.keys)} sessions, {len(sequences.items)} clicks")
    interactions = polars.DataFrame(
        {"user": np.concatenate(users), "item": np.concatenate(items), "order": np.concatenate(orders)}
    )
    occurring = interactions["item"].n_unique()
    notes = [
        "source: DreamRec RC15 validation + test sessions, the AVAILABLE SUBSET of YooChoose RC15, not the full "
        f"published set ({RC15_PUBLISHED['items']:,} items, {RC15_PUBLISHED['sessions']:,} sessions, "
        f"{RC15_PUBLISHED['interactions']:,} interactions); split re-done over these sessions",
        "; ".join(counts) + "; sessions numbered in file order; order = position in the session",
        f"item table keeps DreamRec's ids 1..{RC15_NUM_ITEMS}; {RC15_NUM_ITEMS - occurring} of them occur in no session",
    ]
    items_table = polars.DataFrame({"item": np.arange(1, RC15_NUM_ITEMS + 1, dtype=np.int64)})
    return CanonicalTables(interactions=interactions, items=items_table, order_is_time=False, notes=notes)


def _renumber_items(events: polars.DataFrame) -> tuple[polars.DataFrame, polars.DataFrame]:
    """Raw item ids -> 1..N in first-seen order of ``events`` (row order); returns (events, items)."""
    raw = events["raw_item_id"].unique(maintain_order=True)
    dense = np.arange(1, raw.len() + 1, dtype=np.int64)
    events = events.with_columns(
        polars.col("raw_item_id").replace_strict(raw, dense, return_dtype=polars.Int64).alias("item")
    )
    return events, polars.DataFrame({"item": dense, "raw_item_id": raw})


def read_clicks_tsv(paths: list[Path]) -> CanonicalTables:
    """GRU4Rec TSV files (``SessionId``, ``ItemId``, ``Time`` in unix seconds) -> tables."""
    frames = []
    for path in paths:
        frame = read_delimited(
            path, "\t", ["SessionId", "ItemId", "Time"], header=["SessionId", "ItemId", "Time"]
        )
        time = frame["Time"].str.strip_chars().cast(polars.Float64, strict=False)
        bad = time.is_null() | ~time.is_finite()
        if bad.any():
            row = frame.filter(bad).row(0, named=True)
            raise DataFormatError(path, row["line"], f"Time must be a number of seconds, got {row['Time']!r}")
        # ``order`` is Int64 milliseconds: a larger time would overflow inside polars' cast.
        too_large = time.abs() >= _MAX_TIME_SECONDS
        if too_large.any():
            row = frame.filter(too_large).row(0, named=True)
            raise DataFormatError(
                path, row["line"], f"Time is out of range (|Time| must be below {_MAX_TIME_SECONDS:.0e} s), got {row['Time'][:40]!r}"
            )
        frames.append(
            polars.DataFrame(
                {
                    "user": cast_int_column(frame, path, "SessionId", "session id"),
                    "raw_item_id": cast_int_column(frame, path, "ItemId", "item id"),
                    # Milliseconds keep the sub-second order of the file's fractional seconds.
                    "order": (time * 1000).round(0).cast(polars.Int64),
                }
            )
        )
    events, items = _renumber_items(polars.concat(frames))
    notes = [
        f"source: GRU4Rec TSV files {', '.join(p.name for p in paths)}; user = SessionId; order = Time in ms; "
        "ties keep file order; items renumbered in first-seen order (raw id in raw_item_id)",
    ]
    return CanonicalTables(
        interactions=events.select("user", "item", "order"), items=items, order_is_time=True, notes=notes
    )


def _read_dat(path: Path, columns: list[str]) -> polars.DataFrame:
    frame = read_delimited(path, ",", columns, header=None)
    stamp = (
        frame["timestamp"]
        .str.strip_chars()
        .str.to_datetime("%Y-%m-%dT%H:%M:%S%.fZ", time_unit="ms", strict=False)
    )
    if stamp.is_null().any():
        row = frame.filter(stamp.is_null()).row(0, named=True)
        raise DataFormatError(
            path,
            row["line"],
            f"timestamp must be ISO 8601 like 2014-04-07T10:51:09.277Z, got {row['timestamp']!r}",
        )
    return polars.DataFrame(
        {
            "user": cast_int_column(frame, path, "session", "session id"),
            "raw_item_id": cast_int_column(frame, path, "item", "item id"),
            "order": stamp.dt.epoch("ms").cast(polars.Int64),
        }
    )


def read_official(clicks_path: Path, buys_path: Path | None) -> CanonicalTables:
    """``yoochoose-clicks.dat`` (+ optionally ``yoochoose-buys.dat``) -> tables."""
    frames = [_read_dat(clicks_path, CLICKS_DAT_COLUMNS)]
    notes = [
        f"source: official RecSys Challenge 2015 {clicks_path.name}; user = session id; order = timestamp in ms; "
        "ties keep file order; items renumbered in first-seen order (raw id in raw_item_id); category column unused",
    ]
    if buys_path is not None:
        buys = _read_dat(buys_path, BUYS_DAT_COLUMNS)
        frames.append(buys)
        notes.append(
            f"{buys.height} purchases from {buys_path.name} added as events (after clicks at equal times)"
        )
    else:
        notes.append("yoochoose-buys.dat not used (include_buys=False)")
    events, items = _renumber_items(polars.concat(frames))
    return CanonicalTables(
        interactions=events.select("user", "item", "order"), items=items, order_is_time=True, notes=notes
    )


def drop_short_sessions(tables: CanonicalTables, min_length: int, renumber_items: bool) -> CanonicalTables:
    """Drop sessions with fewer than ``min_length`` events, counting them; renumber items if asked."""
    if min_length <= 1:
        return tables
    interactions = tables.interactions
    kept = interactions.filter(polars.len().over("user") >= min_length)
    dropped = interactions.height - kept.height
    if dropped == 0:
        return tables
    dropped_sessions = interactions["user"].n_unique() - kept["user"].n_unique()
    filtered = dict(tables.filtered)
    filtered[f"clicks of sessions shorter than {min_length}"] = dropped
    notes = [
        *tables.notes,
        f"{dropped_sessions} sessions shorter than {min_length} dropped ({dropped} clicks)",
    ]
    items = tables.items
    if renumber_items:
        # Keep ids dense 1..N over the remaining items, still in first-seen order.
        raw_of = dict(zip(items["item"].to_list(), items["raw_item_id"].to_list(), strict=True))
        kept = kept.with_columns(
            polars.col("item").replace_strict(raw_of, return_dtype=polars.Int64).alias("raw_item_id")
        )
        kept, items = _renumber_items(kept)
        kept = kept.select("user", "item", "order")
    return CanonicalTables(
        interactions=kept, items=items, order_is_time=tables.order_is_time, filtered=filtered, notes=notes
    )
