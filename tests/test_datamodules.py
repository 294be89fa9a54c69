"""Dataset readers on small fixture files written here (no real data, no network).

Covers every source format of datamodules/amazon.py, steam.py and yoochoose.py, the stable tie rule,
the bad-input contract (our error class, with file, line and reason), the cache (a second
prepare is a hit; changing a source file changes the key) and the data command helpers.
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import time
from pathlib import Path

import polars
import pytest

from benchmark.data_commands import format_stats, prepare
from benchmark.registry import ConfigError as DataConfigError
from benchmark.registry import instantiate_data as load_datamodule
from datamodules._io import read_id_sequences
from datamodules.amazon import AmazonDataModule
from datamodules.steam import SteamDataModule, _flat_fields, read_steam_games
from datamodules.yoochoose import RC15_NUM_ITEMS, YooChooseDataModule
from recbench.data import DataFormatError, MissingDataError


# ---------------------------------------------------------------------- helpers
def write_gz(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def prepared(dm) -> tuple[polars.DataFrame, polars.DataFrame, dict]:
    dm.prepare_data()
    return polars.read_parquet(dm.cache_path / "interactions.parquet"), dm.items_table, dm.meta


def sequence_of(interactions: polars.DataFrame, user: int) -> list[int]:
    return interactions.filter(polars.col("user") == user)["item"].to_list()


def assert_located(error: pytest.ExceptionInfo, path: Path, line: int | None, reason: str) -> None:
    message = str(error.value)
    assert str(path) in message
    if line is not None:
        assert f"{path}:{line}:" in message
        assert error.value.line == line
    assert reason in message


# ---------------------------------------------------------------------- Amazon fixtures
def review(user: str, asin: str, time: int) -> str:
    return json.dumps(
        {"reviewerID": user, "asin": asin, "unixReviewTime": time, "overall": 5.0, "reviewText": "ok"}
    )


def amazon_official(folder: Path) -> tuple[Path, Path]:
    # Item ids by first appearance: P=1, Q=2, R=3. User ids: B=1, A=2.
    # A reviews Q (line 2) and P (line 3) on the same day: the tie keeps file order (Q, P), which
    # is NOT item-id order (P=1 < Q=2). A's review of R (line 4) is earlier and goes first.
    reviews = write_gz(
        folder / "reviews_Beauty_5.json.gz",
        [
            review("B", "P", 300),
            review("A", "Q", 200),
            review("A", "P", 200),
            review("A", "R", 100),
            review("B", "Q", 100),
        ],
    )
    meta = write_gz(
        folder / "meta_Beauty.json.gz",
        [
            # Python literals, as the official files are written (u'' strings, single quotes).
            "{'asin': 'P', 'title': u'Nail polish \\'red\\'', 'brand': 'OPI', 'price': 12.5, "
            "'categories': [['Beauty', 'Nails']], 'related': {'also_bought': ['Q']}}",
            "{'asin': 'ZZZ', 'title': 'not reviewed'}",
            # asin is not the first key: parsed in full.
            "{'title': \"Q's title\", 'asin': 'Q', 'categories': [['Beauty']], 'salesRank': {'Beauty': 3}}",
            "{'asin': 'P', 'title': 'a second line for P'}",
        ],
    )
    return reviews, meta


def amazon_preprocessed(folder: Path) -> None:
    write_text(folder / "sequences.txt", "1 1 2 3\n2 3 1\n3 2 2 4 1\n")
    items = [
        {"item": 2, "asin": "A2", "title": "Two", "categories": [["Toys"]], "title_fragment": "two"},
        {"item": 1, "asin": "A1", "title": "One", "brand": "B", "price": 3, "title_fragment": "one"},
        {"item": 3, "asin": "A3", "title_fragment": "three"},
        {"item": 4, "asin": "A4", "title": "", "title_fragment": "four"},
    ]
    write_text(folder / "items.jsonl", "".join(json.dumps(i) + "\n" for i in items))


def test_amazon_official_ids_ties_and_text(tmp_path: Path) -> None:
    amazon_official(tmp_path / "raw")
    dm = AmazonDataModule(
        "beauty", source_format="official", data_dir=str(tmp_path / "raw"), cache_dir=str(tmp_path / "c")
    )
    interactions, items, meta = prepared(dm)
    assert meta["order_is_time"] is True
    assert (meta["users"], meta["items"], meta["interactions"]) == (2, 3, 5)
    assert sequence_of(interactions, 2) == [3, 2, 1]  # R (t=100), then Q and P in file order
    assert sequence_of(interactions, 1) == [2, 1]  # Q (t=100), P (t=300)
    assert interactions.filter(polars.col("user") == 2)["order"].to_list() == [100, 200, 200]
    assert items["asin"].to_list() == ["P", "Q", "R"]
    assert items["title"].to_list() == ["Nail polish 'red'", "Q's title", None]
    assert items["brand"].to_list() == ["OPI", None, None]
    assert items["price"].to_list() == [12.5, None, None]
    assert items["categories"].to_list() == [[["Beauty", "Nails"]], [["Beauty"]], None]
    assert meta["filtered"] == {
        "metadata lines of items not in the 5-core reviews (not used)": 1,
        "repeated metadata lines for one asin (first kept)": 1,
    }
    assert any("1 reviewed items have no metadata line" in note for note in meta["notes"])
    dm.setup()
    assert dm.split_counts.test_cases == 2
    # Real timestamps, so the temporal split is allowed.
    temporal = AmazonDataModule(
        "beauty", "official", str(tmp_path / "raw"), split="temporal", cache_dir=str(tmp_path / "c")
    )
    temporal.setup()


def test_amazon_preprocessed(tmp_path: Path) -> None:
    amazon_preprocessed(tmp_path / "pre")
    dm = AmazonDataModule(
        "toys", source_format="preprocessed", data_dir=str(tmp_path / "pre"), cache_dir=str(tmp_path / "c")
    )
    interactions, items, meta = prepared(dm)
    assert meta["order_is_time"] is False
    assert (meta["users"], meta["items"], meta["interactions"]) == (3, 4, 9)
    assert sequence_of(interactions, 3) == [2, 2, 4, 1]  # position order, repeats kept
    assert interactions.filter(polars.col("user") == 3)["order"].to_list() == [0, 1, 2, 3]
    assert items.columns == ["item", "asin", "title", "brand", "categories", "price", "title_fragment"]
    assert items["asin"].to_list() == ["A1", "A2", "A3", "A4"]
    assert items["price"].to_list() == [3.0, None, None, None]
    stats = dm.stats()
    assert stats.items_with_field == {
        "title": 2,
        "title_fragment": 4,
        "brand": 1,
        "categories": 1,
        "price": 1,
    }
    with pytest.raises(ValueError, match="temporal"):
        AmazonDataModule(
            "toys", "preprocessed", str(tmp_path / "pre"), split="temporal", cache_dir=str(tmp_path / "c")
        ).setup()


def test_amazon_auto_prefers_preprocessed(tmp_path: Path) -> None:
    folder = tmp_path / "beauty"
    amazon_official(folder)
    dm = AmazonDataModule("beauty", data_dir=str(folder), cache_dir=str(tmp_path / "c"))
    assert dm.resolved_format() == "official"
    amazon_preprocessed(folder)
    assert dm.resolved_format() == "preprocessed"
    assert dm.source_files() == [folder / "sequences.txt", folder / "items.jsonl"]


def test_amazon_missing_files_name_files_folder_and_source(tmp_path: Path) -> None:
    dm = AmazonDataModule("sports", data_dir=str(tmp_path / "nothing"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(MissingDataError) as error:
        dm.prepare_data()
    message = str(error.value)
    for name in (
        "sequences.txt",
        "items.jsonl",
        "reviews_Sports_and_Outdoors_5.json.gz",
        "meta_Sports_and_Outdoors.json.gz",
    ):
        assert name in message
    assert str(tmp_path / "nothing") in message
    assert "jmcauley.ucsd.edu/data/amazon" in message
    official = AmazonDataModule(
        "toys", source_format="official", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(MissingDataError, match="meta_Toys_and_Games.json.gz"):
        official.prepare_data()


# ---------------------------------------------------------------------- Steam fixtures
def steam_review(user: str, app: str, date: str, text: str = "fun") -> str:
    return repr(
        {
            "username": user,
            "hours": 1.5,
            "products": 3,
            "product_id": app,
            "page_order": 0,
            "date": date,
            "text": text,
            "early_access": False,
            "page": 1,
        }
    )


def steam_official(folder: Path) -> None:
    lines = []
    # Users u1..u3 review apps 10 and 20 (3 each at k=3); app 30 has only 2 reviews, so it goes in
    # round 1, which leaves u4 (30, 30, 10 -> 10 only) below 3 in round 2: iterated filtering.
    for user in ("u1", "u2", "u3"):
        lines += [steam_review(user, "20", "2017-01-02"), steam_review(user, "10", "2017-01-02")]
        lines.append(steam_review(user, "20", "2016-05-01", text="said 'u''product_id': u'99'"))
    lines += [
        steam_review("u4", "30", "2015-01-01"),
        steam_review("u4", "30", "2015-01-02"),
        steam_review("u4", "10", "2015-01-03"),
    ]
    # Key order differs, and a username with a quote and an escape: the full parser path.
    lines.append(
        "{u'date': u'2017-03-01', u'username': u\"O'Neil \\xe9\", u'product_id': u'10', u'text': u'x'}"
    )
    lines.append(
        "{u'date': u'2017-03-02', u'username': u\"O'Neil \\xe9\", u'product_id': u'20', u'text': u'x'}"
    )
    lines.append(
        "{u'date': u'2017-03-03', u'username': u\"O'Neil \\xe9\", u'product_id': u'20', u'text': u'x'}"
    )
    write_gz(folder / "steam_reviews.json.gz", lines)
    write_gz(
        folder / "steam_games.json.gz",
        [
            "{u'app_name': u'Ten', u'genres': [u'Action'], u'tags': [u'Action', u'Indie'], u'price': 4.99, u'id': u'10'}",
            "{u'url': u'http://store.steampowered.com/', u'price': 19.99}",
            "{u'title': u'Twenty', u'tags': [u'RPG'], u'price': u'Free To Play', u'url': u'http://store.steampowered.com/app/20/Twenty/'}",
            "{u'app_name': u'Ten again', u'id': u'10'}",
            "{u'app_name': u'Unreviewed', u'id': u'77'}",
        ],
    )


def test_steam_official_core_and_games(tmp_path: Path) -> None:
    steam_official(tmp_path)
    dm = SteamDataModule(
        "official", data_dir=str(tmp_path), min_interactions=3, cache_dir=str(tmp_path / "c")
    )
    assert dm.name == "steam-official"
    interactions, items, meta = prepared(dm)
    assert meta["order_is_time"] is True
    # u1 sees 20 then 10 (first seen) -> items 20=1, 10=2; O'Neil is user 4.
    assert (meta["users"], meta["items"], meta["interactions"]) == (4, 2, 12)
    assert items["app_id"].to_list() == [20, 10]
    assert sequence_of(interactions, 1) == [1, 1, 2]  # 2016 review first; same-day ties keep file order
    assert sequence_of(interactions, 4) == [2, 1, 1]
    assert items["title"].to_list() == ["Twenty", "Ten"]
    assert items["price"].to_list() == ["Free To Play", "4.99"]
    assert items["tags"].to_list() == [["RPG"], ["Action", "Indie"]]
    assert items["genres"].to_list() == [None, ["Action"]]
    assert meta["filtered"] == {
        "reviews of users with fewer than 3 (3-core)": 1,
        "reviews of apps with fewer than 3 (3-core)": 2,
        "steam_games lines with neither id nor store url (cannot be joined)": 1,
        "steam_games lines repeating an app id (first kept)": 1,
        "steam_games lines of apps with no remaining review (not used)": 1,
    }


def test_steam_games_parser_counts_fields(tmp_path: Path) -> None:
    steam_official(tmp_path)
    games = read_steam_games(tmp_path / "steam_games.json.gz")
    assert games.lines == 5
    assert games.field_counts["id"] == 3 and games.field_counts["price"] == 3
    assert games.table["app_id"].to_list() == [10, None, 20, 10, 77]
    assert games.table["app_id_from"].to_list() == ["id", None, "url", "id", "id"]


@pytest.mark.parametrize(
    ("line", "fast"),
    [
        (steam_review("plain", "10", "2017-01-01"), True),
        (
            "{u'username': u'a\\u00e9\\'b', u'product_id': u'5', u'date': u'2017-01-01', u'text': u\"u'date': u'1999-01-01'\"}",
            True,
        ),
        (
            "{'username': \"it's\", 'hours': 1e3, 'product_id': '7', 'date': '2011-02-03', 'x': -0.5, 'y': None}",
            True,
        ),
        # A repeated key keeps the last value, as in Python.
        ("{u'username': u'dup', u'username': u'last', u'product_id': u'1', u'date': u'2011-01-01'}", True),
        # A missing key is simply absent (the caller reports it).
        ("{u'username': u'x', u'product_id': u'1'}", True),
        # Not flat, or not what Python's lexer reads the same way: the full parser decides.
        ("{u'username': u'x', u'tags': [u'a'], u'product_id': u'1', u'date': u'2011-01-01'}", False),
        ("{u'username': u'x', u'product_id': u'1', u'date': u'2011-01-01',}", False),
        ("{u'username': r'\\n', u'product_id': u'1', u'date': u'2011-01-01'}", False),
        ("{u'username': u'x' u'y', u'product_id': u'1', u'date': u'2011-01-01'}", False),
        ("{u'username': u'x', u'product_id': 01, u'date': u'2011-01-01'}", False),
    ],
)
def test_steam_flat_fast_path_agrees_with_literal_eval(line: str, fast: bool) -> None:
    found = _flat_fields(line, ("username", "product_id", "date"))
    assert (found is not None) == fast
    if found is not None:
        full = ast.literal_eval(line)
        assert found == {key: full[key] for key in ("username", "product_id", "date") if key in full}


def test_steam_setrec(tmp_path: Path) -> None:
    write_text(tmp_path / "setrec" / "sequences.txt", "1 3 1 2\n2 5 3\n")
    dm = SteamDataModule("setrec", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert dm.name == "steam"
    interactions, items, meta = prepared(dm)
    assert (meta["users"], meta["items"], meta["interactions"]) == (2, 5, 5)
    assert items.columns == ["item"]
    assert any("no item text" in note for note in meta["notes"])
    assert any("1 item ids in 1..5 occur in no sequence" in note for note in meta["notes"])
    assert sequence_of(interactions, 1) == [3, 1, 2]
    assert dm.stats().items_with_field == {}


# ---------------------------------------------------------------------- YooChoose fixtures
def test_yoochoose_rc15(tmp_path: Path) -> None:
    write_text(tmp_path / "rc15" / "valid_sessions.txt", "5 6 7\n9514 1 1\n")
    write_text(tmp_path / "rc15" / "test_sessions.txt", "2 3 4 8\n")
    dm = YooChooseDataModule("rc15", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert (dm.max_len, dm.split) == (10, "session")
    interactions, items, meta = prepared(dm)
    assert (meta["users"], meta["items"], meta["interactions"]) == (3, RC15_NUM_ITEMS, 10)
    assert sequence_of(interactions, 2) == [9514, 1, 1]
    assert sequence_of(interactions, 3) == [2, 3, 4, 8]  # test file sessions come after valid's
    assert any("AVAILABLE SUBSET" in note for note in meta["notes"])
    dm.setup()  # the session split runs on the subset
    assert dm.split_counts.val_cases + dm.split_counts.test_cases + dm.split_counts.train_targets == 7

    write_text(tmp_path / "bad" / "rc15" / "valid_sessions.txt", "1 2\n3 4\n9515 1\n")
    write_text(tmp_path / "bad" / "rc15" / "test_sessions.txt", "1 2\n")
    bad = YooChooseDataModule("rc15", data_dir=str(tmp_path / "bad"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataFormatError) as error:
        bad.prepare_data()
    assert_located(error, tmp_path / "bad" / "rc15" / "valid_sessions.txt", 3, "unknown item id 9515")


def test_yoochoose_clicks_tsv(tmp_path: Path) -> None:
    folder = tmp_path / "clicks-100k"
    # Session 7: item 900 and item 100 share a time -> file order (900 first), not id order.
    write_text(
        folder / "train.tsv",
        "SessionId\tItemId\tTime\n7\t500\t1396437466.94\n7\t900\t1396437470.5\n7\t100\t1396437470.5\n"
        "3\t100\t1396437000.0\n3\t500\t1396436000.25\n",
    )
    write_text(folder / "test.tsv", "SessionId\tItemId\tTime\n11\t42\t1396500000\n11\t500\t1396500001\n")
    dm = YooChooseDataModule("clicks_tsv", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert dm.name == "yoochoose-clicks-tsv"
    interactions, items, meta = prepared(dm)
    assert meta["order_is_time"] is True
    assert items["raw_item_id"].to_list() == [500, 900, 100, 42]  # first-seen, train then test
    assert sequence_of(interactions, 7) == [1, 2, 3]
    assert sequence_of(interactions, 3) == [1, 3]  # sorted by time
    assert interactions.filter(polars.col("user") == 3)["order"].to_list() == [1396436000250, 1396437000000]
    assert (meta["users"], meta["items"], meta["interactions"]) == (3, 4, 7)

    short = YooChooseDataModule(
        "clicks_tsv", data_dir=str(tmp_path), min_session_length=3, cache_dir=str(tmp_path / "c")
    )
    interactions, items, meta = prepared(short)
    assert meta["filtered"] == {"clicks of sessions shorter than 3": 4}
    assert items["raw_item_id"].to_list() == [500, 900, 100]
    assert sequence_of(interactions, 7) == [1, 2, 3]


def test_yoochoose_official_dat(tmp_path: Path) -> None:
    write_text(
        tmp_path / "yoochoose-clicks.dat",
        "1,2014-04-07T10:51:09.277Z,214536502,0\n1,2014-04-07T10:54:09.868Z,214536500,0\n"
        "1,2014-04-07T10:54:09.868Z,214536506,S\n2,2014-04-06T00:00:00.000Z,214577561,2053\n"
        "2,2014-04-05T23:59:59.999Z,214536500,0\n",
    )
    write_text(tmp_path / "yoochoose-buys.dat", "1,2014-04-07T10:54:09.868Z,214536502,12462,1\n")
    dm = YooChooseDataModule("official", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert dm.name == "yoochoose-official"
    interactions, items, meta = prepared(dm)
    assert items["raw_item_id"].to_list() == [214536502, 214536500, 214536506, 214577561]
    assert sequence_of(interactions, 1) == [1, 2, 3]
    assert sequence_of(interactions, 2) == [2, 4]
    assert interactions.filter(polars.col("user") == 2)["order"].to_list() == [1396742399999, 1396742400000]
    assert any("not used" in note for note in meta["notes"])

    buys = YooChooseDataModule(
        "official", data_dir=str(tmp_path), include_buys=True, cache_dir=str(tmp_path / "c")
    )
    interactions, _, meta = prepared(buys)
    assert sequence_of(interactions, 1) == [1, 2, 3, 1]  # the purchase ties with clicks: after them
    assert meta["interactions"] == 6


def test_yoochoose_missing_buys_file(tmp_path: Path) -> None:
    write_text(tmp_path / "yoochoose-clicks.dat", "1,2014-04-07T10:51:09.277Z,214536502,0\n")
    dm = YooChooseDataModule(
        "official", data_dir=str(tmp_path), include_buys=True, cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(MissingDataError, match="yoochoose-buys.dat"):
        dm.prepare_data()
    with pytest.raises(MissingDataError, match="recsys15"):
        YooChooseDataModule(data_dir=str(tmp_path / "none"), cache_dir=str(tmp_path / "c")).prepare_data()


# ---------------------------------------------------------------------- bad input
def _amazon_pre(tmp_path: Path, sequences: str, items: list[dict] | None = None) -> AmazonDataModule:
    folder = tmp_path / "pre"
    write_text(folder / "sequences.txt", sequences)
    items = items if items is not None else [{"item": i, "asin": f"A{i}"} for i in range(1, 6)]
    write_text(folder / "items.jsonl", "".join(json.dumps(i) + "\n" for i in items))
    return AmazonDataModule("beauty", "preprocessed", str(folder), cache_dir=str(tmp_path / "c"))


@pytest.mark.parametrize(
    ("sequences", "line", "reason"),
    [
        ("1 1 2\n2 3 4\n3 17 1\n", 3, "unknown item id 17 at line 3"),
        ("1 1 2\n2\n", 2, "empty sequence: user 2 has no items"),
        ("1 1 2\n\n3 1\n", 2, "empty sequence line"),
        ("1 1 2\n2 1 x3\n", 2, "non-integer id 'x3'"),
        ("1 1 2.5\n", 1, "non-integer id '2.5'"),
        ("1 1 -2\n", 1, "non-integer id '-2'"),
        ("1 1 0 2\n", 1, "item id 0 is reserved for padding"),
        ("1 1 2\n2 2\n1 3\n", 3, "user 1 appears again (first at line 1)"),
        ("", 1, "empty file"),
        ("1 1 123456789012345678901\n", 1, "too large"),
    ],
)
def test_bad_sequence_files(tmp_path: Path, sequences: str, line: int, reason: str) -> None:
    dm = _amazon_pre(tmp_path, sequences)
    with pytest.raises(DataFormatError) as error:
        dm.prepare_data()
    assert_located(error, tmp_path / "pre" / "sequences.txt", line, reason)


@pytest.mark.parametrize(
    ("items_text", "line", "reason"),
    [
        ('{"item": 1, "asin": "A1"}\n{"item": 2, "asin": "A2"\n', 2, "malformed JSON"),
        ('{"item": 1, "asin": "A1"}\n{"item": 2}\n', 2, "missing required field 'asin'"),
        ('{"item": 1, "asin": "A1"}\n{"item": "two", "asin": "A2"}\n', 2, "field 'item' must be an integer"),
        ('{"item": 1, "asin": "A1"}\n{"item": 1, "asin": "A2"}\n', 2, "item 1 appears again"),
        ('{"item": 1, "asin": "A1", "price": "cheap"}\n', 1, "field 'price' must be a number"),
        ('{"item": 1, "asin": "A1", "categories": ["flat"]}\n', 1, "list of lists of strings"),
        ('{"item": 1, "asin": "A1"}\n[1, 2]\n', 2, "expected a JSON object"),
        ('{"item": 1, "asin": "A1"}\n{"item": 3, "asin": "A3"}\n', None, "ids are absent (first: 2)"),
        ("", 1, "empty file"),
    ],
)
def test_bad_items_jsonl(tmp_path: Path, items_text: str, line: int | None, reason: str) -> None:
    dm = _amazon_pre(tmp_path, "1 1\n")
    write_text(tmp_path / "pre" / "items.jsonl", items_text)
    with pytest.raises(DataFormatError) as error:
        dm.prepare_data()
    assert_located(error, tmp_path / "pre" / "items.jsonl", line, reason)


def test_truncated_gzip_is_located(tmp_path: Path) -> None:
    reviews, _ = amazon_official(tmp_path)
    lines = [review(f"U{i}", f"I{i % 7}", 1000 + i) for i in range(5000)]
    write_gz(reviews, lines)
    data = reviews.read_bytes()
    reviews.write_bytes(data[: len(data) // 2])
    dm = AmazonDataModule("beauty", "official", str(tmp_path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataFormatError) as error:
        dm.prepare_data()
    assert_located(error, reviews, error.value.line, "truncated or corrupt gzip stream")
    assert error.value.line is not None and error.value.line > 1

    reviews.write_bytes(b"this is not gzip at all\n")
    with pytest.raises(DataFormatError, match="truncated or corrupt gzip"):
        AmazonDataModule("beauty", "official", str(tmp_path), cache_dir=str(tmp_path / "c")).prepare_data()


@pytest.mark.parametrize(
    ("review_lines", "meta_lines", "which", "line", "reason"),
    [
        ([review("A", "P", 1), '{"reviewerID": "B", "asin": "P"'], None, "reviews", 2, "malformed JSON"),
        (
            [review("A", "P", 1), json.dumps({"reviewerID": "B", "asin": "P"})],
            None,
            "reviews",
            2,
            "missing required field 'unixReviewTime'",
        ),
        (
            [json.dumps({"reviewerID": "B", "asin": "P", "unixReviewTime": "soon"})],
            None,
            "reviews",
            1,
            "field 'unixReviewTime' must be an integer",
        ),
        (
            [json.dumps({"reviewerID": "B", "asin": "P", "unixReviewTime": 1.5})],
            None,
            "reviews",
            1,
            "must be an integer",
        ),
        ([review("A", "P", 1), ""], None, "reviews", 2, "empty line"),
        (
            [review("A", "P", 1)],
            ["{'asin': 'P', 'title': 'x'", "{'asin': 'Q'}"],
            "meta",
            1,
            "malformed Python literal",
        ),
        ([review("A", "P", 1)], ["{'title': 'no asin'}"], "meta", 1, "missing required field 'asin'"),
        (
            [review("A", "P", 1)],
            ["{'asin': 'P', 'title': __import__('os').getcwd()}"],
            "meta",
            1,
            "malformed Python literal",
        ),
        (
            [review("A", "P", 1)],
            ["{'asin': 'P', 'price': 'ten'}"],
            "meta",
            1,
            "field 'price' must be a number",
        ),
        ([review("A", "P", 1)], [], "meta", 1, "empty file"),
    ],
)
def test_bad_official_amazon(tmp_path: Path, review_lines, meta_lines, which, line, reason) -> None:
    reviews = write_gz(tmp_path / "reviews_Beauty_5.json.gz", review_lines)
    meta = write_gz(
        tmp_path / "meta_Beauty.json.gz", meta_lines if meta_lines is not None else ["{'asin': 'P'}"]
    )
    dm = AmazonDataModule("beauty", "official", str(tmp_path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataFormatError) as error:
        dm.prepare_data()
    assert_located(error, reviews if which == "reviews" else meta, line, reason)


@pytest.mark.parametrize(
    ("lines", "line", "reason"),
    [
        (
            [steam_review("a", "1", "2017-01-01"), "{u'username': u'b', u'product_id': u'1'"],
            2,
            "malformed Python literal",
        ),
        (
            [steam_review("a", "1", "2017-01-01"), "{u'username': u'b', u'date': u'2017-01-01'}"],
            2,
            "missing required field 'product_id'",
        ),
        ([steam_review("a", "one", "2017-01-01")], 1, "field 'product_id' must be an integer"),
        (
            [steam_review("a", "1", "2017-01-01"), steam_review("a", "1", "Jan 2017")],
            2,
            "field 'date' must be YYYY-MM-DD",
        ),
        ([steam_review("a", "1", "2017-01-01"), "[1, 2]"], 2, "expected a dict literal"),
    ],
)
def test_bad_steam_reviews(tmp_path: Path, lines: list[str], line: int, reason: str) -> None:
    steam_official(tmp_path)
    path = write_gz(tmp_path / "steam_reviews.json.gz", lines)
    dm = SteamDataModule("official", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataFormatError) as error:
        dm.prepare_data()
    assert_located(error, path, line, reason)


def test_bad_steam_games(tmp_path: Path) -> None:
    path = write_gz(tmp_path / "g.json.gz", ["{u'id': u'1', u'tags': u'not a list'}"])
    with pytest.raises(DataFormatError) as error:
        read_steam_games(path)
    assert_located(error, path, 1, "field 'tags' must be a list of strings")
    path = write_gz(tmp_path / "g.json.gz", ["{u'id': u'1'}", "{u'id': u'x1'}"])
    with pytest.raises(DataFormatError) as error:
        read_steam_games(path)
    assert_located(error, path, 2, "field 'id' must be an integer")


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("SessionId\tItemId\tTime\n1\t2\t3.0\n1\tabc\t4.0\n", 3, "non-integer item id 'abc'"),
        ("SessionId\tItemId\tTime\n1\t2\t3.0\nx\t2\t4.0\n", 3, "non-integer session id 'x'"),
        ("SessionId\tItemId\tTime\n1\t2\t3.0\n1\t2\tlater\n", 3, "Time must be a number"),
        ("SessionId\tItemId\tTime\n1\t2\t3.0\n1\t2\n", 3, "missing value for 'Time'"),
        ("SessionId\tItemId\tTime\n1\t2\t3.0\n\n1\t2\t4.0\n", 3, "empty line"),
        ("SessionId\tItemId\tTime\n1\t2\t3.0\n1\t2\t4.0\t5\t6\n", 3, "expected 3 fields, got 5"),
        ("Session\tItem\tTime\n1\t2\t3.0\n", 1, "header must start with"),
        ("SessionId\tItemId\tTime\n", 2, "no data rows"),
        ("", 1, "empty file"),
    ],
)
def test_bad_clicks_tsv(tmp_path: Path, text: str, line: int, reason: str) -> None:
    folder = tmp_path / "clicks-100k"
    train = write_text(folder / "train.tsv", text)
    write_text(folder / "test.tsv", "SessionId\tItemId\tTime\n9\t2\t3.0\n")
    dm = YooChooseDataModule("clicks_tsv", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataFormatError) as error:
        dm.prepare_data()
    assert_located(error, train, line, reason)


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        (
            "1,2014-04-07T10:51:09.277Z,214536502,0\n1,yesterday,214536500,0\n",
            2,
            "timestamp must be ISO 8601",
        ),
        (
            "1,2014-04-07T10:51:09.277Z,214536502,0\n1,2014-04-07T10:51:09.277Z,item,0\n",
            2,
            "non-integer item id",
        ),
        (
            "1,2014-04-07T10:51:09.277Z,214536502,0\n2,2014-04-07T10:51:09.277Z\n",
            2,
            "expected 4 fields, got 2",
        ),
        ("1,2014-04-07T10:51:09.277Z,214536502,0\n2,2014-04-07T10:51:09.277Z,214536502,\n", 2, "empty value for 'category'"),
    ],
)
def test_bad_official_dat(tmp_path: Path, text: str, line: int, reason: str) -> None:
    path = write_text(tmp_path / "yoochoose-clicks.dat", text)
    dm = YooChooseDataModule("official", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataFormatError) as error:
        dm.prepare_data()
    assert_located(error, path, line, reason)


def test_invalid_utf8_is_located(tmp_path: Path) -> None:
    path = tmp_path / "s.txt"
    path.write_bytes(b"1 2 3\n4 \xff 5\n")
    with pytest.raises(DataFormatError) as error:
        read_id_sequences(path, with_user=False)
    assert_located(error, path, 2, "not valid UTF-8")


# ---------------------------------------------------------------------- cache
def test_second_prepare_is_a_cache_hit_and_source_changes_change_the_key(tmp_path: Path) -> None:
    amazon_preprocessed(tmp_path / "pre")
    dm = AmazonDataModule("toys", "preprocessed", str(tmp_path / "pre"), cache_dir=str(tmp_path / "c"))
    cold = prepare(dm)
    warm = prepare(dm)
    assert not cold.cache_hit and warm.cache_hit
    assert warm.seconds < 0.05
    assert warm.cache_path == cold.cache_path
    sequences = tmp_path / "pre" / "sequences.txt"
    # Same content, later mtime: the same key (the key hashes contents, not times); it is a hit.
    stat = sequences.stat()
    os.utime(sequences, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    fresh = AmazonDataModule("toys", "preprocessed", str(tmp_path / "pre"), cache_dir=str(tmp_path / "c"))
    assert str(fresh.cache_path) == cold.cache_path
    assert prepare(fresh).cache_hit
    write_text(sequences, "1 1 2\n2 3 4\n")
    changed = AmazonDataModule("toys", "preprocessed", str(tmp_path / "pre"), cache_dir=str(tmp_path / "c"))
    report = prepare(changed)
    assert not report.cache_hit and report.cache_path != cold.cache_path
    assert changed.meta["interactions"] == 4


def test_cache_key_depends_on_options(tmp_path: Path) -> None:
    steam_official(tmp_path)
    write_text(tmp_path / "setrec" / "sequences.txt", "1 1 2\n")
    k3 = SteamDataModule("official", str(tmp_path), min_interactions=3, cache_dir=str(tmp_path / "c"))
    k2 = SteamDataModule("official", str(tmp_path), min_interactions=2, cache_dir=str(tmp_path / "c"))
    setrec = SteamDataModule("auto", str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert len({k3.cache_path, k2.cache_path, setrec.cache_path}) == 3


# ---------------------------------------------------------------------- data commands
def test_load_datamodule_presets_and_errors(tmp_path: Path) -> None:
    dm = load_datamodule("beauty", cache_dir=str(tmp_path))
    assert isinstance(dm, AmazonDataModule) and dm.category == "beauty" and dm.source_format == "auto"
    yoo = load_datamodule("yoochoose")
    assert isinstance(yoo, YooChooseDataModule) and (yoo.source_format, yoo.split, yoo.max_len) == (
        "rc15",
        "session",
        10,
    )
    assert load_datamodule("steam").source_format == "setrec"
    tiny = load_datamodule("synthetic_tiny", cache_dir=str(tmp_path))
    assert tiny.scale == 0.02
    with pytest.raises(DataConfigError, match="bogus"):
        load_datamodule("toys", bogus=1)
    with pytest.raises(DataConfigError):
        load_datamodule("toys", category="books")
    with pytest.raises(DataConfigError, match="unknown data 'nope'"):
        load_datamodule("nope")
    config = write_text(
        tmp_path / "mine.yaml",
        "class_path: datamodules.amazon.AmazonDataModule\ninit_args:\n  category: toys\n  colour: red\n",
    )
    with pytest.raises(DataConfigError, match="colour"):
        load_datamodule(str(config))
    config = write_text(
        tmp_path / "ok.yaml",
        "class_path: datamodules.steam.SteamDataModule\ninit_args:\n  min_interactions: 10\n",
    )
    assert load_datamodule(str(config)).min_interactions == 10


def test_format_stats(tmp_path: Path) -> None:
    steam_official(tmp_path)
    dm = SteamDataModule("official", str(tmp_path), min_interactions=3, cache_dir=str(tmp_path / "c"))
    report = prepare(dm)
    dm.setup()
    text = format_stats(dm.stats(), dm.split_counts, report.seconds)
    for expected in (
        "users            4",
        "items            2",
        "interactions     12",
        "mean length      3.00",
        "median length    3",
        "density",
        "title",
        "tags",
        "3-core",
        "test cases",
        "cache",
        "prepare time",
    ):
        assert expected in text, expected


def test_prepare_speed_on_a_large_sequence_file(tmp_path: Path) -> None:
    """Vectorised reading: 200k interactions in well under a few seconds."""
    lines = [f"{u} " + " ".join(str(1 + (u * 7 + k) % 5000) for k in range(20)) for u in range(1, 10_001)]
    write_text(tmp_path / "setrec" / "sequences.txt", "\n".join(lines) + "\n")
    dm = SteamDataModule("setrec", str(tmp_path), cache_dir=str(tmp_path / "c"))
    started = time.perf_counter()
    dm.prepare_data()
    assert time.perf_counter() - started < 5.0
    assert dm.meta["interactions"] == 200_000


# ---------------------------------------------------------------------- hostile input (issue 15)
_BOM = b"\xef\xbb\xbf"
_DAT_CLICK = "1,2014-04-07T10:51:09.277Z,214536502,0"


def _sources(tmp_path: Path, fmt: str, payload: bytes) -> tuple[object, Path]:
    """One datamodule per reader whose file under test holds ``payload``; the other files are valid.

    Returns (datamodule, the path of the file under test).
    """
    if fmt == "sequences":
        dm = _amazon_pre(tmp_path, "1 1\n")
        path = tmp_path / "pre" / "sequences.txt"
    elif fmt == "items_jsonl":
        dm = _amazon_pre(tmp_path, "1 1\n")
        path = tmp_path / "pre" / "items.jsonl"
    elif fmt == "reviews_gz":
        amazon_official(tmp_path)
        dm = AmazonDataModule("beauty", "official", str(tmp_path), cache_dir=str(tmp_path / "c"))
        path = tmp_path / "reviews_Beauty_5.json.gz"
    elif fmt == "steam_games_gz":
        steam_official(tmp_path)
        dm = SteamDataModule("official", str(tmp_path), min_interactions=3, cache_dir=str(tmp_path / "c"))
        path = tmp_path / "steam_games.json.gz"
    elif fmt == "rc15":
        write_text(tmp_path / "rc15" / "test_sessions.txt", "2 3 4 8\n")
        dm = YooChooseDataModule("rc15", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
        path = tmp_path / "rc15" / "valid_sessions.txt"
    elif fmt == "clicks_tsv":
        write_text(tmp_path / "clicks-100k" / "test.tsv", "SessionId\tItemId\tTime\n9\t2\t3.0\n")
        dm = YooChooseDataModule("clicks_tsv", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
        path = tmp_path / "clicks-100k" / "train.tsv"
    elif fmt == "dat":
        dm = YooChooseDataModule("official", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
        path = tmp_path / "yoochoose-clicks.dat"
    else:
        raise AssertionError(fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return dm, path


_VALID: dict[str, bytes] = {
    "sequences": b"1 1 2 3\n2 2 3 4\n",
    "items_jsonl": b'{"item": 1, "asin": "A1"}\n{"item": 2, "asin": "A2"}\n',
    "reviews_gz": (review("A", "P", 1) + "\n" + review("B", "Q", 2) + "\n").encode(),
    "steam_games_gz": b"{u'app_name': u'Ten', u'id': u'10'}\n{u'app_name': u'Twenty', u'id': u'20'}\n",
    "rc15": b"1 2 3\n4 5 6\n",
    "clicks_tsv": b"SessionId\tItemId\tTime\n1\t2\t3.0\n1\t5\t4.0\n",
    "dat": f"{_DAT_CLICK}\n2,2014-04-07T10:54:09.868Z,214536500,0\n".encode(),
}


@pytest.mark.parametrize("fmt", sorted(_VALID))
def test_bare_carriage_return_is_a_located_error(tmp_path: Path, fmt: str) -> None:
    """Item 1: a CR not followed by LF is neither whitespace nor a silent line end, in every reader.

    ``1 1 2 3\\r2 2 3 4`` used to be read as one user with seven items (the second user vanished).
    """
    first, second = _VALID[fmt].split(b"\n", 1)
    # The header line of the TSV stays intact: the CR joins the first two data lines.
    if fmt == "clicks_tsv":
        header, rest = _VALID[fmt].split(b"\n", 1)
        first, second = rest.split(b"\n", 1)
        payload, line = header + b"\n" + first + b"\r" + second, 2
    else:
        payload, line = first + b"\r" + second, 1
    dm, path = _sources(tmp_path, fmt, payload)
    with pytest.raises(DataFormatError) as error:
        dm.prepare_data()
    assert_located(error, path, line, "bare carriage return")


@pytest.mark.parametrize("fmt", sorted(_VALID))
def test_crlf_line_ends_are_accepted_everywhere(tmp_path: Path, fmt: str) -> None:
    plain, _ = _sources(tmp_path / "lf", fmt, _VALID[fmt])
    crlf, _ = _sources(tmp_path / "crlf", fmt, _VALID[fmt].replace(b"\n", b"\r\n"))
    plain.prepare_data()
    crlf.prepare_data()
    assert crlf.fingerprint == plain.fingerprint


@pytest.mark.parametrize("fmt", sorted(_VALID))
def test_utf8_bom_is_accepted_by_every_reader(tmp_path: Path, fmt: str) -> None:
    """Item 6: a UTF-8 byte-order mark at the start of a file is accepted (and dropped) everywhere."""
    plain, _ = _sources(tmp_path / "plain", fmt, _VALID[fmt])
    bom, _ = _sources(tmp_path / "bom", fmt, _BOM + _VALID[fmt])
    plain.prepare_data()
    bom.prepare_data()
    assert bom.fingerprint == plain.fingerprint
    assert bom.meta["interactions"] == plain.meta["interactions"]


@pytest.mark.parametrize(
    ("clicks", "buys", "which", "line", "reason"),
    [
        # CR-only line ends would make this one wide row; written here without the CR, it is 7 fields.
        (f"{_DAT_CLICK},2,2014-04-07T10:54:09.868Z,214536500\n{_DAT_CLICK}\n", None, "clicks", 1,
         "expected 4 fields, got 7 (the columns are session, timestamp, item, category)"),
        (f"{_DAT_CLICK}\n2,2014-04-07T10:54:09.868Z,214536500\n", None, "clicks", 2,
         "expected 4 fields, got 3 (the columns are session, timestamp, item, category)"),
        (f"{_DAT_CLICK}\n{_DAT_CLICK},5\n", None, "clicks", 2,
         "expected 4 fields, got 5 (the columns are session, timestamp, item, category)"),
        (f"{_DAT_CLICK}\n", "1,2014-04-07T10:54:09.868Z,214536502,12462\n", "buys", 1,
         "expected 5 fields, got 4 (the columns are session, timestamp, item, price, quantity)"),
    ],
)
def test_dat_rows_must_have_the_official_field_count(
    tmp_path: Path, clicks: str, buys: str | None, which: str, line: int, reason: str
) -> None:
    """Item 2: the .dat reader used to keep the first columns of any row, whatever its width."""
    clicks_path = write_text(tmp_path / "yoochoose-clicks.dat", clicks)
    buys_path = write_text(tmp_path / "yoochoose-buys.dat", buys or "")
    dm = YooChooseDataModule(
        "official", data_dir=str(tmp_path), include_buys=buys is not None, cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(DataFormatError) as error:
        dm.prepare_data()
    assert_located(error, clicks_path if which == "clicks" else buys_path, line, reason)


def _deep_json(depth: int) -> str:
    return '{"item": 1, "asin": "A1", "x": ' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize(
    ("case", "line", "reason"),
    [
        ("review_time_beyond_int64", 2, "field 'unixReviewTime' is out of the int64 range"),
        ("steam_product_id_beyond_int64", 1, "field 'product_id' is out of the int64 range"),
        ("tsv_time_beyond_int64", 3, "Time is out of range"),
        ("json_nested_deeply", 1, "nested too deeply"),
        ("literal_nested_deeply", 1, "nested too deeply"),
        ("gzip_named_tsv", 1, "gzip-compressed, but its name does not end in .gz"),
        ("gzip_named_sequences", 1, "gzip-compressed, but its name does not end in .gz"),
    ],
)
def test_hostile_values_are_located_errors(tmp_path: Path, case: str, line: int, reason: str) -> None:
    """Item 6: values that used to reach polars, json or the terminal as raw exceptions or bytes."""
    if case == "review_time_beyond_int64":
        path = write_gz(
            tmp_path / "reviews_Beauty_5.json.gz",
            [review("A", "P", 1), json.dumps({"reviewerID": "B", "asin": "P", "unixReviewTime": 2**70})],
        )
        write_gz(tmp_path / "meta_Beauty.json.gz", ["{'asin': 'P'}"])
        dm = AmazonDataModule("beauty", "official", str(tmp_path), cache_dir=str(tmp_path / "c"))
    elif case == "steam_product_id_beyond_int64":
        steam_official(tmp_path)
        path = write_gz(
            tmp_path / "steam_reviews.json.gz",
            ["{u'username': u'a', u'product_id': 123456789012345678901234, u'date': u'2017-01-01'}"],
        )
        dm = SteamDataModule("official", str(tmp_path), cache_dir=str(tmp_path / "c"))
    elif case == "tsv_time_beyond_int64":
        path = write_text(
            tmp_path / "clicks-100k" / "train.tsv", "SessionId\tItemId\tTime\n1\t2\t3.0\n1\t2\t1e300\n"
        )
        write_text(tmp_path / "clicks-100k" / "test.tsv", "SessionId\tItemId\tTime\n9\t2\t3.0\n")
        dm = YooChooseDataModule("clicks_tsv", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    elif case == "json_nested_deeply":
        dm = _amazon_pre(tmp_path, "1 1\n")
        path = write_text(tmp_path / "pre" / "items.jsonl", _deep_json(200_000) + "\n")
    elif case == "literal_nested_deeply":
        steam_official(tmp_path)
        path = write_gz(tmp_path / "steam_games.json.gz", ["{u'id': u'10', u'tags': " + "[" * 200_000 + "]" * 200_000 + "}"])
        dm = SteamDataModule("official", str(tmp_path), min_interactions=3, cache_dir=str(tmp_path / "c"))
    elif case == "gzip_named_tsv":
        path = tmp_path / "clicks-100k" / "train.tsv"
        path.parent.mkdir(parents=True)
        path.write_bytes(gzip.compress(b"SessionId\tItemId\tTime\n1\t2\t3.0\n"))
        write_text(tmp_path / "clicks-100k" / "test.tsv", "SessionId\tItemId\tTime\n9\t2\t3.0\n")
        dm = YooChooseDataModule("clicks_tsv", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    else:
        dm = _amazon_pre(tmp_path, "1 1\n")
        path = tmp_path / "pre" / "sequences.txt"
        path.write_bytes(gzip.compress(b"1 1 2\n"))
    with pytest.raises(DataFormatError) as error:
        dm.prepare_data()
    assert_located(error, path, line, reason)
    assert str(error.value).isprintable(), "no binary bytes in the message"


def test_duplicates_are_kept_and_counted(tmp_path: Path) -> None:
    """Item 7: exact duplicate events and repeated raw item ids are kept, counted and shown."""
    reviews = write_gz(
        tmp_path / "raw" / "reviews_Beauty_5.json.gz",
        [review("A", "P", 1), review("A", "P", 1), review("A", "Q", 2), review("A", "P", 3), review("B", "Q", 2)],
    )
    write_gz(tmp_path / "raw" / "meta_Beauty.json.gz", ["{'asin': 'P'}", "{'asin': 'Q'}"])
    dm = AmazonDataModule("beauty", "official", str(reviews.parent), cache_dir=str(tmp_path / "c"))
    _, _, meta = prepared(dm)
    assert meta["interactions"] == 5  # kept
    assert meta["duplicates"] == {
        "exact duplicate interactions (same user, item and order as another row; kept)": 1,
        "repeat interactions (the user's item seen before, exact duplicates included; kept)": 2,
        "items sharing a raw id with an earlier item (kept)": 0,
    }
    dm.setup()
    text = format_stats(dm.stats(), dm.split_counts, None)
    assert "duplicates (kept):" in text
    assert "1  exact duplicate interactions" in text

    pre = _amazon_pre(
        tmp_path / "pre", "1 1 2 1\n2 2 2\n", [{"item": 1, "asin": "X"}, {"item": 2, "asin": "X"}]
    )
    _, items, meta = prepared(pre)
    assert items.height == 2
    assert meta["duplicates"] == {
        "exact duplicate interactions (same user, item and order as another row; kept)": 0,
        "repeat interactions (the user's item seen before, exact duplicates included; kept)": 2,
        "items sharing a raw id with an earlier item (kept)": 1,
    }

    clicks = write_text(
        tmp_path / "y" / "clicks-100k" / "train.tsv", "SessionId\tItemId\tTime\n1\t2\t3.0\n1\t2\t3.0\n1\t5\t4\n"
    )
    write_text(clicks.parent / "test.tsv", "SessionId\tItemId\tTime\n9\t2\t3.0\n")
    yoo = YooChooseDataModule("clicks_tsv", data_dir=str(tmp_path / "y"), cache_dir=str(tmp_path / "c"))
    _, _, meta = prepared(yoo)
    assert meta["interactions"] == 4
    assert meta["duplicates"]["exact duplicate interactions (same user, item and order as another row; kept)"] == 1


# ---------------------------------------------------------------------- cache faults (issue 15)
def _toys(tmp_path: Path) -> AmazonDataModule:
    return AmazonDataModule("toys", "preprocessed", str(tmp_path / "pre"), cache_dir=str(tmp_path / "c"))


def _damage(cache: Path, how: str) -> None:
    interactions = cache / "interactions.parquet"
    if how == "truncated_parquet":
        data = interactions.read_bytes()
        interactions.write_bytes(data[: len(data) // 2])
    elif how == "fewer_rows":
        polars.read_parquet(interactions).head(3).write_parquet(interactions)
    elif how == "ids_beyond_n":
        polars.read_parquet(interactions).with_columns(item=polars.col("item") + 100).write_parquet(interactions)
    elif how == "meta_missing":
        (cache / "meta.json").unlink()
    elif how == "meta_garbage":
        (cache / "meta.json").write_text("{not json")
    elif how == "items_missing":
        (cache / "items.parquet").unlink()
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["truncated_parquet", "fewer_rows", "ids_beyond_n", "meta_missing", "meta_garbage", "items_missing"]
)
def test_damaged_cache_is_rebuilt(tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture) -> None:
    """Item 3: a cache that does not verify is rebuilt (and the rebuild says why), never trusted."""
    amazon_preprocessed(tmp_path / "pre")
    first = _toys(tmp_path)
    first.prepare_data()
    expected = (first.meta["users"], first.meta["items"], first.meta["interactions"], first.fingerprint)
    _damage(first.cache_path, how)
    again = _toys(tmp_path)
    with caplog.at_level("WARNING", logger="recbench.data"):
        report = prepare(again)
    assert not report.cache_hit
    assert report.rebuilt_because is not None and "did not verify" in report.state
    assert any("did not verify" in record.getMessage() for record in caplog.records)
    assert again.cache_path == first.cache_path
    again.setup()
    stats = again.stats()
    assert (stats.users, stats.items, stats.interactions, stats.fingerprint) == expected
    assert prepare(_toys(tmp_path)).cache_hit  # verified now
    leftovers = [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]
    assert leftovers == [], "no staging or stale directories are left behind"


def test_same_size_edit_with_the_old_mtime_changes_the_cache_key(tmp_path: Path) -> None:
    """Item 4: ``cp -p`` / ``rsync -t`` / ``tar`` keep size and mtime; the content hash still sees it."""
    amazon_preprocessed(tmp_path / "pre")
    sequences = tmp_path / "pre" / "sequences.txt"
    old = _toys(tmp_path)
    old.prepare_data()
    old_path = old.cache_path  # a property: evaluated after the edit it would follow the new content
    stat = sequences.stat()
    # Same size, same inode, old mtime restored: what `cp -p` over an existing file does.
    with open(sequences, "r+b") as handle:
        handle.write(b"1 2 1 3\n2 3 1\n3 2 2 4 1\n")
    os.utime(sequences, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = sequences.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    new = _toys(tmp_path)
    assert new.cache_path != old_path
    interactions, _, _ = prepared(new)
    assert sequence_of(interactions, 1) == [2, 1, 3]
    # The key covers contents, not names or places: a copy of the same files elsewhere shares it.
    copy = tmp_path / "copy" / "pre"
    copy.mkdir(parents=True)
    for path in (sequences, tmp_path / "pre" / "items.jsonl"):
        (copy / path.name).write_bytes(path.read_bytes())
    moved = AmazonDataModule("toys", "preprocessed", str(copy), cache_dir=str(tmp_path / "c"))
    assert moved.cache_path == new.cache_path


def _two_item_text_versions(tmp_path: Path) -> tuple[AmazonDataModule, AmazonDataModule]:
    """The same interactions with two versions of one title (``Two`` -> ``Tw0``), both prepared."""
    amazon_preprocessed(tmp_path / "pre")
    a = AmazonDataModule("toys", "preprocessed", str(tmp_path / "pre"), cache_dir=str(tmp_path / "c"))
    a.prepare_data()
    amazon_preprocessed(tmp_path / "pre2")
    items = tmp_path / "pre2" / "items.jsonl"
    write_text(items, items.read_text().replace('"title": "Two"', '"title": "Tw0"'))
    b = AmazonDataModule("toys", "preprocessed", str(tmp_path / "pre2"), cache_dir=str(tmp_path / "c"))
    b.prepare_data()
    return a, b


def test_fingerprint_covers_item_text(tmp_path: Path) -> None:
    """Item 5: two item-text versions give two data fingerprints (rows can be told apart)."""
    a, b = _two_item_text_versions(tmp_path)
    assert (a.meta["interactions"], a.meta["items"]) == (b.meta["interactions"], b.meta["items"])
    assert a.fingerprint != b.fingerprint


def test_item_side_caches_are_keyed_by_the_data_fingerprint(tmp_path: Path) -> None:
    """Item 5: embeddings and semantic IDs of one item-text version are never found for another."""
    from recbench.item_side import item_side_cache_for

    a, b = _two_item_text_versions(tmp_path)
    assert item_side_cache_for(a) != item_side_cache_for(b)
    assert b.fingerprint in item_side_cache_for(b).name
