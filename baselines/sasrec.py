"""SASRec (Kang & McAuley, ICDM 2018), after the paper and its widely used
PyTorch port (pmixer/SASRec.pytorch).

Causal self-attention over the left-padded history; the hidden state at position t scores item j by
``F_t · E[j]`` with the output layer tied to the input item table.

Choices:

- pre-LN blocks (``norm_first``), LayerNorm eps 1e-8, FFN inner width = d with ReLU, a final
  LayerNorm; padded positions masked as keys and zeroed at the output;
- item embedding scaled by sqrt(d) plus a learned absolute position embedding (padding gets the zero
  position row); Xavier-normal initialisation of every matrix;
- ``loss="ce"`` (default): full-softmax cross-entropy over all N items at every valid position
  (Klenitskiy & Vasilev 2023 show it beats the original loss under full ranking). Only valid
  positions are gathered before the (M, d) x (d, N) product, which is the dominant cost;
- ``loss="bce1"``: the original binary cross-entropy with one uniformly sampled negative per
  position, resampled while it falls in the user's own window (as PM excludes the user's items).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from recbench.batch import PAD_ID, SEQUENCE, Batch
from recbench.losses import IGNORE_INDEX, linear_cross_entropy
from recbench.metrics import DEFAULT_KS
from recbench.model import SeqRecModel
from recbench.nn import Dropout, TransformerBlock, causal_padding_mask
from recbench.retrieval import exact_top_items


class SASRec(SeqRecModel):
    """SASRec with a tied output layer.

    Args:
        num_items: N (linked from the data).
        max_len: history length L (linked from the data); sizes the position table.
        hidden_size: d.
        num_blocks: transformer blocks.
        num_heads: attention heads.
        dropout: embedding, attention and FFN dropout.
        loss: ``ce`` (full softmax) or ``bce1`` (one sampled negative, the original).
        lr, weight_decay, ks: see :class:`~recbench.model.SeqRecModel`.
    """

    training_view = "sequence"

    def __init__(
        self,
        num_items: int,
        max_len: int = 50,
        hidden_size: int = 64,
        num_blocks: int = 2,
        num_heads: int = 1,
        dropout: float = 0.2,
        loss: Literal["ce", "bce1"] = "ce",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        ks: Sequence[int] = DEFAULT_KS,
    ) -> None:
        super().__init__(num_items, max_len, lr, weight_decay, ks)
        self.save_hyperparameters()
        self.loss_kind = loss
        self.item_embedding = nn.Embedding(num_items + 1, hidden_size, padding_idx=PAD_ID)
        self.position_embedding = nn.Embedding(max_len + 1, hidden_size, padding_idx=0)
        self.embedding_dropout = Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, num_heads, hidden_size, dropout, activation="relu", norm_eps=1e-8)
            for _ in range(num_blocks)
        )
        self.final_norm = nn.LayerNorm(hidden_size, eps=1e-8)
        self.scale = math.sqrt(hidden_size)
        for name, parameter in self.named_parameters():
            if parameter.dim() >= 2:
                nn.init.xavier_normal_(parameter)
            elif name.endswith("bias") and "norm" not in name:
                nn.init.zeros_(parameter)
        with torch.no_grad():
            self.item_embedding.weight[PAD_ID].zero_()
            self.position_embedding.weight[0].zero_()

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, L, d) for a left-padded history (B, L); zero at padded positions.

        Positions are anchored at the right: the newest slot is always position ``max_len``, as in
        a full-length window. So dropping leading columns that are padding in every row (see
        :func:`~recbench.batch.trim_left_padding`) changes nothing but the cost.
        """
        valid = history != PAD_ID  # (B, L)
        length = history.shape[1]
        if length > self.max_len:
            raise ValueError(f"history length {length} exceeds the model's max_len {self.max_len}")
        slots = torch.arange(self.max_len - length + 1, self.max_len + 1, device=history.device)
        positions = slots.unsqueeze(0) * valid  # (B, L)
        x = self.item_embedding(history) * self.scale + self.position_embedding(positions)
        x = self.embedding_dropout(x) * valid.unsqueeze(-1)
        mask = causal_padding_mask(valid)  # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x) * valid.unsqueeze(-1)  # (B, L, d)

    def loss(self, batch: Batch) -> torch.Tensor:
        sequence = batch[SEQUENCE]  # (B, L' + 1), trimmed by the datamodule
        inputs, targets = sequence[:, :-1], sequence[:, 1:]  # (B, L) each
        valid = (inputs != PAD_ID) & (targets != PAD_ID)  # (B, L)
        hidden = self.encode(inputs)  # (B, L, d)
        table = self.item_embedding.weight  # (N + 1, d)
        if self.loss_kind == "bce1":
            return self._bce_loss(hidden, sequence, targets, valid)
        labels = torch.where(valid, targets - 1, IGNORE_INDEX)  # (B, L)
        if hidden.device.type == "cpu":  # score the real positions only
            hidden, labels = hidden[valid], labels[valid]  # (M, d), (M,)
        # else selecting them costs a host sync; bucketed batches leave little padding to score
        return linear_cross_entropy(hidden, table[1:], labels)  # no (M, N) logits kept

    def _bce_loss(
        self, hidden: torch.Tensor, sequence: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """One sampled negative per position; means over the real positions (masks, no selection)."""
        table = self.item_embedding.weight
        negatives = self._sample_negatives(sequence, targets.shape)  # (B, L)
        positive_logit = (hidden * table[targets]).sum(-1)  # (B, L)
        negative_logit = (hidden * table[negatives]).sum(-1)
        weight = valid.to(hidden.dtype)
        count = weight.sum().clamp(min=1.0)
        return ((F.softplus(-positive_logit) + F.softplus(negative_logit)) * weight).sum() / count

    def _sample_negatives(self, sequence: torch.Tensor, shape: torch.Size, rounds: int = 5) -> torch.Tensor:
        """A uniform negative per position ``(B, L)``, redrawn (a fixed number of rounds, so no host
        read decides when to stop) while it lies in the user's window."""
        negatives = torch.randint(1, self.num_items + 1, shape, device=sequence.device)
        for _ in range(rounds):
            clash = (sequence.unsqueeze(1) == negatives.unsqueeze(2)).any(dim=2)  # (B, L)
            redraw = torch.randint(1, self.num_items + 1, shape, device=sequence.device)
            negatives = torch.where(clash, redraw, negatives)
        return negatives

    @torch.no_grad()
    def recommend(self, history: torch.Tensor, k: int) -> torch.Tensor:
        last = self.encode(history)[:, -1]  # (B, d): left padding puts the newest item last
        _, items = exact_top_items(last, self.item_embedding.weight, k)
        return items
