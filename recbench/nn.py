"""Transformer pieces shared by two or more models (SASRec, TIGER-style, DiffGRM).

One pre-LN block with self-attention, optional cross-attention and a position-wise FFN, built on
``torch.nn.functional.scaled_dot_product_attention`` (fused kernels on GPU and CPU). Masks are
boolean with True = may attend, broadcastable to ``(B, heads, L_q, L_k)``.

Three ways through the same parameters, one implementation each, used by every model:

- :meth:`TransformerBlock.forward`: the padded grid ``(B, L, d)``;
- :meth:`TransformerBlock.forward_packed`: encoder blocks on the ``M`` real tokens ``(M, d)`` of a
  padded grid; projections and FFN (the bulk of the cost) never see padding, only the attention
  product runs on the ``(B, S)`` grid, with zero queries/keys/values at padded slots;
- :meth:`TransformerBlock.forward_with_memory` / :meth:`TransformerBlock.decode_step`: decoder
  blocks whose cross-attention keys/values were projected once per user
  (:meth:`MultiHeadAttention.memory_key_values`, real rows only when packed), for ``R`` rows per user
  (teacher forcing, DiffGRM's views; optionally only the real rows of a padded ``(B, R)`` grid, e.g.
  one row per target of a causal model) or one new position of ``w`` beams with a KV cache.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F


def causal_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """Self-attention mask ``(B, 1, L, L)`` for left-padded causal sequences.

    Position i attends to real positions j <= i. A padded query attends only to itself so that its
    softmax is defined (its output is discarded by the caller); real queries never see padding.
    """
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    return (causal & (valid.unsqueeze(1) | eye)).unsqueeze(1)  # (B, 1, L, L)


def _keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A Bernoulli(1 - p) keep mask from 16-bit slices of 64-bit random words, and its scale.

    Four mask entries per random draw instead of one: torch's CPU ``bernoulli_`` (behind
    ``F.dropout`` and SDPA's dropout) costs ~11 ns an element, a quarter of a TIGER-style training
    step on 2 cores; this costs ~2. ``p`` is rounded to a multiple of 1/65536, and the scale uses
    the rounded keep probability, so the output's expectation is the input exactly."""
    count = shape.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64, device=device)
    dropped = min(round(p * 65536), 65535)  # of 65536 equally likely 16-bit values; keep at least one
    keep = words.view(torch.int16)[:count].view(shape) >= dropped - 32768
    return keep, 65536 / (65536 - dropped)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout: ``F.dropout`` off the CPU; on the CPU with :func:`_keep_mask`'s cheap mask."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    keep, scale = _keep_mask(x.shape, p, x.device)
    return x * (keep * scale).to(x.dtype)  # one float mask, reused by the backward pass


