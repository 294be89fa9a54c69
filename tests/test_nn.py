"""The shared transformer block: its packed, memory and cached paths equal the padded forward."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from recbench.nn import Dropout, TransformerBlock, attention, dropout


def _left_padded(batch: int, length: int, width: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    valid = torch.arange(length).unsqueeze(0) >= (length - lengths).unsqueeze(1)  # (B, L)
    x = torch.randn(batch, length, width, generator=generator) * valid.unsqueeze(-1)
    return x, valid


def test_packed_forward_equals_the_padded_forward_at_real_positions() -> None:
    generator = torch.Generator().manual_seed(0)
    block = TransformerBlock(16, 2, 32, dropout=0.0).eval()
    x, valid = _left_padded(5, 7, 16, generator)
    mask = valid[:, None, None, :]
    padded = block(x, mask)[valid]  # (M, d)
    index = valid.flatten().nonzero().squeeze(1)
    packed = block.forward_packed(x.flatten(0, 1)[index], index, mask)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    # a change at a padded slot changes nothing
    x[~valid] = 7.0
    assert torch.allclose(block.forward_packed(x.flatten(0, 1)[index], index, mask), packed)


def test_memory_and_cached_paths_equal_the_full_decoder_forward() -> None:
    generator = torch.Generator().manual_seed(1)
    block = TransformerBlock(16, 4, 32, dropout=0.0, cross_attention=True).eval()
    memory, valid = _left_padded(3, 6, 16, generator)
    memory_mask = valid[:, None, None, :]
    rows, length = 2, 4
    x = torch.randn(3, rows, length, 16, generator=generator)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    expected = torch.stack(
        [block(x[:, r], causal, memory, memory_mask) for r in range(rows)], dim=1
    )  # (B, R, T, d)
    index = valid.flatten().nonzero().squeeze(1)
    assert block.cross_attention is not None
    packed_kv = block.cross_attention.memory_key_values(memory.flatten(0, 1)[index], index, (3, 6))
    torch.testing.assert_close(block.forward_with_memory(x, packed_kv, memory_mask, causal), expected, atol=1e-5, rtol=1e-5)
    # one position at a time with the cache, rows as beams
    kv = block.cross_attention.memory_key_values(memory)
    heads = block.self_attention.num_heads
    past = (torch.zeros(3 * rows, heads, 0, 4), torch.zeros(3 * rows, heads, 0, 4))
    for t in range(length):
        out, past = block.decode_step(x[:, :, t].reshape(3 * rows, 1, 16), past, kv, memory_mask, beams=rows)
        torch.testing.assert_close(out.view(3, rows, 16), expected[:, :, t], atol=1e-5, rtol=1e-5)


def test_attention_without_bias_has_no_bias_parameters() -> None:
    block = TransformerBlock(8, 2, 16, cross_attention=True, attention_bias=False)
    assert block.self_attention.query.bias is None and block.self_attention.key_value.bias is None


def test_ffn_dropout_option_keeps_parameter_names() -> None:
    default = TransformerBlock(8, 2, 16, dropout=0.5)
    without = TransformerBlock(8, 2, 16, dropout=0.5, ffn_dropout=False).train()
    assert [n for n, _ in default.named_parameters()] == [n for n, _ in without.named_parameters()]
    assert isinstance(without.ffn[2], torch.nn.Identity) and isinstance(default.ffn[2], Dropout)
    x = torch.randn(3, 8)
    assert torch.equal(without.ffn(x), without.ffn(x)), "no dropout inside the FFN, even in train mode"


def test_packed_rows_with_a_prefix_mask_equal_the_row_by_row_decoder() -> None:
    """Rows of a (B, R) grid, each with its own memory prefix (a causal model's targets): the packed-row
    path (real rows only) equals running each row alone against its prefix of the memory."""
    generator = torch.Generator().manual_seed(2)
    block = TransformerBlock(16, 2, 32, dropout=0.0, cross_attention=True).eval()
    batch, rows, length, slots = 3, 4, 3, 5
    memory, valid = _left_padded(batch, slots, 16, generator)
    valid[:, 0] = True  # a context slot every row may see
    prefix = torch.ones(rows, slots, dtype=torch.bool).tril(diagonal=1)  # row r sees slots <= r + 1
    mask = (prefix.repeat_interleave(length, 0) & valid[:, None, :])[:, None]  # (B, 1, R T, S)
    x = torch.randn(batch, rows, length, 16, generator=generator)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    expected = torch.stack(
        [block(x[:, r], causal, memory, (prefix[r] & valid)[:, None, None, :]) for r in range(rows)], dim=1
    )  # (B, R, T, d)
    assert block.cross_attention is not None
    kv = block.cross_attention.memory_key_values(memory)
    torch.testing.assert_close(block.forward_with_memory(x, kv, mask, causal), expected, atol=1e-5, rtol=1e-5)
    real = torch.rand(batch, rows, generator=generator) < 0.6
    index = real.flatten().nonzero().squeeze(1)
    packed = block.forward_with_memory(x.flatten(0, 1)[index], kv, mask, causal, index, (batch, rows))
    torch.testing.assert_close(packed, expected.flatten(0, 1)[index], atol=1e-5, rtol=1e-5)


def test_kept_positions_equal_the_full_decoder_output_there() -> None:
    generator = torch.Generator().manual_seed(4)
    block = TransformerBlock(16, 2, 32, dropout=0.0, cross_attention=True).eval()
    memory, valid = _left_padded(3, 5, 16, generator)
    mask = valid[:, None, None, :]
    x = torch.randn(3, 4, 4, 16, generator=generator)  # (B, R, T, d)
    assert block.cross_attention is not None
    kv = block.cross_attention.memory_key_values(memory)
    full = block.forward_with_memory(x, kv, mask).flatten(1, 2)  # (B, R T, d)
    keep = torch.stack([torch.randperm(16, generator=generator)[:7] for _ in range(3)])  # (B, Q)
    kept = block.forward_with_memory(x, kv, mask, keep=keep)
    torch.testing.assert_close(kept, full.gather(1, keep.unsqueeze(-1).expand(-1, -1, 16)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="packed rows"):
        block.forward_with_memory(x.flatten(0, 1), kv, mask, index=torch.arange(12), grid=(3, 4), keep=keep)


def test_cpu_dropout_keeps_the_expectation_and_the_rate() -> None:
    torch.manual_seed(0)
    x = torch.ones(400_000)
    y = dropout(x, 0.1)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.9) < 0.003, kept
    assert abs(y.mean().item() - 1.0) < 0.005  # inverted: the kept entries are scaled up
    assert torch.equal(dropout(x, 0.1, training=False), x) and torch.equal(dropout(x, 0.0), x)
    assert not dropout(x, 1.0).any()
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.1), y), "seeded like every other draw"
    z = torch.randn(3, 5, requires_grad=True)
    out = dropout(z, 0.5)
    out.sum().backward()
    assert torch.equal(z.grad, (out != 0).float() * 2.0)  # the gradient passes through the same mask


def test_cpu_attention_with_dropout_matches_sdpa_in_expectation_and_without_it_exactly() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4)
    mask = torch.rand(2, 1, 5, 6) > 0.3
    mask[..., 0] = True
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(attention(q, k, v, mask, 0.0), plain, atol=1e-6)
    mean = torch.stack([attention(q, k, v, mask, 0.2) for _ in range(3000)]).mean(0)
    assert torch.allclose(mean, plain, atol=0.05)
    with pytest.raises(AssertionError):  # the test can tell dropout from none
        assert torch.allclose(attention(q, k, v, mask, 0.2), plain, atol=1e-3)
