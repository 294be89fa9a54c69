"""The chunked full-softmax cross-entropy equals the plain one, in loss and in both gradients."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from recbench.losses import IGNORE_INDEX, linear_cross_entropy


def _plain(hidden: torch.Tensor, table: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ table.T).float(), labels, ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("chunk_elements", [7, 50, 10_000])  # many chunks, a ragged last chunk, one chunk
def test_loss_and_gradients_equal_the_plain_cross_entropy(chunk_elements: int) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    table = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (23,))
    labels[::4] = IGNORE_INDEX
    expected = F.cross_entropy(hidden @ table.T, labels, ignore_index=IGNORE_INDEX)
    expected_grads = torch.autograd.grad(3.0 * expected, (hidden, table))
    loss = linear_cross_entropy(hidden, table, labels, chunk_elements=chunk_elements)
    grads = torch.autograd.grad(3.0 * loss, (hidden, table))  # an upstream factor reaches both gradients
    assert torch.allclose(loss.double(), expected, atol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.allclose(got.double(), want, atol=1e-6)


def test_batched_rows_and_a_sliced_tied_table() -> None:
    torch.manual_seed(1)
    weight = torch.randn(9, 4, requires_grad=True)  # row 0 plays the padding row
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    labels = torch.tensor([[0, 7, IGNORE_INDEX], [IGNORE_INDEX, 3, 2]])
    loss = linear_cross_entropy(hidden, weight[1:], labels, chunk_elements=16)
    loss.backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    _plain(hidden.flatten(0, 1), weight[1:], labels.flatten()).backward()
    assert torch.allclose(got[0], hidden.grad, atol=1e-6)
    assert torch.allclose(got[1], weight.grad, atol=1e-6)
    assert bool((got[1][0] == 0).all())  # the padding row is never scored


def test_no_labelled_row_gives_zero_loss_and_zero_gradients() -> None:
    hidden = torch.randn(3, 4, requires_grad=True)
    table = torch.randn(5, 4, requires_grad=True)
    loss = linear_cross_entropy(hidden, table, torch.full((3,), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and not hidden.grad.any() and not table.grad.any()


def test_mismatched_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="width"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 6), torch.zeros(3, dtype=torch.long))


def test_excluded_classes_get_no_probability_and_no_gradient() -> None:
    torch.manual_seed(2)
    hidden = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    table = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    excluded = torch.zeros(10, dtype=torch.bool)
    excluded[[0, 4, 9]] = True  # e.g. the padding row and items never trained
    labels = torch.tensor([1, 2, 3, 5, 6, 7, 8, 1, 2, 3, 5, IGNORE_INDEX, IGNORE_INDEX])
    expected = F.cross_entropy((hidden @ table.T).masked_fill(excluded, float("-inf")), labels, ignore_index=IGNORE_INDEX)
    expected_grads = torch.autograd.grad(expected, (hidden, table))
    loss = linear_cross_entropy(hidden, table, labels, excluded=excluded, chunk_elements=30)
    grads = torch.autograd.grad(loss, (hidden, table))
    assert torch.allclose(loss.double(), expected, atol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.allclose(got.double(), want, atol=1e-6)
    assert not grads[1][excluded].any()
    plain = linear_cross_entropy(hidden, table, labels)
    assert plain > loss, "excluding classes removes probability mass from the denominator"
    with pytest.raises(ValueError, match="excluded"):
        linear_cross_entropy(hidden, table, labels, excluded=excluded[:-1])
