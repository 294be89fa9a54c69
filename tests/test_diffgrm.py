"""DiffGRM (baselines/diffgrm.py) and the masked-diffusion helpers (recbench/diffusion.py). CPU, fast.

Most tests install hand-made semantic IDs (``set_semantic_ids``) so that no embedding or PQ fit
runs; the learning test fits real PSE codes on collaborative embeddings.
"""

from __future__ import annotations

import copy
import itertools
import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import fit_and_test, quiet_trainer

from baselines.diffgrm import DiffGRM
from baselines.tiger import TIGER
from benchmark.perf.diffgrm_step_ab import full_decoder_loss
from benchmark.registry import instantiate_model
from datamodules.synthetic import SyntheticDataModule
from recbench.batch import HISTORY, TARGET
from recbench.diffusion import (
    MASKED,
    BeamResult,
    apply_mask,
    confidence_order,
    cpd_beam_search,
    masked_cross_entropy,
    masked_first,
    nested_mask_views,
    position_confidence,
    random_mask_views,
    random_order,
)
from recbench.metrics import RankingMetrics
from recbench.semantic_ids import SemanticIDs, ranked_codes_to_items


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """DiffGRM's ops are small (B x n-token decoder passes): on a shared 2-core machine, two OpenMP
    threads spin-wait against other processes and a fit ran 12x slower (260 s vs 22 s) than on one
    thread. Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_model(num_items: int, n_digits: int = 3, codebook_size: int = 4, max_len: int = 8, **kwargs) -> DiffGRM:
    options = dict(hidden_size=16, encoder_layers=1, decoder_layers=1, num_heads=2, inner_size=32, dropout=0.0)
    options.update(kwargs)
    return DiffGRM(num_items, max_len=max_len, n_digits=n_digits, codebook_size=codebook_size, **options)


def beams_to_items(sids: SemanticIDs, beams: BeamResult, k: int) -> tuple[torch.Tensor, ...]:
    """What ``DiffGRM.recommend`` does with finished beams (empty slots have a -inf score)."""
    return ranked_codes_to_items(sids, beams.codes, torch.isfinite(beams.scores), k)


def _hand_made_sids(n_digits: int = 3, codebook_size: int = 4, num_items: int = 30, seed: int = 0) -> SemanticIDs:
    """Random codes for ``num_items`` items, with items 2 and 5 sharing an ID (a collision)."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, codebook_size, (num_items + 1, n_digits), generator=generator)
    codes[5] = codes[2]
    return SemanticIDs(codes, (codebook_size,) * n_digits, "hand-made")


# ------------------------------------------------------------------------------------------------
# masked-diffusion helpers: view construction
# ------------------------------------------------------------------------------------------------


def test_nested_views_from_a_hand_made_confidence_vector() -> None:
    confidence = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    order = confidence_order(confidence, "least")
    assert order.tolist() == [[1, 3, 2, 0]]
    views = nested_mask_views(order)  # (1, 4, 4), True = masked
    expected = [
        [False, True, False, False],  # the least confident digit (1)
        [False, True, False, True],  # + digit 3
        [False, True, True, True],  # + digit 2
        [True, True, True, True],  # everything
    ]
    assert views[0].tolist() == expected
    assert confidence_order(confidence, "most").tolist() == [[0, 2, 3, 1]]
    assert nested_mask_views(order, num_views=2)[0].tolist() == expected[:2]
    codes = torch.tensor([[7, 8, 9, 6]])
    assert apply_mask(codes, views)[0, 1].tolist() == [7, MASKED, 9, MASKED]


def test_position_confidence_msp_and_entropy() -> None:
    logits = torch.tensor([[[4.0, 0.0, 0.0], [1.0, 1.0, 1.0]]])  # digit 0 peaked, digit 1 uniform
    msp = position_confidence(logits, "msp")
    assert torch.allclose(msp, torch.tensor([[math.exp(4) / (math.exp(4) + 2), 1 / 3]]))
    entropy = position_confidence(logits, "entropy")
    assert entropy[0, 0] > entropy[0, 1] and torch.isclose(entropy[0, 1], torch.tensor(-math.log(3)))


