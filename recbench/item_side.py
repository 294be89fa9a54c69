"""Item representations for a datamodule: embeddings and semantic IDs, cached.

The two generative models (TIGER-style and DiffGRM) both call these, so a dataset's IDs are built
one way: item text -> sentence embeddings (:mod:`recbench.text`) where the dataset has text,
otherwise collaborative embeddings from training co-occurrence; then a tokenizer from
:mod:`recbench.semantic_ids` fitted on items of the training split only. The embedding source is
part of every result row.
"""

from __future__ import annotations

from pathlib import Path

import torch

from recbench.data import SeqRecDataModule, cache_root
from recbench.semantic_ids import SemanticIDConfig, SemanticIDs, cached_semantic_ids, faiss_threads
from recbench.text import (
    DEFAULT_ENCODER,
    ItemEmbeddings,
    cached_item_embeddings,
    collaborative_item_embeddings,
    default_text_fields,
)


def item_side_cache(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir) if cache_dir else cache_root() / "item_side"


def item_embeddings_for(
    data: SeqRecDataModule,
    encoder: str = DEFAULT_ENCODER,
    fields: tuple[str, ...] | None = None,
    collaborative_dim: int = 64,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
) -> ItemEmbeddings:
    """Sentence embeddings of the dataset's item text, or collaborative ones where it has none."""
    items = data.items_table
    chosen = list(fields) if fields is not None else default_text_fields(items)
    if chosen:
        return cached_item_embeddings(
            items, item_side_cache(cache_dir), encoder=encoder, fields=chosen, show_progress=show_progress
        )
    flat, offsets = data.train_sequences()
    return collaborative_item_embeddings((flat, offsets), data.num_items, dim=collaborative_dim)


def semantic_ids_for(
    data: SeqRecDataModule,
    config: SemanticIDConfig,
    embeddings: ItemEmbeddings,
    cache_dir: str | Path | None = None,
) -> SemanticIDs:
    """Fit (or load) semantic IDs on the training items of ``data``.

    faiss runs on one thread here: on small machines its multi-threaded k-means busy-waits against
    BLAS (10x slower), and PQ codes depend on the thread count, so one thread is also what makes
    the IDs reproducible across machines.
    """
    if embeddings.num_items != data.num_items:
        raise ValueError(f"embeddings cover {embeddings.num_items} items, the data has {data.num_items}")
    with faiss_threads(1):
        return cached_semantic_ids(
            embeddings.vectors.to(torch.float32), data.train_item_mask(), config, item_side_cache(cache_dir)
        )
