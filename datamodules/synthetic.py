"""Deterministic synthetic sequences with real sequential structure, shaped like Amazon Beauty.

The generator is a two-level Markov chain:

- items belong to clusters; within a cluster, item popularity follows a Zipf law;
- with probability ``follow_prob`` the next item is the current item's fixed *follow-up* item (an
  item-level signal that only a sequential model can exploit);
- otherwise the next cluster is drawn from the current cluster's few successor clusters and the
  item from that cluster's popularity.

So a most-popular ranking is a weak floor and a sequential model clearly beats it. At ``scale=1``
there are 22,363 users and 12,101 items with about 8.9 interactions per user (lengths 5 + a
geometric tail, like a 5-core set); ``scale`` multiplies users and items for tiny test sets.
Timestamps are synthetic but real in kind (increasing per user), so ``split="temporal"`` works.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars

from recbench.data import DEFAULT_LENGTH_BUCKETS, CanonicalTables, SeqRecDataModule

BEAUTY_USERS = 22_363
BEAUTY_ITEMS = 12_101
BEAUTY_MEAN_LENGTH = 8.88


class SyntheticDataModule(SeqRecDataModule):
    """Beauty-shaped synthetic data; needs no files and no network.

    Args:
        scale: multiplies the number of users and items (1.0 = Beauty-sized).
        seed: generator seed; the same seed gives the same tables.
        follow_prob: probability that the next item is the current item's follow-up item.
        min_length: shortest user sequence (5, as in a 5-core set).
        **kwargs: :class:`~recbench.data.SeqRecDataModule` options.
    """

    name = "synthetic"
    parser_version = 1

    def __init__(
        self,
        scale: float = 1.0,
        seed: int = 0,
        follow_prob: float = 0.5,
        min_length: int = 5,
        max_len: int = 50,
        split: str = "leave_one_out",
        train_format: str = "auto",
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        num_workers: int = 0,
        val_subset: int | None = None,
        split_seed: int = 0,
        cache_dir: str | None = None,
        length_buckets: int | None = DEFAULT_LENGTH_BUCKETS,
    ) -> None:
        super().__init__(
            max_len=max_len,
            split=split,  # type: ignore[arg-type]
            train_format=train_format,  # type: ignore[arg-type]
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            val_subset=val_subset,
            split_seed=split_seed,
            cache_dir=cache_dir,
            length_buckets=length_buckets,
        )
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        if not 0.0 <= follow_prob <= 1.0:
            raise ValueError(f"follow_prob must be in [0, 1], got {follow_prob}")
        self.scale, self.seed, self.follow_prob, self.min_length = scale, seed, follow_prob, min_length
        # Result rows key on the name, so a scaled-down set must not share the full set's name.
        self.name = "synthetic" if scale == 1.0 else f"synthetic-x{scale:g}"

    def source_files(self) -> list[Path]:
        return []

    def preprocessing_signature(self) -> str:
        return f"scale={self.scale};seed={self.seed};follow={self.follow_prob};min_length={self.min_length}"

    def read_tables(self) -> CanonicalTables:
        rng = np.random.default_rng(self.seed)
        n_users = max(8, round(BEAUTY_USERS * self.scale))
        n_items = max(16, round(BEAUTY_ITEMS * self.scale))
        n_clusters = max(4, n_items // 100)

        cluster_of = rng.integers(0, n_clusters, size=n_items)  # (I,) item index -> cluster
        members = [np.flatnonzero(cluster_of == c) for c in range(n_clusters)]
        for c, m in enumerate(members):  # no empty cluster
            if m.size == 0:
                members[c] = np.array([rng.integers(0, n_items)])
        # Zipf popularity within each cluster, as cumulative distributions for vectorised draws.
        cdfs = []
        for m in members:
            weights = 1.0 / np.arange(1, m.size + 1) ** 1.1
            cdfs.append(np.cumsum(weights / weights.sum()))
        successors = rng.integers(0, n_clusters, size=(n_clusters, 3))
        successor_cdf = np.cumsum([0.6, 0.25, 0.15])
        follow_up = rng.integers(0, n_items, size=n_items)

        extra = rng.geometric(1.0 / (BEAUTY_MEAN_LENGTH - self.min_length + 1), size=n_users) - 1
        lengths = np.minimum(self.min_length + extra, 200)
        max_length = int(lengths.max())

        def draw_from_clusters(clusters: np.ndarray) -> np.ndarray:
            out = np.empty(clusters.size, dtype=np.int64)
            u = rng.random(clusters.size)
            for c in np.unique(clusters):
                rows = np.flatnonzero(clusters == c)
                index = np.searchsorted(cdfs[c], u[rows]).clip(max=members[c].size - 1)
                out[rows] = members[c][index]
            return out

        sequence = np.zeros((n_users, max_length), dtype=np.int64)
        current = draw_from_clusters(rng.integers(0, n_clusters, size=n_users))
        sequence[:, 0] = current
        for t in range(1, max_length):
            follow = rng.random(n_users) < self.follow_prob
            pick = np.searchsorted(successor_cdf, rng.random(n_users)).clip(max=2)
            next_cluster = successors[cluster_of[current], pick]
            current = np.where(follow, follow_up[current], draw_from_clusters(next_cluster))
            sequence[:, t] = current

        keep = np.arange(max_length)[None, :] < lengths[:, None]
        user = np.repeat(np.arange(1, n_users + 1), lengths)
        gaps = rng.exponential(86_400.0, size=(n_users, max_length)).astype(np.int64) + 1
        start_time = rng.integers(1_300_000_000, 1_400_000_000, size=(n_users, 1))
        timestamps = start_time + np.cumsum(gaps, axis=1)
        interactions = polars.DataFrame(
            {"user": user, "item": sequence[keep] + 1, "order": timestamps[keep]}
        )
        items = polars.DataFrame(
            {
                "item": np.arange(1, n_items + 1),
                "title": [f"Synthetic item {i} of cluster {cluster_of[i - 1]}" for i in range(1, n_items + 1)],
                "categories": [[f"Cluster {c}"] for c in cluster_of],
            }
        )
        return CanonicalTables(interactions=interactions, items=items, order_is_time=True)