def test_guided_training_views_follow_the_decoder_confidence(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny_model(30, n_digits=4, codebook_size=4)
    model.set_semantic_ids(_hand_made_sids(4, 4))
    # Stub decoder: digit confidences 0.9, 0.1, 0.5, 0.3 (as MSP) whatever the input.
    probs = torch.tensor([0.9, 0.1, 0.5, 0.3])
    rest = (1 - probs) / 3
    table = torch.stack([torch.stack([p, r, r, r]) for p, r in zip(probs, rest, strict=True)]).log()  # (4, 4)
    seen_modes = []

    def stub(memory, codes):
        seen_modes.append(model.decoder.training)
        return table.expand(codes.shape[0], codes.shape[1], 4, 4)

    memory = model.encode(torch.tensor([[1, 2], [3, 4]]))
    monkeypatch.setattr(model, "decoder_logits", stub)
    model.train()
    masks = model.training_masks(memory, batch_size=2)
    assert seen_modes == [False] and model.decoder.training, "scoring runs in eval mode, then restores train mode"
    assert masks[1].tolist() == masks[0].tolist() == nested_mask_views(torch.tensor([[1, 3, 2, 0]]))[0].tolist()


def test_sequential_and_random_views() -> None:
    generator = torch.Generator().manual_seed(0)
    order = random_order(64, 4, generator)
    assert bool((order.sort(dim=1).values == torch.arange(4)).all())
    views = nested_mask_views(order)
    assert views.sum(-1).tolist() == [[1, 2, 3, 4]] * 64
    assert bool((views[:, :-1] <= views[:, 1:]).all()), "views are nested"
    random_views = random_mask_views(256, 4, 3, mask_prob=0.1, generator=generator)
    assert random_views.shape == (256, 3, 4) and bool(random_views.any(-1).all()), "every view masks a digit"


def test_masked_cross_entropy_counts_masked_positions_only() -> None:
    logits = torch.randn(2, 3, 4, 5)
    targets = torch.randint(0, 5, (2, 3, 4))
    mask = torch.rand(2, 3, 4) < 0.5
    mask[0, 0, 0] = True
    loss = masked_cross_entropy(logits, targets, mask, label_smoothing=0.2)
    log_p = logits.log_softmax(-1)
    per_position = -(0.8 * log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1) + 0.2 * log_p.mean(-1))
    assert torch.isclose(loss, per_position[mask].sum() / mask.sum(), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# CPD beam
# ------------------------------------------------------------------------------------------------


def test_masked_first_moves_one_digit_to_the_front_and_keeps_the_rest_in_order() -> None:
    order = torch.tensor([[1, 3, 2, 0], [3, 0, 1, 2], [0, 1, 2, 3]])
    moved = masked_first(order, 3)
    assert moved.tolist() == [[3, 1, 2, 0], [3, 0, 1, 2], [3, 0, 1, 2]]
    views = nested_mask_views(moved)
    assert bool(views[..., 3].all()), "the digit is masked in every view"
    assert views[:, 0].sum(-1).tolist() == [1, 1, 1], "view 1 reveals every other digit"


def _factorised_stub(log_p: torch.Tensor):
    """A decoder whose per-digit log-probs (B, n, K) ignore the revealed digits: then a path score is
    the joint log-probability whatever the fill order, so a full-width beam can be checked by brute
    force."""

    def log_probs_fn(codes: torch.Tensor) -> torch.Tensor:
        return log_p.unsqueeze(1).expand(-1, codes.shape[1], -1, -1)

    return log_probs_fn


def _brute_force_items(sids: SemanticIDs, log_p: torch.Tensor, reachable, k: int) -> list[list[int]]:
    """Items ranked by joint score over every valid reachable ID, collisions expanded ascending."""
    n, size = log_p.shape[1], log_p.shape[2]
    out = []
    for row in range(log_p.shape[0]):
        scored = []
        for combo in itertools.product(range(size), repeat=n):
            if not reachable(row, combo):
                continue
            key = sids.pack(torch.tensor(combo))
            look = sids.items_for_keys(key.view(1))
            if bool(look.valid[0]):
                score = float(sum(log_p[row, d, c] for d, c in enumerate(combo)))
                items = sorted(int(i) for i in torch.nonzero(sids.keys == key).flatten())
                scored.append((score, items))
        scored.sort(key=lambda pair: -pair[0])
        ranked = [item for _, items in scored for item in items][:k]
        out.append(ranked + [0] * (k - len(ranked)))
    return out


@pytest.mark.parametrize("merge", [False, True])
def test_full_width_beam_matches_brute_force(merge: bool) -> None:
    n, size, users = 3, 4, 5
    sids = _hand_made_sids(n, size, num_items=30)
    log_p = torch.randn(users, n, size).log_softmax(-1)
    # Step 0 keeps all n*K = 12 (digit, code) pairs, step 1 all 12*2*4 = 96 states: nothing is pruned,
    # so the beam ends with every ID that has at least one digit at its argmax (the last digit is
    # argmax-filled) and the path score is the joint log-probability.
    beams = cpd_beam_search(_factorised_stub(log_p), users, n, size, beam=96, merge_duplicate_beams=merge)
    assert beams.codes.shape == (users, 96, n)
    assert bool((beams.scores[:, 1:] <= beams.scores[:, :-1]).all()), "scores must be non-increasing"
    alive = torch.isfinite(beams.scores)  # merging leaves empty slots (-inf, codes MASKED)
    assert bool(alive.all()) != merge
    assert bool((beams.codes[~alive] == MASKED).all())
    joint = log_p.gather(2, beams.codes.clamp(min=0).transpose(1, 2)).sum(1)  # (B, W)
    assert torch.allclose(beams.scores[alive], joint[alive], atol=1e-5)
    argmax = log_p.argmax(-1)
    items, invalid, candidates = beams_to_items(sids, beams, k=12)
    expected = _brute_force_items(
        sids, log_p, lambda row, combo: any(combo[d] == int(argmax[row, d]) for d in range(n)), k=12
    )
    assert items.tolist() == expected
    assert int(candidates) == int(alive.sum()) and 0 <= int(invalid) < int(candidates)


def test_fixed_order_beam_matches_brute_force() -> None:
    n, size, users = 3, 4, 4
    sids = _hand_made_sids(n, size, num_items=30, seed=1)
    log_p = torch.randn(users, n, size).log_softmax(-1)
    order = [2, 0, 1]
    beams = cpd_beam_search(_factorised_stub(log_p), users, n, size, beam=16, decode_order="fixed", fixed_order=order)
    assert beams.codes.shape == (users, 16, n)  # digits 2 then 0 branch (4 x 4), digit 1 is argmax
    argmax = log_p.argmax(-1)
    items, _, _ = beams_to_items(sids, beams, k=10)
    expected = _brute_force_items(sids, log_p, lambda row, combo: combo[1] == int(argmax[row, 1]), k=10)
    assert items.tolist() == expected


@pytest.mark.parametrize("decode_order, merge", [("confidence", True), ("fixed", False)])
def test_held_back_last_digit_is_filled_by_a_beam_step_and_matches_brute_force(decode_order, merge) -> None:
    n, size, users, beam = 3, 4, 5, 12
    log_p = torch.randn(users, n, size).log_softmax(-1)
    calls: list[torch.Tensor] = []
    stub = _factorised_stub(log_p)
    beams = cpd_beam_search(
        lambda c: (calls.append(c.clone()), stub(c))[1], users, n, size, beam, decode_order,
        merge_duplicate_beams=merge, last_digit=2,
    )
    assert all(bool((c[..., 2] == MASKED).all()) for c in calls), "digit 2 stays masked until the last step"
    # With merging (or one fixed order) the 12 best distinct (d0, d1) prefixes survive, and a best
    # full ID never has a prefix outside them, so the result is the exact top 12 of all 64 IDs,
    # several per prefix (an argmax last step would keep one code of digit 2 per prefix).
    combos = torch.tensor(list(itertools.product(range(size), repeat=n)))  # (64, n)
    joint = log_p[:, torch.arange(n), combos].sum(-1)  # (B, 64)
    best, index = joint.topk(beam, dim=1)
    assert beams.codes.tolist() == combos[index].tolist()
    torch.testing.assert_close(beams.scores, best)
    prefixes = {tuple(c[:2]) for c in beams.codes[0].tolist()}
    assert len(prefixes) < beam, "some prefix keeps several codes of the held-back digit"
    with pytest.raises(ValueError, match="last_digit 2 must come last"):
        cpd_beam_search(stub, users, n, size, beam, decode_order="fixed", fixed_order=[2, 0, 1], last_digit=2)


def test_narrow_beam_finds_the_best_factorised_id() -> None:
    log_p = torch.randn(6, 4, 8).log_softmax(-1)
    beams = cpd_beam_search(_factorised_stub(log_p), 6, 4, 8, beam=1)
    assert beams.codes[:, 0].tolist() == log_p.argmax(-1).tolist()
    assert torch.allclose(beams.scores[:, 0], log_p.max(-1).values.sum(-1))


def test_merging_duplicate_beams_keeps_distinct_partial_states() -> None:
    """A state with two digits filled is reached from two parents; unmerged, both copies take slots."""
    log_p = torch.randn(3, 4, 4).log_softmax(-1)
    calls: list[torch.Tensor] = []
    stub = _factorised_stub(log_p)

    def recording(codes: torch.Tensor) -> torch.Tensor:
        calls.append(codes.clone())
        return stub(codes)

    cpd_beam_search(recording, 3, 4, 4, beam=8, merge_duplicate_beams=True)
    for codes in calls[2:]:  # states after steps >= 1 (two or more digits filled)
        key = ((codes + 1) * 5 ** torch.arange(3, -1, -1)).sum(-1)  # (B, W)
        for row in key:
            assert len(set(row.tolist())) == len(row), "duplicate partial beam survived the merge"
    unmerged: list[torch.Tensor] = []
    cpd_beam_search(lambda c: (unmerged.append(c.clone()), stub(c))[1], 3, 4, 4, beam=8)
    key = ((unmerged[2] + 1) * 5 ** torch.arange(3, -1, -1)).sum(-1)
    assert any(len(set(row.tolist())) < len(row) for row in key), "the unmerged beam has duplicates here"


@pytest.mark.parametrize("anchor", ["oldest", "newest"])
def test_beam_on_a_tiny_model_returns_valid_distinct_ordered_items(anchor: str) -> None:
    torch.manual_seed(0)
    sids = _hand_made_sids(3, 4, num_items=30)
    model = _tiny_model(30, position_anchor=anchor).eval()
    model.set_semantic_ids(sids)
    history = torch.tensor([[0, 0, 0, 0, 0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [0, 0, 0, 0, 0, 0, 0, 12]])
    with torch.no_grad():
        beams = model.beam_search(history, beam=96)  # full width for n=3, K=4
    assert bool((beams.scores[:, 1:] <= beams.scores[:, :-1]).all())
    assert bool(torch.isfinite(beams.scores).all())
    ranked = model.recommend(history, 10, beam=96)
    for row in ranked.tolist():
        real = [i for i in row if i]
        assert len(real) == len(set(real)) and all(1 <= i <= 30 for i in real)
        assert row[len(real) :] == [0] * (10 - len(real))
    # Items come in the order of their IDs' best beam scores (ties inside a collision: ascending id).
    keys = sids.pack(beams.codes)
    for user, row in enumerate(ranked.tolist()):
        best = {}
        for key, score in zip(keys[user].tolist(), beams.scores[user].tolist(), strict=True):
            best.setdefault(key, score)
        item_scores = [best[int(sids.keys[i])] for i in row if i]
        assert item_scores == sorted(item_scores, reverse=True)
    # Padding columns change nothing (positions come from the mask), nor do the other users.
    short = history[[0, 2]]
    assert torch.equal(model.recommend(short[:, -3:], 10, beam=96), ranked[[0, 2]])
    assert torch.equal(model.recommend(history[2:], 10, beam=96), ranked[2:])


# ------------------------------------------------------------------------------------------------
# hot paths: packed (CPU) and padded (GPU) encoders agree; no host synchronisation
# ------------------------------------------------------------------------------------------------

_HISTORY = torch.tensor(
    [[0, 0, 0, 0, 0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [0, 0, 0, 0, 0, 0, 0, 12], [0] * 8]
)


@pytest.mark.parametrize("anchor", ["oldest", "newest"])
def test_packed_and_padded_encoders_give_the_same_decoder_output(anchor: str) -> None:
    torch.manual_seed(0)
    model = _tiny_model(30, position_anchor=anchor, encoder_layers=2, decoder_layers=2).eval()
    model.set_semantic_ids(_hand_made_sids(3, 4, num_items=30))
    codes = torch.tensor([[[MASKED, MASKED, MASKED], [1, MASKED, 3]]]).expand(4, -1, -1)  # (B, 2, n)
    with torch.no_grad():
        packed = model.decoder_logits(model.encode(_HISTORY, packed=True), codes)
        padded = model.decoder_logits(model.encode(_HISTORY, packed=False), codes)
    # Row 3 has no item (not produced by the pipeline): both paths give it the same empty memory.
    torch.testing.assert_close(padded, packed, atol=1e-5, rtol=1e-5)


def _sids_on_meta(sids: SemanticIDs) -> SemanticIDs:
    """The lookup tensors of ``sids`` on the meta device (its constructor reads codes on the host)."""
    meta = copy.copy(sids)
    for name, value in vars(sids).items():
        if isinstance(value, torch.Tensor):
            setattr(meta, name, value.to("meta"))
    return meta


def test_training_step_and_decoding_have_no_host_sync() -> None:
    """``loss`` (+ backward) and ``recommend`` on the meta device, where any data-dependent read
    (``item``/``bool``/``tolist``, ``nonzero``, boolean-mask indexing) raises: the non-CPU path reads
    nothing back to the host, so on a GPU it never synchronises inside a step. (The CPU path packs
    the history with ``nonzero`` on purpose; see docs/models/diffgrm.md.)"""
    for masking in ("guided", "sequential", "random"):
        model = _tiny_model(30, masking=masking, dropout=0.1)
        sids = _hand_made_sids(3, 4, num_items=30)
        model.set_semantic_ids(sids)
        model = model.to("meta").train()
        model._sids = _sids_on_meta(sids)
        batch = {"history": _HISTORY[:3].to("meta"), "target": torch.tensor([4, 12, 13], device="meta")}
        with pytest.raises((RuntimeError, NotImplementedError)):  # the guard works: the packed path reads
            model.encode(batch["history"], packed=True)
        loss = model.loss(batch)
        loss.backward()
        assert loss.device.type == "meta" and model.item_mlp[0].weight.grad is not None
    model.eval()
    ranked = model.recommend(_HISTORY.to("meta"), 10, beam=8)
    assert ranked.shape == (4, 10) and ranked.device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_step_and_decoding_have_no_host_sync_on_cuda() -> None:
    torch.manual_seed(0)
    model = _tiny_model(30, dropout=0.1)
    model.set_semantic_ids(_hand_made_sids(3, 4, num_items=30))
    model = model.cuda().train()
    history = _HISTORY.cuda()
    batch = {"history": history[:3], "target": torch.tensor([4, 12, 13], device="cuda")}
    model.loss(batch).backward()  # warm-up: lazy CUDA/cuBLAS initialisation may synchronise
    model.eval().recommend(history, 10, beam=8)
    model.train()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.loss(batch).backward()
        model.eval().recommend(history, 10, beam=8)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------------------------
# item-level vs ID-level metrics
# ------------------------------------------------------------------------------------------------


def test_item_level_metrics_differ_from_id_level_exactly_by_collision_expansion(monkeypatch) -> None:
    # Items 3 and 5 share ID (1, 0); item 2 is (0, 1); item 6 is (2, 2); items 1 and 4 other IDs.
    codes = torch.tensor([[-1, -1], [0, 0], [0, 1], [1, 0], [1, 1], [1, 0], [2, 2]])
    sids = SemanticIDs(codes, (4, 4), "constructed")
    decoded = torch.tensor([[1, 0], [0, 1], [3, 3], [1, 0], [2, 2]])  # (3, 3) is no item; (1, 0) repeats
    beams = BeamResult(decoded.expand(4, -1, -1), torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0]).expand(4, -1))
    items, invalid, candidates = beams_to_items(sids, beams, k=5)
    assert items[0].tolist() == [3, 5, 2, 6, 0]
    assert (int(invalid), int(candidates)) == (4, 20)

    targets = torch.tensor([5, 3, 2, 6])
    item_metrics = RankingMetrics((1, 5, 10))
    item_metrics.update(items, targets)
    # ID level (the reference's evaluation): rank the distinct valid IDs; a hit on the shared ID
    # counts for both of its items.
    id_rank = {5: 1, 3: 1, 2: 2, 6: 3}
    # Item level: an ID's items take consecutive ranks in ascending id order, so each rank shifts
    # by the number of items that share an ID ranked at or before it (and come first).
    item_rank = {5: 2, 3: 1, 2: 3, 6: 4}
    expansion_shift = {5: 1, 3: 0, 2: 1, 6: 1}
    assert all(item_rank[t] == id_rank[t] + expansion_shift[t] for t in id_rank)
    values = item_metrics.compute()
    assert math.isclose(float(values["ndcg@5"]), sum(1 / math.log2(r + 1) for r in item_rank.values()) / 4, rel_tol=1e-6)
    assert math.isclose(float(values["recall@1"]), 0.25)  # only item 3 is at rank 1
    id_ndcg = sum(1 / math.log2(r + 1) for r in id_rank.values()) / 4
    assert float(values["ndcg@5"]) < id_ndcg and math.isclose(id_ndcg - float(values["ndcg@5"]), sum(
        1 / math.log2(id_rank[t] + 1) - 1 / math.log2(item_rank[t] + 1) for t in id_rank) / 4, rel_tol=1e-9)

    # recommend() turns the beams into exactly these items and counts invalid IDs.
    model = _tiny_model(6, n_digits=2, codebook_size=4)
    model.set_semantic_ids(sids)
    monkeypatch.setattr(model, "beam_search", lambda history, beam: beams)
    assert torch.equal(model.recommend(torch.ones(4, 3, dtype=torch.long), 5), items)
    assert model.decode_stats.compute().tolist() == [4.0, 20.0]


# ------------------------------------------------------------------------------------------------
# Lightning integration
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_data() -> SyntheticDataModule:
    data = SyntheticDataModule(scale=0.02, max_len=10, batch_size=64, eval_batch_size=128)
    data.setup()
    return data


def test_stage_picks_the_beam_clipping_and_checkpoint_round_trip(small_data, tmp_path, monkeypatch) -> None:
    pl.seed_everything(0)
    model = _tiny_model(
        small_data.num_items, 3, 8, small_data.max_len, val_beam=20, test_beam=24, warmup_steps=2, dropout=0.1
    )
    model.set_semantic_ids(_hand_made_sids(3, 8, num_items=small_data.num_items), {"embedding_source": "hand-made"})
    beams_used: list[int] = []
    clips: list[float] = []
    search = model.beam_search
    monkeypatch.setattr(model, "beam_search", lambda history, beam: (beams_used.append(beam), search(history, beam))[1])
    clip = model.clip_gradients
    monkeypatch.setattr(
        model, "clip_gradients", lambda opt, gradient_clip_val, gradient_clip_algorithm: (
            clips.append(gradient_clip_val), clip(opt, gradient_clip_val, gradient_clip_algorithm))[1]
    )
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1)
    trainer.fit(model, datamodule=small_data)
    assert clips == [1.0, 1.0], "gradient-norm clipping at 1.0 on every step"
    assert set(beams_used) == {20}, "validation uses val_beam"
    beams_used.clear()
    trainer.test(model, datamodule=small_data, verbose=False)
    assert set(beams_used) == {24}, "test uses test_beam"

    path = tmp_path / "diffgrm.ckpt"
    trainer.save_checkpoint(path)
    restored = DiffGRM.load_from_checkpoint(path, weights_only=False).eval()
    history = next(iter(small_data.test_dataloader()))["history"][:16]
    model.eval()
    assert torch.equal(restored.recommend(history, 10), model.recommend(history, 10))
    assert restored.run_notes()["embedding_source"] == "hand-made"
    assert restored.item_id_stats() == model.item_id_stats()


