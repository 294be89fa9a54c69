"""Amazon 2014 Beauty, Sports and Toys: the 5-core review sets of the S3Rec/P5/TIGER papers.

Provenance and terms: Amazon product data (2014), Julian McAuley's lab at UCSD
(http://jmcauley.ucsd.edu/data/amazon/; R. He and J. McAuley, WWW 2016; J. McAuley et al., SIGIR
2015), for research use. Keep this attribution wherever the data or numbers derived from it go.

Two source formats, chosen by ``source_format``:

``preprocessed`` (``<data_dir>/sequences.txt`` + ``items.jsonl``): the user and item sets every
paper since S3Rec uses. ``sequences.txt`` has one user per line, ``user item item …``, already in
chronological order; there are no timestamps, so ``order`` is the 0-based position in the line and
``order_is_time`` is False (``split="temporal"`` is refused). ``items.jsonl`` has one item per line:
``item`` (1..N, every id exactly once, any line order), ``asin`` (required) and the text that exists:
``title``, ``brand``, ``categories`` (list of lists), ``price``, ``title_fragment``. Every one of these
columns is always present in the items table, null where an item lacks it, so the statistics show
e.g. that Sports has no full titles. Other keys are ignored. ``users.tsv`` (user -> reviewer id) is
not needed and not read. User and item ids are kept as written. Two items with the same ``asin``
are both kept (their ids are as written) and counted in the cache metadata's ``duplicates``. These files reproduce the published
statistics exactly: Beauty 22,363 users / 12,101 items / 198,502 interactions, Sports 35,598 /
18,357 / 296,337, Toys 19,412 / 11,924 / 167,597.

``official`` (``<data_dir>/reviews_<Category>_5.json.gz`` + ``meta_<Category>.json.gz``, Category
one of Beauty, Sports_and_Outdoors, Toys_and_Games): the files as downloaded from the McAuley lab.
- Reviews are strict JSON lines; ``reviewerID``, ``asin`` and ``unixReviewTime`` are required. Every
  review is one interaction (the 5-core files are used as they are: no further filtering, and a
  repeated (user, item) review is kept, since repeat purchases exist).
- User and item ids are assigned 1.. in first-seen order of the reviews file.
- ``order`` is ``unixReviewTime`` (``order_is_time`` True). A user's items are sorted by time with a
  STABLE sort: reviews with the same timestamp (day resolution, so ties are common) keep their
  order in the reviews file, never item id. (The base class does the sort; we hand it the rows in
  file order.)
- Metadata lines are Python dict literals, parsed with ``ast.literal_eval`` (never ``eval``).
  Only lines of reviewed items are parsed in full; the asin of every other line is read with a
  pattern anchored at the opening brace (when ``asin`` is the first key, as in the official files),
  and those lines are counted in ``filtered`` (the category metadata covers ~20x more items than
  the 5-core set). So a malformed line of an item that is not used goes unnoticed; any line the
  pattern does not fit is parsed in full. A second metadata line for the same asin is counted and
  ignored (the first wins). Item text: ``title``, ``brand``, ``categories``, ``price``; reviewed items
  without a metadata line keep null text and are counted in ``notes``.

``auto`` (default) uses the preprocessed files when both exist, else the official files.

Downloading is not automated: the McAuley lab publishes no checksums we could verify a download
against (DESIGN §2), so when files are missing the error names each file, the folder, and where to
get them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np
import polars

from datamodules._io import (
    iter_lines,
    optional_float,
    optional_str,
    optional_str_list_list,
    parse_json_line,
    parse_literal_line,
    read_id_sequences,
    require_int,
    require_str,
)
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

AmazonCategory = Literal["beauty", "sports", "toys"]
AmazonFormat = Literal["auto", "preprocessed", "official"]

#: Our short names -> the category names in the official file names.
OFFICIAL_CATEGORY: dict[str, str] = {
    "beauty": "Beauty",
    "sports": "Sports_and_Outdoors",
    "toys": "Toys_and_Games",
}
AMAZON_SOURCE = (
    "Amazon product data 2014, McAuley lab, UCSD (research use): http://jmcauley.ucsd.edu/data/amazon/ "
    "-> 'Per-category files': the 5-core reviews file reviews_<Category>_5.json.gz and the metadata "
    "file meta_<Category>.json.gz (Category: Beauty, Sports_and_Outdoors, Toys_and_Games). The "
    "preprocessed S3Rec/P5/TIGER sets (sequences.txt + items.jsonl) are described in the recbench "
    "data README."
)

# Text fields of the items table, in a fixed order and type for both formats.
_PREPROCESSED_TEXT: dict[str, polars.DataType] = {
    "title": polars.String(),
    "brand": polars.String(),
    "categories": polars.List(polars.List(polars.String())),
    "price": polars.Float64(),
    "title_fragment": polars.String(),
}
_OFFICIAL_TEXT = {key: dtype for key, dtype in _PREPROCESSED_TEXT.items() if key != "title_fragment"}
# The asin of a metadata line, read without parsing the whole literal. Anchored at the opening
# brace, so text inside other fields can never match; a line where asin is not the first key goes
# through the full parser instead.
_META_ASIN = re.compile(r"""\{\s*u?(?:'asin'|"asin")\s*:\s*u?(?:'([^'\\\n]+)'|"([^"\\\n]+)")""")


