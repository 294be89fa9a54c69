"""Semantic-ID tokenizers and lookups (fast, CPU, small synthetic embeddings)."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from pathlib import Path

import faiss
import pytest
import torch

from recbench.semantic_ids import (
    INVALID_KEY,
    PAD_CODE,
    ParallelPQConfig,
    ResidualKMeansConfig,
    SemanticIDs,
    cached_semantic_ids,
    faiss_threads,
    fit_parallel_pq,
    fit_residual_kmeans,
)


@pytest.fixture(autouse=True)
def one_faiss_thread() -> Iterator[None]:
    """faiss on 2 OpenMP threads spin-waits badly on small inputs on 2-core machines (~0.8 s per
    tiny k-means instead of ~5 ms); one thread keeps these tests fast. Restored afterwards."""
    before = faiss.omp_get_max_threads()
    with faiss_threads(1):
        yield
    assert faiss.omp_get_max_threads() == before


def random_embeddings(n: int = 400, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """(n+1, dim) random unit vectors; row 0 = PAD zeros. Isotropic data spreads items over the
    codes (clustered data would pile many items into one residual cell)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    return torch.cat([torch.zeros(1, dim), x])


def train_mask(n: int, share: float = 0.8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n + 1, generator=g) < share
    mask[0] = False
    return mask


def hand_ids() -> SemanticIDs:
    """6 items, 2 digits of size 2 (key = 2*c0 + c1), collisions, no collision digit.

    keys: item1 0, item2 1, item3 0, item4 2, item5 1, item6 0; key 3 unused."""
    codes = torch.tensor([[-1, -1], [0, 0], [0, 1], [0, 0], [1, 0], [0, 1], [0, 0]])
    return SemanticIDs(codes, (2, 2), scheme="hand")


# ---- determinism -------------------------------------------------------------------------


def test_residual_kmeans_is_deterministic() -> None:
    emb, mask = random_embeddings(), train_mask(400)
    a = fit_residual_kmeans(emb, mask, levels=3, codebook_size=8, seed=3)
    b = fit_residual_kmeans(emb, mask, levels=3, codebook_size=8, seed=3)
    assert torch.equal(a.codes, b.codes)
    assert a.codes.shape == (401, 4) and a.codebook_sizes == (8, 8, 8, 8)
    assert (a.codes[0] == PAD_CODE).all()
    c = fit_residual_kmeans(emb, mask, levels=3, codebook_size=8, seed=4)
    assert not torch.equal(a.codes, c.codes)  # the seed matters, so it is really used


def test_parallel_pq_is_deterministic() -> None:
    emb, mask = random_embeddings(n=600, dim=32), train_mask(600)
    a = fit_parallel_pq(emb, mask, n_digits=4, codebook_size=16, pca_dim=256, seed=0)
    b = fit_parallel_pq(emb, mask, n_digits=4, codebook_size=16, pca_dim=256, seed=0)
    assert torch.equal(a.codes, b.codes)
    assert a.codes.shape == (601, 4) and a.codebook_sizes == (16,) * 4
    assert "pca=32(clamped from 256)" in a.scheme  # D=32 < 256 is said in the scheme
    plain = fit_parallel_pq(emb, mask, n_digits=4, codebook_size=16, pca_dim=16, use_opq=False)
    assert "pca=16," in plain.scheme and "opq=False" in plain.scheme


def test_item_id_item_round_trip_with_collision_digit() -> None:
    emb, mask = random_embeddings(), train_mask(400)
    sids = fit_residual_kmeans(emb, mask, levels=3, codebook_size=8)
    items = torch.arange(1, 401)
    keys = sids.keys[items]
    assert keys.unique().numel() == 400  # the collision digit makes every ID unique
    assert torch.equal(sids.pack(sids.codes[items]), keys)
    assert torch.equal(sids.unpack(keys), sids.codes[items])
    look = sids.items_for_keys(keys)
    assert look.valid.all() and (look.count == 1).all()
    assert torch.equal(look.item, items)
    assert torch.equal(sids.expand_to_items(keys.view(4, 100), None, 100), items.view(4, 100))


def test_collision_digit_numbers_duplicates_in_item_order() -> None:
    emb = random_embeddings(n=200)
    for item in (20, 5, 9):
        emb[item] = emb[150]  # items 5, 9, 20, 150 have identical embeddings
    sids = fit_residual_kmeans(emb, train_mask(200), levels=2, codebook_size=8)
    group = torch.tensor([5, 9, 20, 150])
    assert (sids.codes[group, :2] == sids.codes[150, :2]).all()
    same_base = (sids.codes[1:, :2] == sids.codes[150, :2]).all(1).nonzero().squeeze(1) + 1
    # within the whole group (which may include other items) digits run 0..c-1 by item id
    assert torch.equal(sids.codes[same_base, 2], torch.arange(same_base.numel()))
    assert sids.keys[1:].unique().numel() == 200