class Dropout(nn.Module):
    """``nn.Dropout`` through :func:`dropout` (same behaviour, cheaper masks on CPU)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, except with dropout on the CPU: there SDPA's math path
    draws its mask with ``bernoulli_`` (6x the cost of the attention itself), so the same
    softmax-dropout-product runs here with :func:`dropout`. A fully masked query row gets uniform
    weights there (finite, unlike ``-inf`` filling), and its output is the caller's to discard."""
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (..., Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return dropout(scores.softmax(dim=-1), dropout_p) @ v  # (..., Lq, Dv)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(R, T, H * Dh) -> (R, H, T, Dh)."""
    rows, length, _ = x.shape
    return x.view(rows, length, heads, -1).transpose(1, 2)


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    """(R, H, T, Dh) -> (R, T, H * Dh)."""
    return y.transpose(1, 2).flatten(2)


def scatter_rows(rows: torch.Tensor, index: torch.Tensor, slots: int) -> torch.Tensor:
    """Packed rows ``(M, C)`` at flat ``index`` ``(M,)`` of a grid of ``slots`` -> ``(slots, C)``, zero elsewhere."""
    return rows.new_zeros(slots, rows.shape[-1]).index_copy(0, index, rows)


class MultiHeadAttention(nn.Module):
    """Multi-head attention; ``head_dim`` defaults to ``d_model // num_heads``.

    ``head_dim`` may be set independently of ``d_model`` (T5-style, e.g. TIGER's d 128 with 6 heads
    of 64): the projections then map ``d_model -> num_heads * head_dim -> d_model``. Left at
    ``None`` the module is exactly the classic one (same parameter names and shapes).
    """

    def __init__(
        self, d_model: int, num_heads: int, dropout: float = 0.0, bias: bool = True, head_dim: int | None = None
    ) -> None:
        super().__init__()
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
            head_dim = d_model // num_heads
        inner = num_heads * head_dim
        self.num_heads, self.head_dim, self.dropout = num_heads, head_dim, dropout
        self.query = nn.Linear(d_model, inner, bias=bias)
        self.key_value = nn.Linear(d_model, 2 * inner, bias=bias)
        self.out = nn.Linear(inner, d_model)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        heads = self.num_heads
        if context is x:  # self-attention: one projection (q | k | v) instead of two over the same rows
            q, k, v = self.packed_projection(x).view(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
        else:
            q = self.query(x).view(batch, length, heads, -1).transpose(1, 2)  # (B, H, Lq, Dh)
            k, v = self.key_value(context).view(batch, context.shape[1], 2, heads, -1).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v, mask, self._dropout_p())  # (B, H, Lq, Dh)
        return self.out(y.transpose(1, 2).reshape(batch, length, heads * self.head_dim))

    def packed_projection(self, x: torch.Tensor) -> torch.Tensor:
        """``cat([query(x), key_value(x)], -1)`` ``(..., 3 H Dh)`` in one matrix product (the same
        parameters; one product and one input gradient instead of two each)."""
        weight = torch.cat([self.query.weight, self.key_value.weight])
        bias = None if self.query.bias is None else torch.cat([self.query.bias, self.key_value.bias])
        return F.linear(x, weight, bias)

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0

    def packed_self_attention(self, x: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Self-attention of packed tokens ``x`` ``(M, d)`` at flat ``index`` ``(M,)`` of a ``(B, S)``
        grid; ``mask`` ``(B, 1, 1 or S, S)``. Projections run on the M real tokens; padded slots are
        zero (masked as keys, dropped as queries). Returns ``(M, d)``."""
        batch, length = mask.shape[0], mask.shape[-1]
        width = self.num_heads * self.head_dim
        qkv = self.packed_projection(x)  # (M, 3 H Dh): q | k | v
        grid = scatter_rows(qkv, index, batch * length)  # (B * S, 3 H Dh)
        q, k, v = grid.view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, S, Dh)
        y = attention(q, k, v, mask, self._dropout_p())
        return self.out(y.transpose(1, 2).reshape(batch * length, width)[index])  # (M, d)

    def memory_key_values(
        self, memory: torch.Tensor, index: torch.Tensor | None = None, grid: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, H, S, Dh)`` of a memory, projected once per user.

        ``memory`` is ``(B, S, d)``, or packed ``(M, d)`` with its flat ``index`` into a ``grid`` of
        ``(B, S)`` slots; padded slots then get zero keys and values without being projected.
        """
        if index is None:
            batch, length, _ = memory.shape
            kv = self.key_value(memory)  # (B, S, 2 H Dh)
        else:
            if grid is None:
                raise ValueError("packed memory needs its grid (B, S)")
            batch, length = grid
            kv = scatter_rows(self.key_value(memory), index, batch * length)  # (B * S, 2 H Dh)
        k, v = kv.view(batch, length, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return k, v

    def attend(
        self,
        x: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Queries from ``x`` ``(B, Q, d)`` against given keys/values ``(B, H, S, Dh)`` -> ``(B, Q, d)``.

        Packed rows: ``x`` ``(M, T, d)`` holds the real rows at flat ``index`` ``(M,)`` of a ``grid`` of
        ``(B, R)`` rows (``Q = R T`` queries per user, ``mask`` broadcastable to ``(B, H, R T, S)``). The
        projections run on the M real rows only; the attention product runs on the grid with zero
        queries at the missing rows, whose outputs are dropped. Returns ``(M, T, d)``.
        """
        if index is None:
            q = split_heads(self.query(x), self.num_heads)  # (B, H, Q, Dh)
            y = attention(q, keys, values, mask, self._dropout_p())
            return self.out(merge_heads(y))
        if grid is None:
            raise ValueError("packed rows need their grid (B, R)")
        (batch, rows), length = grid, x.shape[1]
        q = scatter_rows(self.query(x).flatten(1), index, batch * rows)  # (B R, T H Dh)
        q = split_heads(q.view(batch, rows * length, -1), self.num_heads)  # (B, H, R T, Dh)
        y = attention(q, keys, values, mask, self._dropout_p())
        return self.out(merge_heads(y).reshape(batch * rows, length, -1)[index])  # (M, T, d)


class TransformerBlock(nn.Module):
    """Pre-LN block: ``x + Attn(LN(x))`` [+ ``x + CrossAttn(LN(x), memory)``] + ``x + FFN(LN(x))``.

    ``head_dim`` (default ``d_model // num_heads``) is passed to both attentions; see
    :class:`MultiHeadAttention`. ``ffn_dropout=False`` drops the dropout between the two FFN
    linears (GPT-2-style MLP, DiffGRM's reference); the slot stays (an ``Identity``) so parameter
    names do not depend on it.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float = 0.1,
        activation: Literal["relu", "gelu"] = "gelu",
        norm_eps: float = 1e-5,
        cross_attention: bool = False,
        head_dim: int | None = None,
        attention_bias: bool = True,
        ffn_dropout: bool = True,
    ) -> None:
        super().__init__()
        attention = dict(dropout=dropout, bias=attention_bias, head_dim=head_dim)
        self.self_norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.self_attention = MultiHeadAttention(d_model, num_heads, **attention)
        self.cross_norm = nn.LayerNorm(d_model, eps=norm_eps) if cross_attention else None
        self.cross_attention = MultiHeadAttention(d_model, num_heads, **attention) if cross_attention else None
        self.ffn_norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_dim),
            nn.ReLU() if activation == "relu" else nn.GELU(),
            Dropout(dropout) if ffn_dropout else nn.Identity(),
            nn.Linear(ffn_dim, d_model),
        )
        self.dropout = Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        self_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.self_norm(x)
        x = x + self.dropout(self.self_attention(h, h, self_mask))
        if self.cross_attention is not None:
            if memory is None:
                raise ValueError("this block has cross-attention and needs a memory")
            x = x + self.dropout(self.cross_attention(self.cross_norm(x), memory, memory_mask))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))

    def _cross(self) -> tuple[MultiHeadAttention, nn.LayerNorm]:
        if self.cross_attention is None or self.cross_norm is None:
            raise ValueError("this block has no cross-attention")
        return self.cross_attention, self.cross_norm

    def forward_packed(self, x: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` (self-attention only) on the real tokens ``x`` ``(M, d)`` at flat ``index``
        of a ``(B, S)`` grid with key/attention ``mask`` ``(B, 1, 1 or S, S)``; same result as the padded
        forward at the real positions up to float rounding (``tests/test_nn.py``)."""
        x = x + self.dropout(self.self_attention.packed_self_attention(self.self_norm(x), index, mask))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))

    def forward_with_memory(
        self,
        x: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        memory_mask: torch.Tensor | None = None,
        self_mask: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder block over ``R`` rows per user: ``x`` ``(B, R, T, d)``, cross-attention keys/values
        ``(B, H, S, Dh)`` projected once per user, ``memory_mask`` broadcastable to ``(B, 1, R T, S)``
        (``(B, 1, 1, S)`` for a key mask, or one row of keys per query, e.g. a prefix per row).

        Self-attention runs per row over its ``T`` positions (``self_mask`` ``(T, T)``); cross-attention
        runs per user with the ``R T`` queries of its rows (queries do not interact, so this equals
        attending row by row, without copying keys/values per row). With ``index``, ``x`` is
        ``(M, T, d)``: only the real rows at flat ``index`` of the ``(B, R)`` ``grid``, and everything
        but the cross-attention product runs on them alone (:meth:`MultiHeadAttention.attend`).

        ``keep`` ``(B, Q)`` (unpacked rows and a key ``memory_mask`` ``(B, 1, 1, S)`` only): the
        positions, of each user's ``R T``, whose outputs the caller reads (e.g. the scored positions in
        a last layer). Self-attention runs on every position (all are keys and values); the
        cross-attention and the FFN, the larger part of the block, run on the kept positions only.
        Returns ``(B, Q, d)``, equal to those positions of the full output."""
        cross, cross_norm = self._cross()
        shape = x.shape
        if keep is not None and index is not None:
            raise ValueError("keep selects positions of the full grid; it does not combine with packed rows")
        if index is None:
            batch, rows, length, width = shape
            x = x.reshape(batch * rows, length, width)  # rows are independent in self-attention
        h = self.self_norm(x)
        x = x + self.dropout(self.self_attention(h, h, self_mask))  # (B R or M, T, d)
        if keep is not None:
            x = x.view(batch, rows * length, width).gather(1, keep.unsqueeze(-1).expand(-1, -1, width))  # (B, Q, d)
            x = x + self.dropout(cross.attend(cross_norm(x), *memory_kv, memory_mask))
            return x + self.dropout(self.ffn(self.ffn_norm(x)))
        h = cross_norm(x)
        if index is None:
            y = cross.attend(h.view(batch, rows * length, width), *memory_kv, memory_mask).view_as(x)
        else:
            y = cross.attend(h, *memory_kv, memory_mask, index, grid)
        x = x + self.dropout(y)
        return (x + self.dropout(self.ffn(self.ffn_norm(x)))).view(shape)

    def decode_step(
        self,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor],
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        memory_mask: torch.Tensor | None,
        beams: int,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One new causal decoder position with a KV cache (eval: no dropout).

        ``x`` ``(B * w, 1, d)``, rows user-major; ``past`` self-attention (keys, values)
        ``(B * w, H, t, Dh)``; ``memory_kv`` ``(B, H, S, Dh)``. Returns the output ``(B * w, 1, d)``
        and the extended cache; equal to the last position of :meth:`forward` with a causal mask.
        """
        attention, (cross, cross_norm) = self.self_attention, self._cross()
        rows = x.shape[0]
        h = self.self_norm(x)
        q = split_heads(attention.query(h), attention.num_heads)  # (R, H, 1, Dh)
        k_new, v_new = attention.key_value(h).view(rows, 1, 2, attention.num_heads, -1).permute(2, 0, 3, 1, 4)
        keys, values = torch.cat([past[0], k_new], dim=2), torch.cat([past[1], v_new], dim=2)  # (R, H, t + 1, Dh)
        # Every cached position precedes the new one: the causal mask is all True here.
        x = x + attention.out(merge_heads(F.scaled_dot_product_attention(q, keys, values)))
        users = rows // beams
        # The w beams of a user are w queries against that user's memory: no per-beam copy of K/V.
        x = x + cross.attend(cross_norm(x).view(users, beams, -1), *memory_kv, memory_mask).view(rows, 1, -1)
        x = x + self.ffn(self.ffn_norm(x))
        return x, (keys, values)