def test_short_fit_on_synthetic_data_beats_popularity() -> None:
    # follow_prob 0.9: mostly the item-level follow-up signal, which popularity cannot use; real PSE
    # codes (collaborative embeddings, 4 x 64: 605 items fit no 256-code book) and the default recipe.
    data = SyntheticDataModule(scale=0.05, max_len=20, follow_prob=0.9, batch_size=64, eval_batch_size=512)
    data.setup()
    pl.seed_everything(0)
    popularity = fit_and_test(instantiate_model("popularity", data.num_items, data.max_len), data, 1)
    pl.seed_everything(0)
    model = instantiate_model(
        "diffgrm",
        data.num_items,
        data.max_len,
        embedding_source="collaborative",
        codebook_size=64,
        hidden_size=64,
        decoder_layers=2,
        num_heads=2,
        inner_size=128,
        dropout=0.0,
        warmup_steps=20,
        val_beam=20,
        test_beam=20,
    )
    diffgrm = fit_and_test(model, data, 3)
    assert str(model.run_notes()["embedding_source"]).startswith("cooccurrence")
    assert diffgrm["test/ndcg@10"] > 1.5 * popularity["test/ndcg@10"], (diffgrm, popularity)
    assert diffgrm["test/recall@10"] > popularity["test/recall@10"]