def test_collision_group_overflow_raises() -> None:
    emb = random_embeddings(n=200)
    emb[1:17] = emb[100]  # items 1..16 and 100: 17 identical embeddings, collision range 16
    with pytest.raises(
        ValueError,
        match=r"items share the semantic ID \[.*\] \(items \[1, 2, 3, 4, 5, 6, 7, 8, 9, 10\] \.\.\.\)",
    ):
        fit_residual_kmeans(emb, train_mask(200), levels=2, codebook_size=16)
    fit_residual_kmeans(
        emb, train_mask(200), levels=2, codebook_size=16, collision_digit=False
    )  # fine without


def test_expand_to_items_hand_case() -> None:
    sids = hand_ids()
    ranked = torch.tensor(
        [
            [1, 3, 0, 1, 2],  # 3 is no item's key; second 1 is a duplicate
            [2, -1, 2, 0, 1],  # -1 invalid; duplicate 2
            [3, 3, 9, -1, 3],  # nothing valid
            [0, 1, 2, 0, 1],  # valid_mask drops the first 0; the later 0 then counts
        ]
    )
    mask = torch.ones_like(ranked, dtype=torch.bool)
    mask[3, 0] = False
    out = sids.expand_to_items(ranked, mask, k=7)
    expected = torch.tensor(
        [
            [2, 5, 1, 3, 6, 4, 0],  # key1 -> 2,5 ; key0 -> 1,3,6 ; key2 -> 4 ; padding
            [4, 1, 3, 6, 2, 5, 0],
            [0, 0, 0, 0, 0, 0, 0],
            [2, 5, 4, 1, 3, 6, 0],
        ]
    )
    assert torch.equal(out, expected)
    assert torch.equal(
        sids.expand_to_items(ranked, None, k=2), torch.tensor([[2, 5], [4, 1], [0, 0], [1, 3]])
    )
    look = sids.items_for_keys(torch.tensor([0, 1, 2, 3, -1, 99]))
    assert look.valid.tolist() == [True, True, True, False, False, False]
    assert look.item.tolist() == [1, 2, 4, 0, 0, 0]
    assert look.count.tolist() == [3, 2, 1, 0, 0, 0]


def test_items_sharing_an_id_follow_the_given_rank() -> None:
    sids = hand_ids()  # key 0 -> items 1, 3, 6; key 1 -> 2, 5; key 2 -> 4
    rank = torch.tensor([0, 5, 4, 3, 6, 0, 1])  # item 6 before 3 before 1; item 5 before 2
    ordered = sids.ordered_by(rank, "test")
    assert torch.equal(ordered.expand_to_items(torch.tensor([[0, 1]]), None, k=5), torch.tensor([[6, 3, 1, 5, 2]]))
    assert torch.equal(ordered.codes, sids.codes) and ordered.scheme.endswith("item_order=test")
    restored = SemanticIDs.from_state_dict(ordered.state_dict(include_derived=False))
    assert torch.equal(restored.sorted_items, ordered.sorted_items)  # the order survives a checkpoint


def test_collision_digit_follows_the_rank() -> None:
    emb = random_embeddings(n=200)
    for item in (20, 5, 9):
        emb[item] = emb[150]
    sids = fit_residual_kmeans(emb, train_mask(200), levels=2, codebook_size=8)
    same_base = (sids.codes[1:, :2] == sids.codes[150, :2]).all(1).nonzero().squeeze(1) + 1
    rank = torch.arange(201).flip(0)  # the highest item id first
    ordered = sids.ordered_by(rank, "reverse id")
    assert torch.equal(ordered.codes[same_base.flip(0), 2], torch.arange(same_base.numel()))
    assert ordered.keys[1:].unique().numel() == 200  # still one ID per item
    # a decoded ID maps to the same item as before the renumbering: the codes moved with the items
    assert torch.equal(ordered.items_for_keys(ordered.keys[1:]).item, torch.arange(1, 201))


def test_pack_marks_out_of_range_codes_invalid() -> None:
    sids = hand_ids()
    codes = torch.tensor([[0, 1], [1, 1], [-1, 0], [2, 0], [1, -1]])
    assert sids.pack(codes).tolist() == [1, 3, INVALID_KEY, INVALID_KEY, INVALID_KEY]
    assert sids.unpack(torch.tensor([3, -1, 4])).tolist() == [[1, 1], [-1, -1], [-1, -1]]
    assert sids.keys.tolist() == [-1, 0, 1, 0, 2, 1, 0]


