"""The names of the metrics, free of torch: the leaderboard reads result tables by these names and
must start without importing torch (seconds). :mod:`recbench.metrics` and :mod:`recbench.model`
re-export them."""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_KS: tuple[int, ...] = (5, 10, 20)
METRIC_FAMILIES: tuple[str, ...] = ("recall", "ndcg", "mrr")
#: Suffix of the metrics computed with history items excluded from the ranking.
EXCLUDED_SUFFIX = "_excl"
#: Prefix of the ID-level metrics of models whose items can share an ID (``id_ndcg@10``).
ID_LEVEL_PREFIX = "id_"


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """Names in the fixed reporting order: ``recall@5, ndcg@5, mrr@5, recall@10, ...``."""
    return [f"{family}@{k}" for k in ks for family in METRIC_FAMILIES]