def test_collision_digit_is_masked_in_every_view_and_makes_every_item_its_own_id(small_data) -> None:
    torch.manual_seed(0)
    model = _tiny_model(small_data.num_items, 3, 16, small_data.max_len, collision_digit=True, pca_dim=16)
    sids, notes = model.build_semantic_ids(small_data)  # real PSE: 2 PQ sub-spaces + the collision digit
    assert sids.collision_digit and sids.n_digits == 3 and "collision_digit=True" in sids.scheme
    assert len(torch.unique(sids.codes[1:], dim=0)) == small_data.num_items, "one ID per item"
    model.set_semantic_ids(sids, notes)
    assert model.shared_id_keys() is None
    history = next(iter(small_data.test_dataloader()))[HISTORY][:16]
    for masking in ("guided", "sequential"):
        model.masking = masking
        masks = model.training_masks(model.encode(history), batch_size=16)  # (B, V, n)
        assert bool(masks[..., 2].all()), f"{masking}: the collision digit is masked in every view"
        assert masks[:, 0].sum(-1).tolist() == [1] * 16, f"{masking}: view 1 masks only the collision digit"
    ranked = model.eval().recommend(history, 10, beam=20)
    for row in ranked.tolist():
        real = [i for i in row if i]
        assert len(real) == len(set(real)) and all(1 <= i <= small_data.num_items for i in real)
    plain = _tiny_model(small_data.num_items, 3, 16, small_data.max_len)
    with pytest.raises(ValueError, match="collision_digit=False"):
        plain.set_semantic_ids(sids)
    with pytest.raises(ValueError, match="nested views"):
        _tiny_model(50, 3, 8, 10, collision_digit=True, masking="random")


