"""TIGER-style model: exact constrained beam search, invalid-ID accounting, checkpoints, learning.

The exactness tests use a hand-built ID set (10 items, digits with 3, 4 and 2 codes inside a model
vocabulary of 4 codes per digit) and a randomly weighted model: the teacher-forced joint
log-probability of every ID (:meth:`TIGER.sequence_log_prob`, the plain full forward) is the brute
force that the KV-cached beam search must reproduce.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import fit_and_test, quiet_trainer
from torch.nn import functional as F

from baselines.tiger import TIGER, beam_search
from benchmark.registry import instantiate_model
from datamodules.synthetic import SyntheticDataModule
from recbench.batch import PAD_ID
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


def hand_model(encoder_input: str = "flat", output_head: str = "tied", head_dim: int | None = None) -> TIGER:
    """A random model over the hand-built IDs; weights drawn wide so that probabilities are far from ties."""
    torch.manual_seed(0)
    model = TIGER(
        num_items=N_VALID,
        max_len=6,
        history_items=6,
        encoder_input=encoder_input,  # type: ignore[arg-type]
        hidden_size=32,
        encoder_layers=1,
        decoder_layers=2,
        num_heads=2,
        head_dim=head_dim,
        ffn_size=64,
        dropout=0.0,
        output_head=output_head,  # type: ignore[arg-type]
        levels=2,
        codebook_size=VOCAB,
        beam_size=N_VALID,
    )
    with torch.no_grad():
        for parameter in model.network.parameters():
            parameter.normal_(0.0, 0.3)
    model.set_semantic_ids(hand_sids())
    return model.eval()


def histories() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    history = torch.randint(1, N_VALID + 1, (7, 6), generator=generator)
    history[0, :5] = PAD_ID  # one item
    history[1, :3] = PAD_ID
    return history


def brute_force(model: TIGER, history: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(B, M) teacher-forced joint log-probability of each of the M IDs ``codes`` (M, n)."""
    return model.sequence_log_prob(history, codes.expand(history.shape[0], -1, -1))


@pytest.mark.parametrize(
    ("encoder_input", "output_head", "head_dim"), [("flat", "tied", None), ("item", "separate", 24)]
)
def test_beam_returns_exactly_the_most_probable_valid_items(encoder_input, output_head, head_dim) -> None:
    model = hand_model(encoder_input, output_head, head_dim)
    history = histories()
    valid_codes = torch.tensor(HAND_CODES)  # item i has row i - 1
    log_p = brute_force(model, history, valid_codes)  # (B, 10)
    best = log_p.argsort(dim=1, descending=True)  # (B, 10)
    # beam >= number of valid IDs: the search is exact, scores are the joint log-probabilities
    result = model.decode(history, beam_size=N_VALID)
    assert bool(result.valid.all())
    assert torch.allclose(result.scores, log_p.gather(1, best), atol=1e-4)
    assert torch.equal(model.recommend(history, N_VALID), best + 1)
    assert torch.equal(model.recommend(history, 4), best[:, :4] + 1)
    # k beyond the number of items: every item once, then PAD
    ranked = model.recommend(history, N_VALID + 3)
    assert torch.equal(ranked[:, :N_VALID], best + 1) and bool((ranked[:, N_VALID:] == PAD_ID).all())


@pytest.mark.parametrize("encoder_input", ["flat", "item"])
def test_packed_encoder_equals_the_padded_forward(encoder_input: str) -> None:
    model = hand_model(encoder_input)
    codes = model.sid_codes[histories()]  # (B, L, n), with padded rows
    packed, valid = model.network.encode(codes)
    padded, valid_ref = model.network.encode(codes, packed=False)
    assert torch.equal(valid, valid_ref)
    assert torch.allclose(packed[valid], padded[valid], atol=1e-5)
    assert bool((packed[~valid] == 0).all())


def test_small_beam_returns_valid_distinct_items_with_their_true_scores() -> None:
    model = hand_model()
    history = histories()
    log_p = brute_force(model, history, torch.tensor(HAND_CODES))  # (B, 10)
    for beam in (1, 2, 3, 5):
        result = model.decode(history, beam_size=beam)
        assert bool(result.valid.all()) and result.keys.shape == (len(history), beam)
        items = hand_sids().items_for_keys(result.keys).item  # (B, beam)
        assert torch.allclose(result.scores, log_p.gather(1, items - 1), atol=1e-4)
        model.beam_size = beam
        ranked = model.recommend(history, 8)
        assert torch.equal(ranked[:, :beam], items) and bool((ranked[:, beam:] == PAD_ID).all())
        assert all(len(set(row.tolist())) == beam for row in ranked[:, :beam])
    # beam 1 is greedy under the constraint: the best first code, then the best allowed next codes
    assert bool((model.decode(history, beam_size=1).scores <= log_p.max(1, keepdim=True).values + 1e-5).all())


