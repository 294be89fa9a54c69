"""Most-popular items: the floor of every leaderboard.

Ranks items by how often they are a training target; ties go to the smaller item id (a stable sort),
so the ranking is deterministic. The same list is recommended to every user. Counting happens in
``training_step`` over the training loader, so the counts come from exactly the training targets
every other model learns from; each epoch adds the same counts again, which leaves the ranking
unchanged. Counts seen since the last evaluation are folded in (summed across processes under DDP)
when validation or test starts, since Lightning validates before ``on_train_epoch_end``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recbench.batch import PAD_ID, TARGET, Batch
from recbench.metrics import DEFAULT_KS
from recbench.model import SeqRecModel


class Popularity(SeqRecModel):
    """Recommends the most frequent training targets to everyone."""

    training_view = "pairs"
    max_useful_epochs = 1

    def __init__(
        self,
        num_items: int,
        max_len: int = 50,
        ks: Sequence[int] = DEFAULT_KS,
    ) -> None:
        super().__init__(num_items, max_len, lr=0.0, weight_decay=0.0, ks=ks)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.register_buffer("counts", torch.zeros(num_items + 1, dtype=torch.long))
        # DistributedDataParallel refuses a module without trainable parameters; this unused scalar
        # lets popularity run under --trainer.strategy ddp like every other model.
        self.ddp_anchor = torch.nn.Parameter(torch.zeros(()))
        self._local_counts = torch.zeros(num_items + 1, dtype=torch.long)

    def configure_optimizers(self) -> None:
        return None

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        self._local_counts = self._local_counts.to(self.device)
        self._local_counts.index_add_(0, batch[TARGET], torch.ones_like(batch[TARGET]))

    def _fold_counts(self) -> None:
        new_counts = self._local_counts.to(self.device)
        if self.trainer.world_size > 1:
            torch.distributed.all_reduce(new_counts)
        self.counts += new_counts
        self._local_counts = torch.zeros_like(self._local_counts)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self._fold_counts()

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._fold_counts()

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._fold_counts()

    @torch.no_grad()
    def recommend(self, history: torch.Tensor, k: int) -> torch.Tensor:
        counts = self.counts[1:]
        order = torch.sort(counts, descending=True, stable=True).indices[:k] + 1  # (k,) item ids
        order = torch.where(counts[order - 1] > 0, order, torch.full_like(order, PAD_ID))
        if order.numel() < k:
            order = torch.nn.functional.pad(order, (0, k - order.numel()), value=PAD_ID)
        return order.unsqueeze(0).expand(history.shape[0], k).contiguous()
