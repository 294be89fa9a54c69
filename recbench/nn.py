"""Transformer pieces shared by two or more models (SASRec, TIGER-style, DiffGRM).

One pre-LN block with self-attention, optional cross-attention and a position-wise FFN, built on
``torch.nn.functional.scaled_dot_product_attention`` (fused kernels on GPU and CPU). Masks are
boolean with True = may attend, broadcastable to ``(B, heads, L_q, L_k)``.
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
        q = self.query(x).view(batch, length, heads, -1).transpose(1, 2)  # (B, H, Lq, Dh)
        k, v = self.key_value(context).view(batch, context.shape[1], 2, heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, Lq, Dh)
        return self.out(y.transpose(1, 2).reshape(batch, length, heads * self.head_dim))


class TransformerBlock(nn.Module):
    """Pre-LN block: ``x + Attn(LN(x))`` [+ ``x + CrossAttn(LN(x), memory)``] + ``x + FFN(LN(x))``.

    ``head_dim`` (default ``d_model // num_heads``) is passed to both attentions; see
    :class:`MultiHeadAttention`.
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
    ) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.self_attention = MultiHeadAttention(d_model, num_heads, dropout, head_dim=head_dim)
        self.cross_norm = nn.LayerNorm(d_model, eps=norm_eps) if cross_attention else None
        self.cross_attention = (
            MultiHeadAttention(d_model, num_heads, dropout, head_dim=head_dim) if cross_attention else None
        )
        self.ffn_norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_dim),
            nn.ReLU() if activation == "relu" else nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_dim, d_model),
        )
        self.dropout = nn.Dropout(dropout)

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
