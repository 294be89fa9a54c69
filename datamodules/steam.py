"""Steam: the SETRec interaction set, or the official UCSD Steam reviews and game metadata.

Provenance and terms: the Steam data sets of Julian McAuley's lab at UCSD
(https://cseweb.ucsd.edu/~jmcauley/datasets.html#steam_data; W.-C. Kang and J. McAuley, ICDM 2018
(SASRec); M. Wan and J. McAuley, RecSys 2018; A. Pathak et al., RecSys 2017), for research use. The
``setrec`` interaction set is the one released with SETRec, derived from the same UCSD data. Keep
this attribution wherever the data or numbers derived from it go.

Source formats (``source_format``):

``setrec`` (``<data_dir>/setrec/sequences.txt``): one user per line, ``user item item …``, in
chronological order; 32,919 users, 14,330 items, 1,436,230 interactions, at least 20 per user. No
timestamps: ``order`` is the 0-based position in the line (``order_is_time`` False). Its item ids
do NOT map to Steam app ids (that map was not released), so the items table has only ``item``
(1..the largest id in the file) and no text; this is written into ``CanonicalTables.notes``, and
item-side models build their semantic IDs from collaborative embeddings instead (DESIGN §4). The
released ``setrec/{train,valid,test}.txt`` (a global time cut of the same lists) are not read: the
split is recbench's own (``split=``), the same for every model.

``official`` (``<data_dir>/steam_reviews.json.gz`` + ``<data_dir>/steam_games.json.gz``): the UCSD
files behind the SASRec/BERT4Rec Steam set.
- Reviews: one Python dict literal per line with ``username`` (the user key, as SASRec used it),
  ``product_id`` (the app id, digits) and ``date`` (``YYYY-MM-DD``), all required. ``order`` is the
  date as unix seconds at 00:00 UTC (``order_is_time`` True). Many reviews share a day: a user's
  items are sorted with a STABLE sort, so ties keep file order, never item id.
- k-core: users and items with fewer than ``min_interactions`` (default 5, SASRec's rule) reviews
  are removed, repeatedly, until every remaining user and item has at least that many; the removed
  interactions are counted in ``filtered`` (by user rule and by item rule). A repeated
  (user, app) review is kept (one interaction per review).
- Ids: users and items numbered 1.. in first-seen order of the reviews file, after filtering.
- Games: ``steam_games.json.gz`` (32,135 Python-literal lines in the real file) gives ``title``
  (``app_name``, else ``title``), ``genres`` and ``tags`` (lists) and ``price``, joined by app id.
  ``price`` is kept as text because the file mixes numbers (formatted with 2 decimals) with
  labels such as "Free To Play", which carry meaning for a text encoder. Two lines of the real
  file lack ``id``: the app id is then read from the store ``url`` (``/app/<id>/``) when it has
  one; a line with neither, a second line for an app id (the first wins) and games that no
  remaining review names are counted in ``filtered``. Reviewed apps without a games line keep
  null text (counted in ``notes``).
- The Australian user reviews (``australian_user_reviews``) are not a source here: few users have
  five or more dated reviews (3,334 in the copy under shared/data), too sparse for this benchmark.

``auto`` (default) reads ``setrec`` when its file exists, else ``official``.

Dataset name (cache directories, result rows): ``steam`` for setrec, ``steam-official`` for the
official files, because the two are different data sets whose numbers must not be compared.

Speed: ``setrec`` is read fully vectorised (under a second for 1.4M interactions). Review lines of
the official file are flat dict literals (every value a string, number or boolean); a line that an
exact regular expression of Python's literal syntax matches in full is read with two C-level regex
passes, every other line with ``ast.literal_eval``, so the result is the same as parsing every line
in full (``eval`` is never used), about 10x faster.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars

from datamodules._io import (
    iter_lines,
    optional_str,
    optional_str_list,
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

SteamFormat = Literal["auto", "setrec", "official"]

STEAM_SOURCE = (
    "Steam data, McAuley lab, UCSD (research use): https://cseweb.ucsd.edu/~jmcauley/datasets.html#steam_data "
    "(steam_reviews.json.gz: 'Version 2: Review Data'; steam_games.json.gz: 'Version 2: Item metadata'). "
    "The setrec set (setrec/sequences.txt) comes from the SETRec release, as described in the recbench "
    "data README."
)

_GAME_TEXT: dict[str, polars.DataType] = {
    "title": polars.String(),
    "genres": polars.List(polars.String()),
    "tags": polars.List(polars.String()),
    "price": polars.String(),
}
_APP_IN_URL = re.compile(r"/app/(\d+)")
# Flat dict literals (every value a string, number, True, False or None), as the review lines are.
# The string alternatives follow Python's lexer (escapes included; written as "unrolled loops" so the
# regex engine runs through long review texts in tight character-class loops) and the keys/values are matched in
# sequence from the opening to the closing brace, so a full match is exactly how Python reads the
# line; anything else (a list value, a trailing comma, an implicit string concatenation) fails the
# match and goes to ast.literal_eval instead.
_SCALAR = r"""u?'[^'\\\n]*(?:\\.[^'\\\n]*)*'|u?"[^"\\\n]*(?:\\.[^"\\\n]*)*"|-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?|True|False|None"""
_KEY = r"""u?(?:'\w+'|"\w+")"""
_FLAT_DICT = re.compile(rf"""\{{\s*(?:{_KEY}\s*:\s*(?:{_SCALAR})\s*,\s*)*{_KEY}\s*:\s*(?:{_SCALAR})\s*\}}""")
# Within a line that _FLAT_DICT matched in full, the entries, in order: separators are only blanks
# and commas, which cannot start a key, so findall meets every key and nothing inside a value.
_ENTRY = re.compile(rf"""u?(?:'(\w+)'|"(\w+)")\s*:\s*({_SCALAR})""")
_REVIEW_KEYS = ("username", "product_id", "date")


class SteamDataModule(SeqRecDataModule):
    """Steam (see the module docstring for the formats and every rule).

    Args:
        source_format: ``setrec``, ``official`` or ``auto`` (setrec when present).
        data_dir: the folder holding the Steam files (default ``$RECBENCH_DATA_DIR/steam``).
        min_interactions: the k of the k-core filter on the official reviews (ignored by setrec).
        max_len, split, train_format, batch_size, eval_batch_size, num_workers, val_subset,
        split_seed, session_fractions, temporal_quantiles, cache_dir, length_buckets:
            :class:`~recbench.data.SeqRecDataModule` options.
    """

    parser_version = 1
    source_reference = STEAM_SOURCE

    def __init__(
        self,
        source_format: SteamFormat = "auto",
        data_dir: str | None = None,
        min_interactions: int = 5,
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
        if source_format not in ("auto", "setrec", "official"):
            raise ValueError(f"source_format must be auto, setrec or official, got {source_format!r}")
        if min_interactions < 1:
            raise ValueError(f"min_interactions must be >= 1, got {min_interactions}")
        self.source_format = source_format
        self.data_dir = data_dir
        self.min_interactions = min_interactions

    @property
    def name(self) -> str:  # type: ignore[override]
        """``steam`` for the setrec set (the leaderboard's Steam), ``steam-official`` for the UCSD
        reviews: different user and item sets, so their result rows must never share a file."""
        return "steam-official" if self.resolved_format() == "official" else "steam"

    @property
    def folder(self) -> Path:
        return Path(self.data_dir) if self.data_dir else data_root() / "steam"

    def setrec_files(self) -> list[Path]:
        return [self.folder / "setrec" / "sequences.txt"]

    def official_files(self) -> list[Path]:
        return [self.folder / "steam_reviews.json.gz", self.folder / "steam_games.json.gz"]

    def resolved_format(self) -> Literal["setrec", "official"] | None:
        if self.source_format != "auto":
            return self.source_format
        if all(p.exists() for p in self.setrec_files()):
            return "setrec"
        if all(p.exists() for p in self.official_files()):
            return "official"
        return None

    def source_files(self) -> list[Path]:
        chosen = self.resolved_format()
        if chosen == "setrec":
            return self.setrec_files()
        if chosen == "official":
            return self.official_files()
        return self.setrec_files() + self.official_files()

    def download(self, missing: list[Path]) -> None:
        where = f"expected in {self.folder}. " + STEAM_SOURCE
        if self.resolved_format() is None:
            where = (
                f"source_format='auto' needs either setrec/sequences.txt or steam_reviews.json.gz + "
                f"steam_games.json.gz in {self.folder}. " + STEAM_SOURCE
            )
        raise MissingDataError(f"steam ({self.source_format})", missing, where)

    def preprocessing_signature(self) -> str:
        chosen = self.resolved_format()
        if chosen == "official":
            return f"format=official;min_interactions={self.min_interactions}"
        return f"format={chosen}"

    def read_tables(self) -> CanonicalTables:
        chosen = self.resolved_format()
        if chosen is None:
            self.download([p for p in self.source_files() if not p.exists()])
        if chosen == "setrec":
            return read_setrec(self.setrec_files()[0])
        reviews, games = self.official_files()
        return read_official(reviews, games, self.min_interactions)


# ---------------------------------------------------------------------- setrec
def read_setrec(path: Path) -> CanonicalTables:
    """``user item item …`` lines -> tables; items 1..max id, no text."""
    sequences = read_id_sequences(path, with_user=True)
    n_items = int(sequences.items.max())
    sequences.check_items(path, n_items)  # ids < 1 (0 is padding) are errors
    interactions = polars.DataFrame(
        {
            "user": np.repeat(sequences.keys, sequences.lengths),
            "item": sequences.items,
            "order": sequences.positions(),
        }
    )
    items = polars.DataFrame({"item": np.arange(1, n_items + 1, dtype=np.int64)})
    notes = [
        "source: SETRec Steam interaction set (setrec/sequences.txt); order = position in the "
        "chronological line, no timestamps",
        "no item text: setrec item ids do not map to Steam app ids, so the items table has only 'item'",
    ]
    unused = n_items - int(np.unique(sequences.items).size)
    if unused:
        notes.append(f"{unused} item ids in 1..{n_items} occur in no sequence (kept in the item table)")
    return CanonicalTables(interactions=interactions, items=items, order_is_time=False, notes=notes)


# ---------------------------------------------------------------------- games
@dataclass(frozen=True)
class SteamGames:
    """The parsed ``steam_games.json.gz``.

    ``table`` has one row per line: ``line``, ``app_id`` (Int64; from ``id``, else from the store
    url, else null), ``app_id_from`` (``id``, ``url`` or null), ``title`` (``app_name``, else
    ``title``), ``genres``, ``tags``, ``specs`` (lists), ``price`` (text), ``developer``,
    ``publisher``, ``release_date``. ``field_counts`` says how many lines carry each raw key with a
    non-null value.
    """

    table: polars.DataFrame
    field_counts: dict[str, int]

    @property
    def lines(self) -> int:
        return self.table.height


def read_steam_games(path: Path) -> SteamGames:
    """Parse the official UCSD ``steam_games.json.gz`` (Python dict literals, one per line)."""
    counts: dict[str, int] = {}
    rows: dict[str, list] = {
        key: []
        for key in (
            "line",
            "app_id",
            "app_id_from",
            "title",
            "genres",
            "tags",
            "specs",
            "price",
            "developer",
            "publisher",
            "release_date",
        )
    }
    for line, text in iter_lines(path):
        if not text.strip():
            raise DataFormatError(path, line, "empty line")
        record = parse_literal_line(path, line, text)
        for key, value in record.items():
            if value is not None:
                counts[key] = counts.get(key, 0) + 1
        app_id, source = None, None
        if record.get("id") is not None:
            app_id, source = require_int(path, line, record, "id"), "id"
        else:
            match = _APP_IN_URL.search(optional_str(path, line, record, "url") or "")
            if match:
                app_id, source = int(match.group(1)), "url"
        rows["line"].append(line)
        rows["app_id"].append(app_id)
        rows["app_id_from"].append(source)
        title = optional_str(path, line, record, "app_name")
        rows["title"].append(title if title else optional_str(path, line, record, "title"))
        for key in ("genres", "tags", "specs"):
            rows[key].append(optional_str_list(path, line, record, key))
        rows["price"].append(_price_text(path, line, record.get("price")))
        for key in ("developer", "publisher", "release_date"):
            rows[key].append(optional_str(path, line, record, key))
    schema = {
        "line": polars.Int64(),
        "app_id": polars.Int64(),
        "app_id_from": polars.String(),
        "title": polars.String(),
        "genres": polars.List(polars.String()),
        "tags": polars.List(polars.String()),
        "specs": polars.List(polars.String()),
        "price": polars.String(),
        "developer": polars.String(),
        "publisher": polars.String(),
        "release_date": polars.String(),
    }
    return SteamGames(table=polars.DataFrame(rows, schema=schema), field_counts=dict(sorted(counts.items())))


def _price_text(path: Path, line: int, value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.2f}"
    raise DataFormatError(path, line, f"field 'price' must be a number or text, got {value!r}")


# ---------------------------------------------------------------------- reviews
def _scalar(token: str) -> object:
    if token[0] in "'\"u":
        if "\\" in token:
            return ast.literal_eval(token)  # escapes: let Python's own lexer decode them
        return token[2:-1] if token[0] == "u" else token[1:-1]
    if token in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[token]
    return float(token) if any(c in token for c in ".eE") else int(token)


def _flat_fields(text: str, wanted: tuple[str, ...]) -> dict[str, object] | None:
    """The ``wanted`` keys (those present) of a flat dict literal line, or None if it is not flat.

    Equal to ``{k: v for k, v in ast.literal_eval(text).items() if k in wanted}`` (a repeated key
    keeps its last value, as in Python) at a fraction of the cost, for lines that are flat dicts.
    """
    if _FLAT_DICT.fullmatch(text) is None:
        return None
    tokens: dict[str, str] = {}
    for key_single, key_double, value in _ENTRY.findall(text):
        tokens[key_single or key_double] = value
    return {key: _scalar(tokens[key]) for key in wanted if key in tokens}


def read_reviews(path: Path) -> polars.DataFrame:
    """``steam_reviews.json.gz`` -> ``line``, ``user`` (username), ``app_id``, ``order`` (unix s)."""
    lines: list[int] = []
    users: list[str] = []
    apps: list[int] = []
    dates: list[str] = []
    for line, text in iter_lines(path):
        if not text.strip():
            raise DataFormatError(path, line, "empty line")
        record = _flat_fields(text.strip(), _REVIEW_KEYS)
        if record is None:
            record = parse_literal_line(path, line, text)
        lines.append(line)
        users.append(require_str(path, line, record, "username"))
        apps.append(require_int(path, line, record, "product_id"))
        dates.append(require_str(path, line, record, "date"))
    frame = polars.DataFrame(
        {"line": lines, "user": users, "app_id": apps, "date": dates},
        schema={"line": polars.Int64, "user": polars.String, "app_id": polars.Int64, "date": polars.String},
    )
    day = polars.col("date").str.strip_chars().str.to_date("%Y-%m-%d", strict=False)
    frame = frame.with_columns(day.alias("day"))
    bad = frame.filter(polars.col("day").is_null())
    if bad.height:
        row = bad.row(0, named=True)
        raise DataFormatError(path, row["line"], f"field 'date' must be YYYY-MM-DD, got {row['date']!r}")
    seconds = polars.col("day").cast(polars.Datetime("ms")).dt.epoch("s")
    return frame.select("line", "user", "app_id", seconds.cast(polars.Int64).alias("order"))


def k_core(frame: polars.DataFrame, k: int) -> tuple[polars.DataFrame, int, int]:
    """Remove users, then items, with fewer than ``k`` rows, until stable (row order kept).

    Returns the filtered frame and how many rows the user rule and the item rule removed.
    """
    by_user = by_item = 0
    while True:
        before = frame.height
        frame = frame.filter(polars.len().over("user") >= k)
        by_user += before - frame.height
        middle = frame.height
        frame = frame.filter(polars.len().over("app_id") >= k)
        by_item += middle - frame.height
        if frame.height == before:
            return frame, by_user, by_item


def read_official(reviews_path: Path, games_path: Path, min_interactions: int) -> CanonicalTables:
    reviews = read_reviews(reviews_path)
    kept, by_user, by_item = k_core(reviews, min_interactions)
    if kept.height == 0:
        raise DataFormatError(
            reviews_path,
            None,
            f"no interactions survive the {min_interactions}-core filter ({reviews.height} reviews)",
        )
    users = kept["user"].unique(maintain_order=True)
    apps = kept["app_id"].unique(maintain_order=True)
    interactions = kept.select(
        polars.col("user").replace_strict(users, np.arange(1, users.len() + 1), return_dtype=polars.Int64),
        polars.col("app_id")
        .replace_strict(apps, np.arange(1, apps.len() + 1), return_dtype=polars.Int64)
        .alias("item"),
        "order",
    )

    games = read_steam_games(games_path).table
    no_id = games.filter(polars.col("app_id").is_null()).height
    games = games.filter(polars.col("app_id").is_not_null())
    repeated = games.height - games["app_id"].n_unique()
    games = games.unique("app_id", keep="first", maintain_order=True)
    items = (
        polars.DataFrame({"item": np.arange(1, apps.len() + 1, dtype=np.int64), "app_id": apps})
        .join(
            games.select("app_id", *_GAME_TEXT, polars.lit(True).alias("has_game")), on="app_id", how="left"
        )
        .sort("item")
    )
    without_game = items["has_game"].null_count()
    items = items.drop("has_game")
    unreviewed = games.height - games.filter(polars.col("app_id").is_in(apps.implode())).height

    filtered: dict[str, int] = {}
    if by_user:
        filtered[f"reviews of users with fewer than {min_interactions} ({min_interactions}-core)"] = by_user
    if by_item:
        filtered[f"reviews of apps with fewer than {min_interactions} ({min_interactions}-core)"] = by_item
    if no_id:
        filtered["steam_games lines with neither id nor store url (cannot be joined)"] = no_id
    if repeated:
        filtered["steam_games lines repeating an app id (first kept)"] = repeated
    if unreviewed:
        filtered["steam_games lines of apps with no remaining review (not used)"] = unreviewed
    notes = [
        f"source: official UCSD {reviews_path.name} + {games_path.name}; user = username; order = review "
        "date (unix seconds, day resolution); ties keep file order",
    ]
    if without_game:
        notes.append(f"{without_game} reviewed apps have no steam_games line (their text is null)")
    return CanonicalTables(
        interactions=interactions, items=items, order_is_time=True, filtered=filtered, notes=notes
    )
