"""Item representations for a datamodule: embeddings and semantic IDs, cached.

The two generative models (TIGER-style and DiffGRM) both call these, so a dataset's IDs are built
one way: item text -> sentence embeddings (:mod:`recbench.text`) where the dataset has text,
otherwise collaborative embeddings from training co-occurrence; then a tokenizer from
:mod:`recbench.semantic_ids` fitted on items of the training split only. The embedding source is
part of every result row.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from recbench.data import SeqRecDataModule, cache_root
from recbench.semantic_ids import SemanticIDConfig, SemanticIDs, cached_semantic_ids
from recbench.text import (
    DEFAULT_ENCODER,
    ItemEmbeddings,
    cached_item_embeddings,
    collaborative_item_embeddings,
    default_text_fields,
)

log = logging.getLogger(__name__)

#: How items that share a semantic ID are ordered (:func:`semantic_ids_for`).
ItemOrder = Literal["popularity", "item_id"]


def item_side_cache(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir) if cache_dir else cache_root() / "item_side"


def item_side_cache_for(data: SeqRecDataModule, cache_dir: str | Path | None = None) -> Path:
    """The embedding and semantic-ID cache folder of one dataset version: keyed by the data
    fingerprint (interactions and every item-table column, text included), so entries built from
    one item-text version are never found for another, whatever the entries' own keys cover."""
    return item_side_cache(cache_dir) / f"{data.name}-{data.fingerprint}"


def item_embeddings_for(
    data: SeqRecDataModule,
    source: Literal["text", "collaborative"] = "text",
    encoder: str = DEFAULT_ENCODER,
    collaborative_dim: int = 64,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
) -> ItemEmbeddings:
    """Sentence embeddings of the dataset's item text (``source="text"``), or collaborative ones
    from training co-occurrence (``source="collaborative"``, or a dataset without item text)."""
    items = data.items_table
    chosen = default_text_fields(items) if source == "text" else []
    if chosen:
        return cached_item_embeddings(
            items, item_side_cache_for(data, cache_dir), encoder=encoder, fields=chosen, show_progress=show_progress
        )
    flat, offsets = data.train_sequences()
    return collaborative_item_embeddings((flat, offsets), data.num_items, dim=collaborative_dim)


def codebook_size_for(requested: int, train_items: int, model: str) -> tuple[int, str]:
    """Codes per digit that ``train_items`` training items can support, and a note when reduced.

    k-means needs at least as many training points as codes, so tiny datasets (tests, smoke runs)
    fall back to the largest power of two not above ``train_items``; the note (``""`` when the
    request stands) goes into the run's notes, and a WARNING is logged.
    """
    if train_items >= requested:
        return requested, ""
    size = 1 << (max(train_items, 1).bit_length() - 1)
    log.warning("%s: only %d training items for %d codes per digit; using %d", model, train_items, requested, size)
    return size, f"{requested}->{size} ({train_items} training items)"


def popularity_rank(counts: Tensor) -> Tensor:
    """(N + 1,) counts -> (N + 1,) rank: 0 = the most frequent item, ties by ascending item id."""
    order = torch.sort(counts, descending=True, stable=True).indices  # (N + 1,) item ids, most frequent first
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return rank


def semantic_ids_for(
    data: SeqRecDataModule,
    config: SemanticIDConfig,
    embeddings: ItemEmbeddings,
    cache_dir: str | Path | None = None,
    item_order: ItemOrder = "popularity",
) -> SemanticIDs:
    """Fit (or load) semantic IDs on the training items of ``data``.

    ``item_order`` orders the items that share an ID (TIGER's collision digit, DiffGRM's expansion
    of a decoded ID to its items): ``"popularity"`` (default; training occurrences, most frequent
    first, so a decoded ID shows its likeliest item first; training data only) or ``"item_id"``
    (ascending id, the earlier behaviour). The fitted codes are cached without it; the order is
    applied after loading.

    faiss runs on one thread here: on small machines its multi-threaded k-means busy-waits against
    BLAS (10x slower), and PQ codes depend on the thread count, so one thread is also what makes
    the IDs reproducible across machines.
    """
    if embeddings.num_items != data.num_items:
        raise ValueError(f"embeddings cover {embeddings.num_items} items, the data has {data.num_items}")
    sids = cached_semantic_ids(
        embeddings.vectors.to(torch.float32), data.train_item_mask(), config, item_side_cache_for(data, cache_dir),
        fit_threads=1,
    )
    if item_order == "item_id":
        return sids
    return sids.ordered_by(popularity_rank(data.train_item_counts()), "training popularity")
