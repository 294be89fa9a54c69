import pytest
import torch

from recbench.batch import PAD_ID
from recbench.retrieval import ItemIndex, exact_top_items, faiss_available


def _table(n: int = 50, d: int = 8) -> torch.Tensor:
    table = torch.randn(n + 1, d, generator=torch.Generator().manual_seed(0))
    table[PAD_ID] = 100.0  # a padding row that would win every search if it were not excluded
    return table


def test_exact_top_items_excludes_pad_and_matches_brute_force() -> None:
    table, queries = _table(), torch.randn(4, 8)
    scores, items = exact_top_items(queries, table, 5)
    assert not bool((items == PAD_ID).any())
    brute = (queries @ table[1:].T).argsort(dim=1, descending=True)[:, :5] + 1
    assert torch.equal(items, brute)


def test_allowed_mask_and_short_lists_pad_with_zero() -> None:
    table = _table(6)
    allowed = torch.tensor([False, True, False, True, False, False, False])
    _, items = ItemIndex(table, allowed=allowed, backend="torch").search(torch.randn(3, 8), 4)
    assert bool((items[:, 2:] == PAD_ID).all())
    assert set(items[:, :2].flatten().tolist()) <= {1, 3}


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_faiss_flat_equals_torch_exact() -> None:
    table, queries = _table(200, 16), torch.randn(32, 16)
    faiss_index, torch_index = ItemIndex(table, backend="faiss"), ItemIndex(table, backend="torch")
    assert faiss_index.describe() == "faiss:exact"
    f_scores, f_items = faiss_index.search(queries, 10)
    t_scores, t_items = torch_index.search(queries, 10)
    assert torch.equal(f_items, t_items)
    assert torch.allclose(f_scores, t_scores, atol=1e-4)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_approximate_index_is_opt_in_and_recorded() -> None:
    table = _table(500, 16)
    index = ItemIndex(table, backend="faiss", kind="hnsw")
    assert index.describe() == "faiss:hnsw"
    _, items = index.search(torch.randn(4, 16), 10)
    assert not bool((items == PAD_ID).any())
    with pytest.raises(ValueError, match="approximate"):
        ItemIndex(table, backend="torch", kind="ivf")


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=pytest.mark.skipif(
    not faiss_available(), reason="faiss not installed"))])
def test_item_bias_adds_a_per_item_score_on_every_backend(backend: str) -> None:
    table, queries = _table(200, 16), torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    bias = 3.0 * torch.rand(201, generator=torch.Generator().manual_seed(2))
    index = ItemIndex(table, backend=backend, item_bias=bias)
    assert index.describe() == f"{backend}:exact + item bias"
    scores, items = index.search(queries, 10)
    brute = queries @ table[1:].T + bias[1:]  # (32, 200)
    assert torch.equal(items, brute.argsort(dim=1, descending=True)[:, :10] + 1)
    assert torch.allclose(scores, brute.gather(1, items - 1), atol=1e-4)
    assert not torch.equal(items, ItemIndex(table, backend=backend).search(queries, 10)[1])  # the bias matters
    with pytest.raises(ValueError, match="item_bias must be"):
        ItemIndex(table, item_bias=bias[1:])
