"""Full-ranking metrics from ranked item ids: Recall@K (= HR@K), NDCG@K and MRR@K.

Each evaluation case has exactly one target item. With 1-based rank ``r`` of the target in the
model's list (and a miss when it is absent from the first K):

- Recall@K = 1 if r <= K else 0
- NDCG@K   = 1 / log2(r + 1) if r <= K else 0  (IDCG = 1)
- MRR@K    = 1 / r if r <= K else 0

The metric state is an integer histogram of target ranks plus a case count. All three metrics are
functions of that histogram, so the DDP reduction (a sum of integers) is exact and the metrics of
two processes are bit-identical to those of one; ``compute`` runs on the host, so they are also the
same bits whichever device evaluated the cases.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from recbench.batch import PAD_ID

# Defined torch-free (the leaderboard reads tables by these names); re-exported here.
from recbench.metric_names import DEFAULT_KS as DEFAULT_KS
from recbench.metric_names import METRIC_FAMILIES as METRIC_FAMILIES
from recbench.metric_names import metric_names as metric_names


def target_ranks(ranked: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1-based rank of ``target`` in each row of ``ranked`` (B, K); 0 where it is absent.

    Only the first occurrence counts, so a list that repeats the target is not rewarded twice.
    """
    if ranked.dim() != 2 or target.dim() != 1 or ranked.shape[0] != target.shape[0]:
        raise ValueError(
            f"expected ranked (B, K) and target (B,), got {tuple(ranked.shape)} and {tuple(target.shape)}"
        )
    if bool((target == PAD_ID).any()):
        raise ValueError("a target is the padding id 0; targets must be real items 1..N")
    hits = ranked == target.unsqueeze(1)  # (B, K)
    any_hit = hits.any(dim=1)
    first = hits.to(torch.int8).argmax(dim=1)  # first True per row (0 when none)
    return torch.where(any_hit, first + 1, torch.zeros_like(first))


def rank_weights(max_k: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Per-rank contribution of a hit at rank r = 1..max_k, for each metric family (float64)."""
    rank = torch.arange(1, max_k + 1, dtype=torch.float64, device=device)
    return {"recall": torch.ones_like(rank), "ndcg": 1.0 / torch.log2(rank + 1.0), "mrr": 1.0 / rank}


def case_metric_values(
    ranked: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = DEFAULT_KS
) -> torch.Tensor:
    """Per-case metric values (B, len(metric_names(ks))), float64, in :func:`metric_names` order.

    Used for paired significance tests between models on the same cases.
    """
    ranks = target_ranks(ranked, target)  # (B,)
    weights = rank_weights(max(ks), device=ranked.device)
    columns = []
    for k in ks:
        hit = (ranks >= 1) & (ranks <= k)
        index = (ranks - 1).clamp(min=0)
        for family in METRIC_FAMILIES:
            columns.append(torch.where(hit, weights[family][index], torch.zeros_like(weights[family][index])))
    return torch.stack(columns, dim=1)


class RankingMetrics(Metric):
    """Recall, NDCG and MRR at each K in ``ks`` over full-ranking top-K lists.

    ``update(ranked, target)`` takes ranked item ids (B, K') best first, with K' >= max(ks)
    recommended (a shorter list scores its missing slots as misses) and 0 for empty slots, and the
    target ids (B,).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: Sequence[int] = DEFAULT_KS) -> None:
        super().__init__()
        if not ks or any(k < 1 for k in ks):
            raise ValueError(f"ks must be positive cut-offs, got {list(ks)}")
        self.ks = tuple(sorted(set(int(k) for k in ks)))
        self.max_k = max(self.ks)
        self.add_state("rank_counts", default=torch.zeros(self.max_k, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_cases", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, ranked: torch.Tensor, target: torch.Tensor) -> None:
        ranks = target_ranks(ranked[:, : self.max_k], target)
        hit_ranks = ranks[ranks > 0] - 1
        # Out-of-place: Lightning resets metrics under inference mode, and an in-place update of such
        # a state outside inference mode (a plain no_grad call after trainer.test) is an error.
        self.rank_counts = self.rank_counts + torch.bincount(hit_ranks, minlength=self.max_k)
        self.num_cases = self.num_cases + target.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        if int(self.num_cases) == 0:
            raise RuntimeError("RankingMetrics.compute() called before any case was evaluated")
        # On the host: float64 log2 and sums differ in the last bit between CPU and CUDA kernels, and
        # a metric must not depend on the device that evaluated it.
        device = self.rank_counts.device
        weights = rank_weights(self.max_k)
        counts = self.rank_counts.cpu().to(torch.float64)
        total = self.num_cases.cpu().to(torch.float64)
        return {
            f"{family}@{k}": ((counts[:k] * weights[family][:k]).sum() / total).to(device)
            for k in self.ks
            for family in METRIC_FAMILIES
        }


class DecodeStats(Metric):
    """Share of invalid IDs among decoded candidates (generative models).

    A semantic-ID model calls ``update(invalid, candidates)`` in ``recommend`` with the number of
    decoded IDs that map to no item and the number of decoded IDs; integer sums, so exact in DDP.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("invalid", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("candidates", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, invalid: int | torch.Tensor, candidates: int | torch.Tensor) -> None:
        # Out-of-place for the same reason as RankingMetrics.update.
        self.invalid = self.invalid + torch.as_tensor(invalid, dtype=torch.long, device=self.invalid.device)
        self.candidates = self.candidates + torch.as_tensor(candidates, dtype=torch.long, device=self.candidates.device)

    def compute(self) -> torch.Tensor:
        """``(invalid, candidates)`` as float64; the rate is their ratio."""
        return torch.stack([self.invalid.double(), self.candidates.double()])