def test_stats_hand_case() -> None:
    stats = hand_ids().stats()
    assert stats.n_items == 6
    assert stats.n_unique_ids == 3
    assert stats.collision_rate == pytest.approx(5 / 6)  # only item 4 has its own ID
    assert stats.max_collision_group == 3
    assert stats.code_usage == (2, 2)
    p0 = torch.tensor([5 / 6, 1 / 6])
    assert stats.code_entropy_bits[0] == pytest.approx(float(-(p0 * p0.log2()).sum()))
    p1 = torch.tensor([4 / 6, 2 / 6])  # digit 1: four 0s, two 1s
    assert stats.code_entropy_bits[1] == pytest.approx(float(-(p1 * p1.log2()).sum()))


# ---- prefix masks --------------------------------------------------------------------------


@pytest.mark.parametrize("fitted", [False, True])
def test_prefix_masks_match_brute_force(fitted: bool) -> None:
    if fitted:
        sids = fit_residual_kmeans(
            random_embeddings(n=300), train_mask(300), levels=3, codebook_size=4, collision_digit=False
        )
    else:
        g = torch.Generator().manual_seed(0)
        codes = torch.cat([torch.full((1, 3), -1), torch.randint(4, (40, 3), generator=g)])
        sids = SemanticIDs(codes, (4, 4, 4), scheme="random")
    item_codes = sids.codes[1:].tolist()
    for level in range(sids.n_digits):
        sizes = sids.codebook_sizes
        prefixes = [list(p) for p in itertools.product(*(range(s) for s in sizes[:level]))]
        prefixes.append([PAD_CODE] * level)  # a prefix no item has
        prefix_codes = torch.tensor(prefixes, dtype=torch.long).view(len(prefixes), level)
        brute = torch.zeros(len(prefixes), sizes[level], dtype=torch.bool)
        for row, prefix in enumerate(prefixes):
            for codes in item_codes:
                if codes[:level] == prefix:
                    brute[row, codes[level]] = True
        assert torch.equal(sids.valid_next_codes(prefix_codes), brute), f"level {level}"
        table = sids.prefix_table(level)
        assert torch.equal(table.lookup(sids.pack(prefix_codes)), brute)
    # decoding every level under the masks only ever reaches real items
    full = torch.tensor(list(itertools.product(*(range(s) for s in sids.codebook_sizes))))
    admitted = torch.ones(full.shape[0], dtype=torch.bool)
    for level in range(sids.n_digits):
        admitted &= sids.valid_next_codes(full[:, :level]).gather(1, full[:, level : level + 1]).squeeze(1)
    assert torch.equal(admitted, sids.items_for_keys(sids.pack(full)).valid)


# ---- training items only -------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rq_kmeans", "parallel_pq"])
def test_fit_ignores_items_outside_training(method: str) -> None:
    emb, mask = random_embeddings(n=500, dim=16), train_mask(500, share=0.7)
    moved = emb.clone()
    g = torch.Generator().manual_seed(9)
    outside = ~mask
    outside[0] = False
    moved[outside] = torch.nn.functional.normalize(torch.randn(int(outside.sum()), 16, generator=g), dim=1)

    def fit(e: torch.Tensor) -> SemanticIDs:
        if method == "rq_kmeans":
            return fit_residual_kmeans(e, mask, levels=2, codebook_size=8, collision_digit=False)
        return fit_parallel_pq(e, mask, n_digits=4, codebook_size=8, pca_dim=16)

    a, b = fit(emb), fit(moved)
    # identical codebooks <=> every item whose embedding did not change keeps its codes
    assert torch.equal(a.codes[mask], b.codes[mask])
    assert not torch.equal(a.codes[outside], b.codes[outside])  # the moved items did move


def test_too_few_training_items_is_a_clear_error() -> None:
    emb = random_embeddings(n=100)
    mask = torch.zeros(101, dtype=torch.bool)
    mask[1:11] = True
    with pytest.raises(ValueError, match="only 10 training items for codebooks of 16"):
        fit_residual_kmeans(emb, mask, levels=2, codebook_size=16)
    with pytest.raises(ValueError, match="power of two"):
        fit_parallel_pq(emb, mask, codebook_size=12)


# ---- persistence ---------------------------------------------------------------------------


@pytest.mark.parametrize("include_derived", [True, False])
def test_state_dict_round_trip(include_derived: bool) -> None:
    sids = fit_residual_kmeans(random_embeddings(), train_mask(400), levels=3, codebook_size=8)
    buffer = io.BytesIO()
    torch.save(sids.state_dict(include_derived=include_derived), buffer)
    buffer.seek(0)
    restored = SemanticIDs.from_state_dict(torch.load(buffer, weights_only=True))
    assert restored.scheme == sids.scheme and restored.codebook_sizes == sids.codebook_sizes
    assert restored.collision_digit and restored.fit_seconds == sids.fit_seconds
    for name, tensor in sids.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    assert restored.stats() == sids.stats()