class AmazonDataModule(SeqRecDataModule):
    """Amazon 2014 5-core Beauty, Sports or Toys (see the module docstring for formats and rules).

    Args:
        category: ``beauty``, ``sports`` or ``toys``.
        source_format: ``preprocessed`` (sequences.txt + items.jsonl), ``official`` (the McAuley
            lab's reviews and metadata json.gz) or ``auto`` (preprocessed when present).
        data_dir: the folder holding this category's files (default
            ``$RECBENCH_DATA_DIR/amazon/<category>``).
        max_len, split, train_format, batch_size, eval_batch_size, num_workers, val_subset,
        split_seed, session_fractions, temporal_quantiles, cache_dir, length_buckets:
            :class:`~recbench.data.SeqRecDataModule` options.
    """

    parser_version = 1
    source_reference = AMAZON_SOURCE

    def __init__(
        self,
        category: AmazonCategory,
        source_format: AmazonFormat = "auto",
        data_dir: str | None = None,
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
        if category not in OFFICIAL_CATEGORY:
            raise ValueError(f"category must be one of {sorted(OFFICIAL_CATEGORY)}, got {category!r}")
        if source_format not in ("auto", "preprocessed", "official"):
            raise ValueError(f"source_format must be auto, preprocessed or official, got {source_format!r}")
        self.category = category
        self.source_format = source_format
        self.data_dir = data_dir
        # The dataset name in cache directories and result rows is the category (DESIGN §5).
        self.name = category

    # ------------------------------------------------------------------ files
    @property
    def folder(self) -> Path:
        return Path(self.data_dir) if self.data_dir else data_root() / "amazon" / self.category

    def preprocessed_files(self) -> list[Path]:
        return [self.folder / "sequences.txt", self.folder / "items.jsonl"]

    def official_files(self) -> list[Path]:
        name = OFFICIAL_CATEGORY[self.category]
        return [self.folder / f"reviews_{name}_5.json.gz", self.folder / f"meta_{name}.json.gz"]

    def resolved_format(self) -> Literal["preprocessed", "official"] | None:
        """The format that will be read; None when ``auto`` finds neither complete set."""
        if self.source_format != "auto":
            return self.source_format
        if all(p.exists() for p in self.preprocessed_files()):
            return "preprocessed"
        if all(p.exists() for p in self.official_files()):
            return "official"
        return None

    def source_files(self) -> list[Path]:
        chosen = self.resolved_format()
        if chosen == "preprocessed":
            return self.preprocessed_files()
        if chosen == "official":
            return self.official_files()
        # auto with neither set complete: every candidate, so the error lists what is missing.
        return self.preprocessed_files() + self.official_files()

    def download(self, missing: list[Path]) -> None:
        if self.resolved_format() is None:
            where = (
                "source_format='auto' needs either the preprocessed pair (sequences.txt, items.jsonl) "
                f"or the official pair in {self.folder}. " + AMAZON_SOURCE
            )
        else:
            where = f"expected in {self.folder}. " + AMAZON_SOURCE
        raise MissingDataError(f"amazon/{self.category} ({self.source_format})", missing, where)

    def preprocessing_signature(self) -> str:
        return f"category={self.category};format={self.resolved_format()}"

    # ------------------------------------------------------------------ parsing
    def read_tables(self) -> CanonicalTables:
        chosen = self.resolved_format()
        if chosen is None:  # cache_path raised already; this keeps read_tables safe on its own
            self.download([p for p in self.source_files() if not p.exists()])
        if chosen == "preprocessed":
            return read_preprocessed(*self.preprocessed_files())
        return read_official(*self.official_files())


def read_preprocessed(sequences_path: Path, items_path: Path) -> CanonicalTables:
    """``sequences.txt`` + ``items.jsonl`` -> canonical tables (ids as written, order = position)."""
    items = _read_items_jsonl(items_path)
    sequences = read_id_sequences(sequences_path, with_user=True)
    sequences.check_items(sequences_path, items.height)
    interactions = polars.DataFrame(
        {
            "user": np.repeat(sequences.keys, sequences.lengths),
            "item": sequences.items,
            "order": sequences.positions(),
        }
    )
    unused = items.height - int(np.unique(sequences.items).size)
    notes = [
        "source: preprocessed S3Rec/P5/TIGER 5-core set (sequences.txt + items.jsonl); order = position "
        "in the chronological line, no timestamps",
    ]
    if unused:
        notes.append(f"{unused} items of items.jsonl occur in no sequence (kept in the item table)")
    return CanonicalTables(interactions=interactions, items=items, order_is_time=False, notes=notes)


def _read_items_jsonl(path: Path) -> polars.DataFrame:
    rows: dict[str, list] = {"item": [], "asin": [], **{key: [] for key in _PREPROCESSED_TEXT}}
    first_line: dict[int, int] = {}
    for line, text in iter_lines(path):
        if not text.strip():
            raise DataFormatError(path, line, "empty line")
        record = parse_json_line(path, line, text)
        item = require_int(path, line, record, "item")
        if item < 1:
            raise DataFormatError(path, line, f"item id {item} is not positive (0 is padding)")
        if item in first_line:
            raise DataFormatError(path, line, f"item {item} appears again (first at line {first_line[item]})")
        first_line[item] = line
        rows["item"].append(item)
        rows["asin"].append(require_str(path, line, record, "asin"))
        for key in ("title", "brand", "title_fragment"):
            rows[key].append(optional_str(path, line, record, key))
        rows["categories"].append(optional_str_list_list(path, line, record, "categories"))
        rows["price"].append(optional_float(path, line, record, "price"))
    n = len(rows["item"])
    if max(first_line) != n:
        absent = sorted(set(range(1, n + 1)) - set(first_line))
        raise DataFormatError(
            path, None, f"item ids must be exactly 1..N: {len(absent)} ids are absent (first: {absent[0]})"
        )
    schema = {"item": polars.Int64(), "asin": polars.String(), **_PREPROCESSED_TEXT}
    return polars.DataFrame(rows, schema=schema).sort("item")


def read_official(reviews_path: Path, meta_path: Path) -> CanonicalTables:
    """The McAuley lab's 5-core reviews + metadata -> canonical tables (see the module docstring)."""
    user_ids: dict[str, int] = {}
    item_ids: dict[str, int] = {}
    users: list[int] = []
    items: list[int] = []
    times: list[int] = []
    for line, text in iter_lines(reviews_path):
        if not text.strip():
            raise DataFormatError(reviews_path, line, "empty line")
        record = parse_json_line(reviews_path, line, text)
        reviewer = require_str(reviews_path, line, record, "reviewerID")
        asin = require_str(reviews_path, line, record, "asin")
        time = require_int(reviews_path, line, record, "unixReviewTime")
        # First-seen ids: setdefault keeps the id of the first occurrence.
        users.append(user_ids.setdefault(reviewer, len(user_ids) + 1))
        items.append(item_ids.setdefault(asin, len(item_ids) + 1))
        times.append(time)
    interactions = polars.DataFrame(
        {"user": users, "item": items, "order": times},
        schema={"user": polars.Int64, "item": polars.Int64, "order": polars.Int64},
    )

    text_of: dict[str, dict[str, object]] = {}
    not_reviewed = duplicates = 0
    for line, text in iter_lines(meta_path):
        if not text.strip():
            raise DataFormatError(meta_path, line, "empty line")
        match = _META_ASIN.match(text)
        if match is not None and (match.group(1) or match.group(2)) not in item_ids:
            not_reviewed += 1
            continue
        record = parse_literal_line(meta_path, line, text)
        asin = require_str(meta_path, line, record, "asin")
        if asin not in item_ids:
            not_reviewed += 1
            continue
        if asin in text_of:
            duplicates += 1
            continue
        text_of[asin] = {
            "title": optional_str(meta_path, line, record, "title"),
            "brand": optional_str(meta_path, line, record, "brand"),
            "categories": optional_str_list_list(meta_path, line, record, "categories"),
            "price": optional_float(meta_path, line, record, "price"),
        }

    asins = list(item_ids)  # insertion order = item id order
    empty: dict[str, object] = {}
    columns: dict[str, list] = {"item": list(range(1, len(asins) + 1)), "asin": asins}
    for key in _OFFICIAL_TEXT:
        columns[key] = [text_of.get(asin, empty).get(key) for asin in asins]
    items_table = polars.DataFrame(
        columns, schema={"item": polars.Int64(), "asin": polars.String(), **_OFFICIAL_TEXT}
    )
    filtered: dict[str, int] = {}
    if not_reviewed:
        filtered["metadata lines of items not in the 5-core reviews (not used)"] = not_reviewed
    if duplicates:
        filtered["repeated metadata lines for one asin (first kept)"] = duplicates
    notes = [
        f"source: official McAuley 2014 files {reviews_path.name} + {meta_path.name}; ids in first-seen "
        "order; order = unixReviewTime; ties keep file order",
    ]
    without_meta = len(asins) - len(text_of)
    if without_meta:
        notes.append(f"{without_meta} reviewed items have no metadata line (their text is null)")
    return CanonicalTables(
        interactions=interactions, items=items_table, order_is_time=True, filtered=filtered, notes=notes
    )