def test_unconstrained_search_is_exact_and_counts_invalid_ids() -> None:
    model = hand_model()
    history = histories()
    every_code = torch.tensor(list(itertools.product(range(VOCAB), repeat=3)))  # (64, 3): all tuples
    log_p_all = brute_force(model, history, every_code)  # (B, 64)
    result = model.decode(history, beam_size=len(every_code), constrained=False)
    assert torch.allclose(result.scores, log_p_all.sort(dim=1, descending=True).values, atol=1e-4)
    # Constrained scores are not renormalised, so filtering the exact unconstrained list afterwards
    # gives the constrained ranking.
    best = brute_force(model, history, torch.tensor(HAND_CODES)).argsort(dim=1, descending=True) + 1
    model.constrained, model.beam_size = False, len(every_code)
    model.decode_stats.reset()
    assert torch.equal(model.recommend(history, N_VALID), best)
    invalid, candidates = model.decode_stats.compute().tolist()
    assert (invalid, candidates) == (len(history) * (64 - N_VALID), len(history) * 64)
    # a small unconstrained beam: invalid IDs are dropped and counted, never returned
    model.beam_size = 6
    model.decode_stats.reset()
    result = model.decode(history)
    ranked = model.recommend(history, 6)
    invalid, candidates = model.decode_stats.compute().tolist()
    assert candidates == result.alive.sum() and invalid == (result.alive & ~result.valid).sum()
    assert invalid > 0, "a random model should decode some invalid IDs without the constraint"
    assert torch.equal((ranked != PAD_ID).sum(1), result.valid.sum(1))
    # constrained: zero invalid, counted as such
    model.constrained = True
    model.decode_stats.reset()
    model.recommend(history, 6)
    assert model.decode_stats.compute().tolist() == [0.0, len(history) * 6]


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


def test_recommend_needs_semantic_ids() -> None:
    model = TIGER(num_items=5, max_len=4, hidden_size=16, num_heads=2, ffn_size=16, codebook_size=4, levels=2)
    with pytest.raises(RuntimeError, match="no semantic IDs"):
        model.recommend(torch.tensor([[0, 1, 2, 3]]), 3)
    with pytest.raises(ValueError, match="exceed the vocabulary"):
        wide = SemanticIDs(torch.tensor([[PAD_CODE] * 3] + [[i, 0, 0] for i in range(5)]), (5, 1, 1), "x")
        model.set_semantic_ids(wide)


def test_checkpoint_decodes_without_data_and_records_the_fallback(tiny_data, tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = instantiate_model(
        "tiger",
        tiny_data.num_items,
        tiny_data.max_len,
        embedding_source="collaborative",
        hidden_size=32,
        ffn_size=64,
        num_heads=2,
    )
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(model, datamodule=tiny_data)
    notes = model.run_notes()
    assert notes["codebook_fallback"].startswith("256->128") and notes["codebook_sizes"] == [128] * 4
    assert notes["embedding_source"].startswith("cooccurrence") and notes["beam_size"] == 20
    assert 0.0 <= model.item_id_stats()["collision_rate"] < 1.0
    path = tmp_path / "tiger.ckpt"
    trainer.save_checkpoint(path)
    history = next(iter(tiny_data.test_dataloader()))["history"][:32]
    model.eval()
    expected = model.recommend(history, 20)
    restored = TIGER.load_from_checkpoint(path, map_location="cpu").eval()  # no datamodule, no setup
    assert torch.equal(restored.sid_codes, model.sid_codes)
    assert torch.equal(restored.recommend(history, 20), expected)
    assert restored.run_notes()["scheme"] == notes["scheme"]


@pytest.fixture(scope="module")
def small_data() -> SyntheticDataModule:
    data = SyntheticDataModule(scale=0.05, max_len=20, batch_size=128, eval_batch_size=512)
    data.setup()
    return data


def test_short_fit_beats_popularity(small_data: SyntheticDataModule) -> None:
    pl.seed_everything(0)
    popularity = fit_and_test(
        instantiate_model("popularity", small_data.num_items, small_data.max_len), small_data, 1
    )
    pl.seed_everything(0)
    model = instantiate_model(
        "tiger",
        small_data.num_items,
        small_data.max_len,
        embedding_source="collaborative",
        codebook_size=64,  # 605 items: 3 x 64 + collision digit
        history_items=5,
        hidden_size=32,
        ffn_size=64,
        num_heads=2,
        encoder_layers=1,
        decoder_layers=1,
        dropout=0.0,
        lr=5e-3,
    )
    tiger = fit_and_test(model, small_data, 3)  # ~160 steps; measured NDCG@10 0.174 vs 0.082
    assert tiger["test/invalid_id_rate"] == 0.0
    assert tiger["test/ndcg@10"] > 1.5 * popularity["test/ndcg@10"], (tiger, popularity)
    assert tiger["test/recall@10"] > popularity["test/recall@10"]