def test_fixed_masking_trains_the_states_a_fixed_order_decode_visits(small_data) -> None:
    model = _tiny_model(
        small_data.num_items, 3, 16, small_data.max_len, collision_digit=True, pca_dim=16,
        masking="fixed", decode_order="fixed", fixed_digit_order=[1, 0, 2],
    )
    model.set_semantic_ids(*model.build_semantic_ids(small_data))
    history = next(iter(small_data.test_dataloader()))[HISTORY][:4]
    masks = model.training_masks(model.encode(history), batch_size=4)  # (B, V, n)
    # Decoding fills digit 1, then 0, then the collision digit 2: the views mask {2}, {2, 0}, {2, 0, 1}.
    assert masks.tolist() == [[[False, False, True], [True, False, True], [True, True, True]]] * 4
    model.loss_positions = "next"  # each view's loss on the digit its decode fills next: 2, 0, 1
    assert model._loss_mask(masks).tolist() == [[[False, False, True], [True, False, False], [False, True, False]]] * 4
    ranked = model.eval().recommend(history, 10, beam=20)
    assert all(len({i for i in row if i}) == len([i for i in row if i]) for row in ranked.tolist())
    with pytest.raises(ValueError, match="decode_order='fixed'"):
        _tiny_model(50, masking="fixed")
    with pytest.raises(ValueError, match="the digit decoded last"):
        _tiny_model(50, collision_digit=True, decode_order="fixed", fixed_digit_order=[2, 0, 1])
    with pytest.raises(ValueError, match="fixed_digit_order"):
        _tiny_model(50, decode_order="fixed", fixed_digit_order=[0, 0, 1])
    with pytest.raises(ValueError, match="loss_positions"):
        _tiny_model(50, masking="random", loss_positions="next")


