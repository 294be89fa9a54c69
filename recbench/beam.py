"""Beam search over the digits of semantic IDs, for any digit-by-digit scorer (TIGER-style models).

A scorer (:class:`DigitStep`) returns the logits of digit ``t`` for every live beam; :func:`beam_search`
keeps the best ``beam_size`` partial IDs by summed log-probability, optionally constrained to prefixes of
real items (:meth:`~recbench.semantic_ids.SemanticIDs.prefix_table`). Users and beams are batched; the
only Python loop is over the ``n`` digits, and no step reads a device tensor on the host (the widths are
Python integers), so a GPU search never waits on a synchronisation.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor
from torch.nn import functional as F

from recbench.semantic_ids import INVALID_KEY, SemanticIDs


class DigitStep(Protocol):
    """One decoding step of a digit-by-digit SID model.

    Called with ``step`` = t, ``prefix`` (B, w, t) the codes of the current beams, and ``parents``
    (B, w) the index of each beam's parent among the previous step's beams (``None`` at t = 0, where
    every user has one empty beam). A stateful scorer (KV cache) re-orders its state by
    ``parents``. Returns the logits (B, w, V) of digit t given each prefix.
    """

    def __call__(self, step: int, prefix: Tensor, parents: Tensor | None) -> Tensor: ...


class BeamResult(NamedTuple):
    """Finished beams of :func:`beam_search`, best first per user.

    codes: (B, W, n) codes of each beam.
    scores: (B, W) joint log-probability; ``-inf`` for dead beams (fewer allowed IDs than W).
    keys: (B, W) packed SID keys; ``INVALID_KEY`` for dead beams and out-of-range codes.
    alive: (B, W) finite score: a decoded candidate.
    valid: (B, W) alive and the ID of a real item.
    """

    codes: Tensor
    scores: Tensor
    keys: Tensor
    alive: Tensor
    valid: Tensor


@torch.no_grad()
def beam_search(
    step_fn: DigitStep,
    batch_size: int,
    sids: SemanticIDs,
    beam_size: int,
    constrained: bool = True,
    device: torch.device | str | None = None,
) -> BeamResult:
    """Beam search over the ``sids.n_digits`` digits, batched over users x beams.

    At digit t every live beam's log-softmax over the V codes is added to its score; with
    ``constrained`` the codes that extend the prefix to no real item get ``-inf``
    (``sids.prefix_table(t)``; codes at or above the digit's codebook size, possible when the
    model's vocabulary is larger, are never allowed). The best ``beam_size`` of the ``w x V``
    children are kept (``torch.topk``, ties in unspecified order). The only Python loop is over
    the digits.

    Returns:
        :class:`BeamResult` with W = min(beam_size, number of children at the last step).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    device = sids.device if device is None else torch.device(device)
    prefix = torch.zeros(batch_size, 1, 0, dtype=torch.long, device=device)  # (B, 1, 0)
    scores = torch.zeros(batch_size, 1, device=device)  # (B, 1)
    parents: Tensor | None = None
    for step in range(sids.n_digits):  # n <= 8 digits; users and beams are batched
        logits = step_fn(step, prefix, parents)  # (B, w, V)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        vocab = log_probs.shape[-1]
        if constrained:
            allowed = sids.prefix_table(step).lookup(sids.pack(prefix))  # (B, w, K_t)
            width = allowed.shape[-1]
            if width > vocab:
                raise ValueError(f"digit {step} has {width} codes but the scorer returns {vocab} logits")
            if width < vocab:
                allowed = F.pad(allowed, (0, vocab - width), value=False)  # (B, w, V)
            log_probs = log_probs.masked_fill(~allowed, float("-inf"))
        total = (scores.unsqueeze(-1) + log_probs).flatten(1)  # (B, w * V)
        scores, flat = total.topk(min(beam_size, total.shape[1]), dim=1)  # (B, W) best first
        parents = torch.div(flat, vocab, rounding_mode="floor")  # (B, W)
        codes = flat - parents * vocab  # (B, W)
        inherited = prefix.gather(1, parents.unsqueeze(-1).expand(-1, -1, step))  # (B, W, t)
        prefix = torch.cat([inherited, codes.unsqueeze(-1)], dim=-1)  # (B, W, t + 1)
    alive = torch.isfinite(scores)  # (B, W)
    keys = torch.where(alive, sids.pack(prefix), torch.full_like(scores, INVALID_KEY, dtype=torch.long))
    valid = sids.items_for_keys(keys).valid & alive
    return BeamResult(prefix, scores, keys, alive, valid)