def test_cached_semantic_ids(tmp_path: Path) -> None:
    emb, mask = random_embeddings(), train_mask(400)
    config = ResidualKMeansConfig(levels=3, codebook_size=8)
    first = cached_semantic_ids(emb, mask, config, tmp_path)
    second = cached_semantic_ids(emb, mask, config, tmp_path)
    assert torch.equal(first.codes, second.codes) and second.scheme == first.scheme
    assert second.fit_seconds == first.fit_seconds  # read back, not refitted
    assert len(list(tmp_path.glob("sid_*.pt"))) == 1
    other_mask = mask.clone()
    other_mask[1] = not bool(mask[1])
    cached_semantic_ids(emb, other_mask, config, tmp_path)
    cached_semantic_ids(emb, mask, ParallelPQConfig(codebook_size=8, pca_dim=16), tmp_path)
    assert len(list(tmp_path.glob("sid_*.pt"))) == 3
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_a_cache_hit_needs_no_faiss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The GPU machine has no faiss: it loads the semantic IDs fitted and carried from the CPU side.
    import recbench.semantic_ids as semantic_ids

    emb, mask = random_embeddings(), train_mask(400)
    config = ParallelPQConfig(codebook_size=8, pca_dim=16)
    fitted = cached_semantic_ids(emb, mask, config, tmp_path, fit_threads=1)

    def no_faiss() -> None:
        raise ModuleNotFoundError("no faiss on this machine")

    monkeypatch.setattr(semantic_ids, "_require_faiss", no_faiss)
    loaded = cached_semantic_ids(emb, mask, config, tmp_path, fit_threads=1)
    assert torch.equal(loaded.codes, fitted.codes)
    with pytest.raises(ModuleNotFoundError, match="no faiss"):  # a miss still fits, and says why it cannot
        cached_semantic_ids(emb, ~mask, config, tmp_path, fit_threads=1)


def test_semantic_ids_for_orders_shared_ids_by_training_popularity(tmp_path: Path) -> None:
    from datamodules.synthetic import SyntheticDataModule
    from recbench.item_side import item_embeddings_for, semantic_ids_for
    from recbench.semantic_ids import ParallelPQConfig

    data = SyntheticDataModule(scale=0.02, cache_dir=tmp_path)
    embeddings = item_embeddings_for(data, source="collaborative", collaborative_dim=8, cache_dir=tmp_path, show_progress=False)
    config = ParallelPQConfig(n_digits=2, codebook_size=4, pca_dim=8, use_opq=False)
    by_id = semantic_ids_for(data, config, embeddings, cache_dir=tmp_path, item_order="item_id")
    by_popularity = semantic_ids_for(data, config, embeddings, cache_dir=tmp_path)
    assert torch.equal(by_id.codes, by_popularity.codes)  # 16 IDs for ~600 items: large groups
    counts = data.train_item_counts()
    assert counts[0] == 0 and int(counts.sum()) == data.train_sequences()[0].numel()
    key = int(by_id.keys[1:].mode().values)  # the largest group
    items = by_id.expand_to_items(torch.tensor([[key]]), None, k=400)[0]
    popular = by_popularity.expand_to_items(torch.tensor([[key]]), None, k=400)[0]
    real = popular[popular > 0]
    assert sorted(real.tolist()) == sorted(items[items > 0].tolist())  # the same items ...
    assert torch.equal(items[items > 0], real.sort().values)  # ... by id before
    assert bool((counts[real][:-1] >= counts[real][1:]).all()) and not torch.equal(real, real.sort().values)


def test_items_with_nothing_known_are_numbered_by_the_last_level() -> None:
    # 200 items without training co-occurrence (zero collaborative vectors) fill one cell at every
    # level: a collision digit of 16 cannot tell them apart unless the last level numbers them.
    emb = random_embeddings(n=600)
    emb[401:] = 0.0
    mask = torch.zeros(601, dtype=torch.bool)
    mask[1:401] = True  # the unknown items are not training items
    sids = fit_residual_kmeans(emb, mask, levels=2, codebook_size=16)
    assert sids.keys[1:].unique().numel() == 600  # every ID unique
    unknown = sids.codes[401:]
    assert (unknown[:, 0] == unknown[0, 0]).all()  # the first level still says "unknown"
    assert torch.equal(unknown[:, 1], torch.arange(200) % 16)  # numbered round-robin in item order
    assert "unknown_items_numbered=200" in sids.scheme
    known = fit_residual_kmeans(emb[:401], mask[:401], levels=2, codebook_size=16)
    assert torch.equal(sids.codes[1:401, :2], known.codes[1:, :2])  # known items keep their codes
