"""The real data under ``$RECBENCH_DATA_DIR`` (marker ``data``): exact published statistics.

Run with ``RECBENCH_DATA_DIR=/path/to/data pytest -m data tests/test_real_data.py``. Every
number asserted here is the one docs/data.md states (or, for the Steam games file, the one the
file itself has); a test skips, saying which files it looked for, when they are absent.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import numpy as np
import polars
import pytest

from datamodules._io import read_id_sequences
from datamodules.amazon import AmazonDataModule
from datamodules.steam import SteamDataModule, read_steam_games
from datamodules.yoochoose import RC15_NUM_ITEMS, YooChooseDataModule, read_clicks_tsv
from recbench.data import data_root

pytestmark = pytest.mark.data


def need(*relative: str) -> list[Path]:
    paths = [data_root() / r for r in relative]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(
            f"real data not found (set RECBENCH_DATA_DIR; now {data_root()}): missing {', '.join(missing)}"
        )
    return paths


AMAZON = {
    # category: users, items, interactions, mean length (README, "Published statistics")
    "beauty": (22_363, 12_101, 198_502, 8.88),
    "sports": (35_598, 18_357, 296_337, 8.32),
    "toys": (19_412, 11_924, 167_597, 8.63),
}
# README "Item text coverage" (non-empty values).
AMAZON_TEXT = {
    "beauty": {"title": 12_094, "brand": 9_983, "categories": 12_101, "price": 11_516},
    "toys": {"title": 11_865, "brand": 0, "categories": 11_924, "price": 0},
    "sports": {"title": 0, "brand": 0, "categories": 0, "price": 0, "title_fragment": 18_357},
}


@pytest.mark.parametrize("category", sorted(AMAZON))
def test_amazon_published_statistics(category: str) -> None:
    need(f"amazon/{category}/sequences.txt", f"amazon/{category}/items.jsonl")
    dm = AmazonDataModule(category)
    assert dm.resolved_format() == "preprocessed"
    dm.prepare_data()
    stats = dm.stats()
    users, items, interactions, mean_length = AMAZON[category]
    assert (stats.users, stats.items, stats.interactions) == (users, items, interactions)
    assert round(stats.mean_length, 2) == mean_length
    for field, count in AMAZON_TEXT[category].items():
        assert stats.items_with_field[field] == count, field
    assert dm.meta["order_is_time"] is False
    # Every item occurs in some sequence: the item table is exactly the 5-core item set.
    assert dm.meta["notes"] == dm.meta["notes"][:1]


@pytest.mark.parametrize("category", sorted(AMAZON))
def test_amazon_every_item_has_a_title_fragment(category: str) -> None:
    """README: every item of all three has ``title_fragment``."""
    (items_path,) = need(f"amazon/{category}/items.jsonl")
    records = [json.loads(line) for line in items_path.read_text().splitlines()]
    assert all("title_fragment" in r for r in records)
    empty = [r["item"] for r in records if not r["title_fragment"].strip()]
    # The key is on every line, but one Beauty fragment is the empty string (item 10205), so the
    # non-empty count that the statistics report is 12,100 there.
    assert empty == ([10205] if category == "beauty" else [])
    dm = AmazonDataModule(category)
    dm.prepare_data()
    assert dm.stats().items_with_field["title_fragment"] == len(records) - len(empty)


def test_steam_setrec_counts() -> None:
    need("steam/setrec/sequences.txt")
    dm = SteamDataModule("setrec")
    dm.prepare_data()
    stats = dm.stats()
    assert (stats.users, stats.items, stats.interactions) == (32_919, 14_330, 1_436_230)
    assert stats.items_with_field == {}
    assert any("no item text" in note for note in dm.meta["notes"])
    lengths = polars.read_parquet(dm.cache_path / "interactions.parquet").group_by("user").len()["len"]
    assert lengths.min() >= 20  # README: at least 20 per user


def test_steam_setrec_prepares_in_seconds(tmp_path: Path) -> None:
    need("steam/setrec/sequences.txt")
    dm = SteamDataModule("setrec", cache_dir=str(tmp_path))
    started = time.perf_counter()
    dm.prepare_data()
    assert time.perf_counter() - started < 15.0  # about 1 s on a 2-core CPU


def test_steam_games_parsed() -> None:
    (path,) = need("steam/steam_games.json.gz")
    games = read_steam_games(path)
    assert games.lines == 32_135
    assert {
        key: games.field_counts[key]
        for key in (
            "id",
            "app_name",
            "title",
            "genres",
            "tags",
            "specs",
            "price",
            "developer",
            "publisher",
            "release_date",
        )
    } == {
        "id": 32_133,
        "app_name": 32_133,
        "title": 30_085,
        "genres": 28_852,
        "tags": 31_972,
        "specs": 31_465,
        "price": 30_758,
        "developer": 28_836,
        "publisher": 24_083,
        "release_date": 30_068,
    }
    table = games.table
    # One of the two lines without an id names its app in the store url; the other has no app.
    assert table["app_id_from"].value_counts().sort("app_id_from").rows() == [
        (None, 1),
        ("id", 32_133),
        ("url", 1),
    ]
    assert table["title"].null_count() == 2  # the url-only line and a demo line with no name
    # Two app ids occur twice: 612880 (two id lines) and 200260 (the url-only line repeats line 1069).
    assert table.filter(polars.col("app_id").is_not_null())["app_id"].n_unique() == 32_132


def test_yoochoose_rc15_counts() -> None:
    valid, test = need("yoochoose/rc15/valid_sessions.txt", "yoochoose/rc15/test_sessions.txt")
    per_file = [read_id_sequences(p, with_user=False) for p in (valid, test)]
    assert [len(s.keys) for s in per_file] == [12_847, 12_847]
    assert [len(s.items) for s in per_file] == [57_062, 55_245]
    dm = YooChooseDataModule("rc15")
    dm.prepare_data()
    stats = dm.stats()
    assert (stats.users, stats.items, stats.interactions) == (25_694, RC15_NUM_ITEMS, 112_307)
    interactions = polars.read_parquet(dm.cache_path / "interactions.parquet")
    assert interactions["item"].n_unique() == 4_721
    assert interactions["item"].max() <= RC15_NUM_ITEMS
    lengths = interactions.group_by("user").len()["len"]
    assert (lengths.min(), lengths.max()) == (3, 30)
    assert any("AVAILABLE SUBSET" in note for note in dm.meta["notes"])
    dm.setup()  # 8:1:1 by session, every prefix of a held-out session is a case
    counts = dm.split_counts
    assert counts.train_targets + counts.val_cases + counts.test_cases == 112_307 - 25_694


def test_yoochoose_clicks_100k_counts() -> None:
    train, test = need("yoochoose/clicks-100k/train.tsv", "yoochoose/clicks-100k/test.tsv")
    sessions, clicks = [], []
    for path in (train, test):
        tables = read_clicks_tsv([path])
        sessions.append(tables.interactions["user"].n_unique())
        clicks.append(tables.interactions.height)
    assert sessions == [17_794, 3_416]
    assert clicks == [70_278, 13_568]
    dm = YooChooseDataModule("clicks_tsv")
    dm.prepare_data()
    stats = dm.stats()
    assert (stats.users, stats.items, stats.interactions) == (17_794 + 3_416, 2_933, 70_278 + 13_568)
    order = polars.read_parquet(dm.cache_path / "interactions.parquet")["order"].to_numpy()
    first, last = (
        datetime.datetime.fromtimestamp(int(t) / 1000, datetime.timezone.utc)
        for t in (order.min(), order.max())
    )
    assert first.date() >= datetime.date(2014, 4, 1) and last.date() <= datetime.date(2014, 4, 8)
    assert np.all(np.diff(polars.read_parquet(dm.cache_path / "items.parquet")["item"].to_numpy()) == 1)


NO_DUPLICATES = {
    "exact duplicate interactions (same user, item and order as another row; kept)": 0,
    "repeat interactions (the user's item seen before, exact duplicates included; kept)": 0,
}


@pytest.mark.parametrize("category", sorted(AMAZON))
def test_amazon_duplicate_counts(category: str) -> None:
    """The 5-core sets have no repeated (user, item) and no repeated asin; the counts say so."""
    need(f"amazon/{category}/sequences.txt", f"amazon/{category}/items.jsonl")
    dm = AmazonDataModule(category)
    dm.prepare_data()
    assert dm.meta["duplicates"] == {**NO_DUPLICATES, "items sharing a raw id with an earlier item (kept)": 0}


def test_steam_and_yoochoose_duplicate_counts() -> None:
    need("steam/setrec/sequences.txt", "yoochoose/rc15/valid_sessions.txt", "yoochoose/clicks-100k/train.tsv")
    for dm in (SteamDataModule("setrec"), YooChooseDataModule("rc15")):
        dm.prepare_data()
        assert dm.meta["duplicates"] == NO_DUPLICATES, dm.name
    clicks = YooChooseDataModule("clicks_tsv")
    clicks.prepare_data()
    assert clicks.meta["duplicates"] == {
        "exact duplicate interactions (same user, item and order as another row; kept)": 1,
        "repeat interactions (the user's item seen before, exact duplicates included; kept)": 22_359,
        "items sharing a raw id with an earlier item (kept)": 0,
    }
    assert clicks.meta["interactions"] == 70_278 + 13_568  # kept


def test_truncated_beauty_cache_is_rebuilt(tmp_path: Path) -> None:
    """A hand-damaged cache of the real Beauty set is rebuilt, with the same statistics."""
    need("amazon/beauty/sequences.txt", "amazon/beauty/items.jsonl")
    dm = AmazonDataModule("beauty", cache_dir=str(tmp_path))
    dm.prepare_data()
    before = dm.stats()
    parquet = dm.cache_path / "interactions.parquet"
    with open(parquet, "r+b") as handle:
        handle.truncate(1000)
    again = AmazonDataModule("beauty", cache_dir=str(tmp_path))
    again.prepare_data()
    assert again.cache_outcome == "rebuilt"
    assert again.cache_problem is not None and "interactions.parquet has 1000 bytes" in again.cache_problem
    assert again.stats() == before
