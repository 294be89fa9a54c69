"""`SeqRecModel`: the one LightningModule base every model extends.

A model implements two things (RecBole's small contract):

- ``loss(batch) -> Tensor`` (or its own ``training_step``), and
- ``recommend(history (B, L), k) -> (B, k)``: distinct item ids best first, 0 where it has fewer than
  ``k`` valid items, never the padding id as a real item.

Validation, test and predict steps live here only, so every model is evaluated by the same code:
full ranking, targets ranked by :class:`~recbench.metrics.RankingMetrics`, model selection on
``val/ndcg@10``. ``exclude_history=True`` asks the model for ``k + L`` items and drops those in the
history before keeping ``k``; it is off by default (repeat purchases exist) and is recorded.

The base also measures what the leaderboard reports besides quality: ``train/epoch_seconds`` and
``test/users_per_second``, and it keeps per-case test metrics for paired significance tests.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import ClassVar, Literal

import lightning.pytorch as pl
import torch

from recbench.batch import CASE, HISTORY, PAD_ID, TARGET, USER, Batch
from recbench.metrics import DEFAULT_KS, DecodeStats, RankingMetrics, case_metric_values, metric_names

SELECTION_METRIC = "val/ndcg@10"


class SeqRecModel(pl.LightningModule):
    """Base class. Subclasses call ``super().__init__(num_items, max_len, ...)`` first.

    Args:
        num_items: N, the number of real items (ids 1..N). Linked from the datamodule.
        max_len: history length the data provides. Linked from the datamodule.
        lr: learning rate of the default AdamW optimiser.
        weight_decay: AdamW weight decay.
        ks: cut-offs for Recall/NDCG/MRR.
        exclude_history: drop items of the history from the recommendations.
    """

    #: Which training view the model consumes: whole sequences or (history, target) pairs.
    training_view: ClassVar[Literal["sequence", "pairs"]] = "pairs"
    #: Epochs after which training cannot change the model (e.g. 1 for counting baselines).
    max_useful_epochs: ClassVar[int | None] = None

    def __init__(
        self,
        num_items: int,
        max_len: int = 50,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        ks: Sequence[int] = DEFAULT_KS,
        exclude_history: bool = False,
    ) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items = num_items
        self.max_len = max_len
        self.lr = lr
        self.weight_decay = weight_decay
        self.ks = tuple(sorted(set(ks)))
        if 10 not in self.ks:
            raise ValueError(f"ks must include 10: model selection uses {SELECTION_METRIC}; got {list(ks)}")
        self.exclude_history = exclude_history
        self.val_metrics = RankingMetrics(self.ks)
        self.test_metrics = RankingMetrics(self.ks)
        #: Generative models count invalid decoded IDs here from ``recommend``; logged per stage.
        self.decode_stats = DecodeStats()
        #: After a test epoch: case index, user and metric values (in ``metric_names(ks)`` order) per
        #: case, sorted by case index, gathered from every process.
        self.test_cases: torch.Tensor | None = None
        self.test_case_users: torch.Tensor | None = None
        self.test_case_values: torch.Tensor | None = None
        self._test_rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._clock: dict[str, float] = {}

    # ------------------------------------------------------------------ model contract
    def loss(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement loss(batch) or training_step")

    def recommend(self, history: torch.Tensor, k: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement recommend(history, k)")

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch[USER]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        parameters = [p for p in self.parameters() if p.requires_grad]
        if not parameters:
            return None
        return torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay)

    def on_train_epoch_start(self) -> None:
        self._clock["train"] = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        self.log("train/epoch_seconds", time.perf_counter() - self._clock["train"], sync_dist=True)

    # ------------------------------------------------------------------ evaluation (shared, final)
    def ranked_items(self, history: torch.Tensor, k: int) -> torch.Tensor:
        """``recommend`` plus the shared post-processing (history exclusion) and checks."""
        if not self.exclude_history:
            ranked = self.recommend(history, k)
        else:
            candidates = self.recommend(history, k + history.shape[1])  # (B, k + L)
            in_history = (candidates.unsqueeze(2) == history.unsqueeze(1)).any(dim=2) & (candidates != PAD_ID)
            keep = ~in_history
            # Stable compaction: kept items first, in their original order.
            order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
            ranked = torch.where(keep, candidates, torch.zeros_like(candidates)).gather(1, order)[:, :k]
        if ranked.shape != (history.shape[0], k) or ranked.dtype != torch.long:
            raise RuntimeError(
                f"{type(self).__name__}.recommend must return a LongTensor of shape {(history.shape[0], k)}, "
                f"got {ranked.dtype} {tuple(ranked.shape)}"
            )
        return ranked

    def _evaluate(self, batch: Batch, metrics: RankingMetrics) -> torch.Tensor:
        ranked = self.ranked_items(batch[HISTORY], max(self.ks))
        metrics.update(ranked, batch[TARGET])
        return ranked

    def on_validation_epoch_start(self) -> None:
        self.decode_stats.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        self._log_decode_stats("val")
        for name, value in values.items():
            self.log(f"val/{name}", value.float(), prog_bar=f"val/{name}" == SELECTION_METRIC)

    def on_test_epoch_start(self) -> None:
        self._test_rows = []
        self.decode_stats.reset()
        self._clock["test"] = time.perf_counter()

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        ranked = self._evaluate(batch, self.test_metrics)
        values = case_metric_values(ranked, batch[TARGET], self.ks)
        self._test_rows.append((batch[CASE].cpu(), batch[USER].cpu(), values.cpu()))

    def on_test_epoch_end(self) -> None:
        seconds = time.perf_counter() - self._clock["test"]
        local_cases = sum(len(cases) for cases, _, _ in self._test_rows)
        values = self.test_metrics.compute()
        self.test_metrics.reset()
        self._log_decode_stats("test")
        self.log_dict({f"test/{name}": value.float() for name, value in values.items()})
        # Each rank timed its own share in parallel: throughput adds up across ranks.
        self.log("test/users_per_second", local_cases / max(seconds, 1e-9), reduce_fx="sum", sync_dist=True)
        width = len(metric_names(self.ks))
        cases = torch.cat([c for c, _, _ in self._test_rows]) if self._test_rows else torch.zeros(0, dtype=torch.long)
        users = torch.cat([u for _, u, _ in self._test_rows]) if self._test_rows else torch.zeros(0, dtype=torch.long)
        rows = torch.cat([v for _, _, v in self._test_rows]) if self._test_rows else torch.zeros(0, width)
        if self.trainer.world_size > 1:
            gathered: list[tuple[torch.Tensor, ...] | None] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, (cases, users, rows))
            cases, users, rows = (torch.cat([g[i] for g in gathered if g is not None]) for i in range(3))
        order = torch.argsort(cases)
        self.test_cases, self.test_case_users, self.test_case_values = cases[order], users[order], rows[order]
        self._test_rows = []

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return {USER: batch[USER], "items": self.ranked_items(batch[HISTORY], max(self.ks))}

    def run_notes(self) -> dict[str, object]:
        """Settings a result row must record beyond the hyper-parameters (e.g. sampler, index kind)."""
        return {}

    def item_id_stats(self) -> dict[str, float]:
        """Static facts of the model's item IDs for result rows (e.g. ``collision_rate``); none here."""
        return {}

    def _log_decode_stats(self, stage: str) -> None:
        # Models that decode IDs update on every recommend call, so every rank agrees on this test.
        if self.decode_stats.update_count == 0:
            return
        invalid, candidates = self.decode_stats.compute()  # synced sums
        self.decode_stats.reset()
        if candidates > 0:
            self.log(f"{stage}/invalid_id_rate", (invalid / candidates).float())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
