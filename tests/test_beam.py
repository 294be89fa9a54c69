"""Beam search over semantic-ID digits (recbench.beam): constrained search never yields an invalid ID
and, with a beam at least as wide as the number of IDs, returns them all by joint log-probability.

The ID set is hand-built (10 items, digits with 3, 4 and 2 codes inside a scorer vocabulary of 4
codes per digit); tests/test_tiger.py uses it too, for the model's exactness tests.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from recbench.beam import beam_search
from recbench.semantic_ids import PAD_CODE, SemanticIDs

HAND_CODES = [
    (0, 0, 0),
    (0, 0, 1),
    (0, 2, 0),
    (1, 1, 0),
    (1, 3, 0),
    (1, 3, 1),
    (2, 0, 0),
    (2, 1, 0),
    (2, 1, 1),
    (0, 3, 1),
]
HAND_SIZES = (3, 4, 2)  # digits 0 and 2 use fewer codes than the model's vocabulary of 4
VOCAB = 4
N_VALID = len(HAND_CODES)


def hand_sids() -> SemanticIDs:
    codes = torch.tensor([(PAD_CODE,) * 3, *HAND_CODES])
    return SemanticIDs(codes, HAND_SIZES, "hand-built")



class _TableScorer:
    """Stateless DigitStep: logits of digit t are a fixed random row per (user, prefix), with most
    mass deliberately on codes that lead to no item (so an unconstrained search would pick them)."""

    def __init__(self, users: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.tables = [torch.randn(users, VOCAB**t, VOCAB, generator=generator) * 3 for t in range(3)]
        for table in self.tables:
            table[..., VOCAB - 1] += 4.0  # code 3 is invalid at digits 0 and 2

    def prefix_index(self, prefix: torch.Tensor) -> torch.Tensor:
        weights = VOCAB ** torch.arange(prefix.shape[-1] - 1, -1, -1)
        return (prefix * weights).sum(-1)  # (B, w)

    def __call__(self, step: int, prefix: torch.Tensor, parents: torch.Tensor | None) -> torch.Tensor:
        table = self.tables[step]  # (B, V^t, V)
        index = self.prefix_index(prefix)  # (B, w)
        return table.gather(1, index.unsqueeze(-1).expand(-1, -1, VOCAB))  # (B, w, V)

    def log_prob(self, codes: torch.Tensor) -> torch.Tensor:
        """(M, n) IDs -> (B, M) joint log-probability, digit by digit."""
        total = 0.0
        for t, table in enumerate(self.tables):
            index = self.prefix_index(codes[:, :t]).expand(table.shape[0], -1)  # (B, M)
            rows = F.log_softmax(table, -1).gather(1, index.unsqueeze(-1).expand(-1, -1, VOCAB))  # (B, M, V)
            total = total + rows.gather(2, codes[:, t].expand(table.shape[0], -1).unsqueeze(-1)).squeeze(-1)
        return total


@pytest.mark.parametrize("seed", range(5))
def test_constrained_search_never_yields_an_invalid_id(seed: int) -> None:
    sids, users = hand_sids(), 6
    scorer = _TableScorer(users, seed)
    valid_codes = torch.tensor(HAND_CODES)
    log_p = scorer.log_prob(valid_codes)  # (B, 10)
    for beam in range(1, 13):
        result = beam_search(scorer, users, sids, beam, constrained=True)
        assert torch.equal(result.valid, result.alive) and bool(result.alive[:, 0].all())
        items = sids.items_for_keys(result.keys).item
        assert bool((items[result.alive] > 0).all())
        if beam >= N_VALID:  # exact: the top IDs by joint log-probability
            best = log_p.sort(dim=1, descending=True)
            assert torch.equal(items[:, :N_VALID] - 1, best.indices)
            assert torch.allclose(result.scores[:, :N_VALID], best.values, atol=1e-5)
            assert not bool(result.alive[:, N_VALID:].any())  # no more IDs exist
    free = beam_search(scorer, users, sids, 5, constrained=False)
    assert bool((free.alive & ~free.valid).any()), "the scorer should lure a free search to invalid IDs"
