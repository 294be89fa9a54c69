"""The batch contract shared by every datamodule and every model.

A batch is a plain ``dict[str, Tensor]`` with these keys:

- ``history``: LongTensor ``(B, L)``, left-padded with :data:`PAD_ID`, most recent item last.
- ``target``:  LongTensor ``(B,)``, the next item, in ``1..N``.
- ``user``:    LongTensor ``(B,)``, the user (or session) id of the case.

Evaluation batches also carry ``case``: LongTensor ``(B,)``, the index of the case in its split, so
per-case results of two runs can be paired (a session split has several cases per user).

Training batches in *sequence* form carry ``sequence`` instead of ``history``/``target``:
LongTensor ``(B, L + 1)``, the left-padded training prefix; every non-pad position after the first
real item is a target (SASRec's all-position loss).

Left padding keeps the newest item at position ``L - 1`` for every row, so models that read "the
last position" need no gather, and models that count positions from the oldest item derive them from
``history != PAD_ID``.
"""

from __future__ import annotations

import torch

PAD_ID = 0

HISTORY = "history"
TARGET = "target"
USER = "user"
CASE = "case"
SEQUENCE = "sequence"

Batch = dict[str, torch.Tensor]


def history_mask(history: torch.Tensor) -> torch.Tensor:
    """Boolean mask of real (non-pad) items, same shape as ``history``."""
    return history != PAD_ID


def left_pad_windows(
    items: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, length: int
) -> torch.Tensor:
    """Gather ``items[max(start, end - length):end]`` per row, left-padded to ``length``.

    ``items`` is the flat item array of all sequences (CSR layout); ``starts``/``ends`` (B,) bound
    each row's sequence. Vectorised: one gather for the whole batch.
    """
    index = ends.unsqueeze(1) - length + torch.arange(length).unsqueeze(0)  # (B, L)
    valid = index >= starts.unsqueeze(1)
    gathered = items[index.clamp(min=0)]
    return torch.where(valid, gathered, torch.zeros_like(gathered))


def trim_left_padding(grid: torch.Tensor) -> torch.Tensor:
    """Drop the leading columns of a left-padded ``(B, L)`` grid that are padding in every row.

    The one implementation every model uses (SASRec, TIGER, DiffGRM): with left padding the newest
    item stays last, and every model counts positions from the newest item or from the mask, so
    the result is unchanged and only the cost falls (most Beauty histories fill under 10 of 50
    slots). A grid with no real item keeps its last column, so shapes stay non-empty. The column
    index is read on the host (one sync per batch), the price of a narrower grid.
    """
    used = (grid != PAD_ID).any(dim=0)  # (L,)
    first = int(used.to(torch.int8).argmax()) if bool(used.any()) else grid.shape[1] - 1
    return grid[:, first:]  # (B, L')


def padding_slots(grid: torch.Tensor) -> tuple[int, int]:
    """``(padded slots, all slots)`` of a ``(B, L)`` item grid (``PAD_ID`` = padding)."""
    return int((grid == PAD_ID).sum()), grid.numel()