def test_rq_scheme_decodes_the_tiger_style_models_ids(small_data, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RECBENCH_CACHE_DIR", str(tmp_path / "diffgrm"))  # two caches: two real fits
    model = _tiny_model(small_data.num_items, 3, 16, small_data.max_len, id_scheme="rq", collision_digit=True)
    sids, notes = model.build_semantic_ids(small_data)  # 2 residual levels + the collision digit
    monkeypatch.setenv("RECBENCH_CACHE_DIR", str(tmp_path / "tiger"))
    tiger = TIGER(small_data.num_items, small_data.max_len, levels=2, codebook_size=16, collision_digit=True)
    tiger_sids, _ = tiger.build_semantic_ids(small_data)
    assert sids.scheme == tiger_sids.scheme and sids.scheme.startswith("rq-kmeans")
    assert torch.equal(sids.codes, tiger_sids.codes), "the same IDs as the TIGER-style model"
    model.set_semantic_ids(sids, notes)
    assert model.run_notes()["id_scheme"] == "rq"
    ranked = model.eval().recommend(next(iter(small_data.test_dataloader()))[HISTORY][:8], 10, beam=20)
    assert all(len({i for i in row if i}) == len([i for i in row if i]) for row in ranked.tolist())
    with pytest.raises(ValueError, match="id_scheme"):
        _tiny_model(50, id_scheme="opq")


def test_beams_narrower_than_the_largest_k_are_refused() -> None:
    with pytest.raises(ValueError, match="largest K 20"):
        _tiny_model(50, 3, 8, 10, val_beam=16, test_beam=32)


def test_loss_in_digit_major_order_equals_the_position_order_loss() -> None:
    # The loss flattens the logits in their storage order (digits first); the masked mean must be the
    # same number as over (B, V, n) order, and gradients must reach the same parameters.
    model = _tiny_model(30, n_digits=4, codebook_size=4, masking="sequential", label_smoothing=0.1)
    model.set_semantic_ids(_hand_made_sids(4, 4))
    batch = {HISTORY: torch.tensor([[0, 1, 2], [3, 4, 5], [0, 0, 7]]), TARGET: torch.tensor([8, 9, 10])}
    torch.manual_seed(3)
    loss = model.loss(batch)
    torch.manual_seed(3)
    memory = model.encode(batch[HISTORY])
    target = model.sid_codes[batch[TARGET]]
    mask = model.training_masks(memory, 3)
    logits = model.decoder_logits(memory, apply_mask(target, mask)).contiguous()
    expected = masked_cross_entropy(logits, target.unsqueeze(1).expand_as(mask), mask, 0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "masking, loss_positions", [("guided", "masked"), ("sequential", "masked"), ("guided", "next"), ("fixed", "next")]
)
def test_loss_on_the_scored_positions_equals_the_full_decoder_loss(masking: str, loss_positions: str) -> None:
    # The last decoder block runs its cross-attention and FFN on the positions the loss reads only:
    # the same loss and the same gradients as the full decoder (the other positions weigh 0).
    fixed = {"decode_order": "fixed"} if masking == "fixed" else {}
    model = _tiny_model(
        30, n_digits=4, codebook_size=4, decoder_layers=2, masking=masking, label_smoothing=0.1,
        loss_positions=loss_positions, **fixed,
    )
    model.set_semantic_ids(_hand_made_sids(4, 4))
    batch = {HISTORY: torch.tensor([[0, 1, 2], [3, 4, 5], [0, 0, 7]]), TARGET: torch.tensor([8, 9, 10])}
    parameters = list(model.parameters())
    torch.manual_seed(5)
    loss = model.loss(batch)
    trimmed = torch.autograd.grad(loss, parameters, allow_unused=True)
    torch.manual_seed(5)
    expected = full_decoder_loss(model, batch)  # every position of every block (the perf A/B's reference)
    full = torch.autograd.grad(expected, parameters, allow_unused=True)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), trimmed, full, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    torch.manual_seed(5)
    mask = model.training_masks(model.encode(batch[HISTORY]), 3)
    read = model._loss_mask(mask)
    scored = model._scored_positions(read)
    count = 4 if loss_positions == "next" else 1 + 2 + 3 + 4
    assert scored is not None and scored.shape == (3, count) and bool(read.flatten(1).gather(1, scored).all())
    assert int(read.sum()) == 3 * count
