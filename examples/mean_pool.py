"""A model of your own: the mean of the history's item embeddings, scored against every item."""

from __future__ import annotations

import torch
from torch import nn

from recbench.batch import HISTORY, PAD_ID, TARGET, Batch
from recbench.model import SeqRecModel


class MeanPool(SeqRecModel):
    """User vector = mean of the history's item embeddings; full-softmax loss over all items.

    Args:
        num_items: linked from the datamodule.
        max_len: linked from the datamodule.
        hidden_size: embedding width.
        lr: AdamW learning rate.
    """

    training_view = "pairs"  # one (history, target) pair per training position

    def __init__(self, num_items: int, max_len: int = 50, hidden_size: int = 64, lr: float = 1e-3) -> None:
        super().__init__(num_items, max_len, lr=lr)
        self.save_hyperparameters()
        self.items = nn.Embedding(num_items + 1, hidden_size, padding_idx=PAD_ID)

    def scores(self, history: torch.Tensor) -> torch.Tensor:
        mask = (history != PAD_ID).unsqueeze(-1).float()
        user = (self.items(history) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        scores = user @ self.items.weight.T  # (B, N + 1); column 0 is padding
        return scores.index_fill(1, torch.tensor([PAD_ID], device=scores.device), float("-inf"))

    def loss(self, batch: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(self.scores(batch[HISTORY]), batch[TARGET])

    @torch.no_grad()
    def recommend(self, history: torch.Tensor, k: int) -> torch.Tensor:
        top = self.scores(history).float().topk(min(k, self.num_items), dim=1).indices
        return nn.functional.pad(top, (0, k - top.shape[1]), value=PAD_ID)
