"""DiffGRM: masked discrete diffusion over parallel semantic-ID digits, after the paper (arXiv
2510.21805) and its reference code (liuzhao09/DiffGRM, ``genrec/models/DIFF_GRM``).

An item is an ``n``-digit semantic ID (SID) from Parallel Semantic Encoding (PSE: PCA 256 with
whitening, L2, OPQ, PQ ``n`` x 256; :func:`recbench.semantic_ids.fit_parallel_pq`, fitted on training
items only). The digits are parallel (one PQ sub-space each), so the model predicts them in any
order: a bidirectional decoder over the ``n`` digit positions, conditioned on the history through
cross-attention, fills masked digits.

Network (reference ``model.py``)
------------------------
* One shared token table ``E`` of ``1 + n·K`` rows (row 0 = PAD; digit ``d``'s code ``c`` is row
  ``1 + d·K + c``) serves the history, the decoder input and the output (tied).
* Encoder: each history item's ``n`` digit embeddings are concatenated (``n·d``) and mapped by
  ``Linear(nd, d) -> ReLU -> Linear(d, d)`` to ONE token per item; plus a learned position
  embedding counted from the oldest kept item (index 0), dropout, ``encoder_layers`` pre-LN blocks
  with bidirectional self-attention and a key-padding mask, the final LayerNorm ``ln_f``, padded
  rows zeroed. The encoder runs on the packed real history items only (padding exists only inside
  the attention product), which is exact and ~2x cheaper per training step on Beauty-shaped data.
* Decoder: ``n`` positions with no position embedding; position ``d`` holds ``E[1 + d·K + c_d]``
  when revealed and a learned per-digit mask vector ``M_d`` when masked; dropout;
  ``decoder_layers`` pre-LN blocks (bidirectional self-attention over the ``n`` positions,
  cross-attention to the encoder output WITH a key-padding mask, GELU FFN); the same ``ln_f``.
* Output: ``logits_d = h_d · E[1 + d·K : 1 + (d+1)·K]ᵀ`` (tied digit slice, no bias).
* Attention projections are fused and bias-free (``Linear(d, 3d, bias=False)``; cross-attention
  takes its query rows from the decoder and its key/value rows from the encoder output), output
  projections have a bias; init N(0, 0.02) for every Linear/Embedding, zero biases.

Training: on-policy coherent noising (OCN, reference ``DIFF_GRM.forward``)
-----------------------------------------------
``masking="guided"`` (the paper): the decoder, in eval mode and without gradient, scores the fully
masked target; digits are ordered by confidence (``msp`` = max softmax probability, or ``entropy``
= minus the entropy), least confident first; view ``t = 1..n`` masks the ``t`` least confident
digits and reveals the rest (``recbench.diffusion.nested_mask_views``). The ``n`` views share one
encoder pass. Loss: label-smoothed cross-entropy over masked positions only, summed over views and
divided by the number of masked positions. Ablations: ``sequential`` (nested views along a random
permutation per sample) and ``random`` (independent Bernoulli masks, at least one digit masked).

Optimisation: AdamW, linear warm-up over ``warmup_steps`` optimiser steps (expressed in steps,
as in the reference; at batch 1024 the reference's 10k steps are ~90 Beauty epochs), then cosine decay
to 0 at ``decay_steps`` (default: the trainer's estimated total steps, i.e. ``max_epochs`` x steps per
epoch as in the reference), through the shared :func:`recbench.schedules.sized_schedule` (which caps
the warm-up at half of the steps the profile allows). Gradient-norm clipping at ``gradient_clip_val`` (default 1.0) is done by
the model (``configure_gradient_clipping``), so it holds under any trainer; a ``Trainer(
gradient_clip_val=...)`` overrides it.

Decoding: confidence-guided parallel denoising (CPD, reference ``beam.py:iterative_mask_decode``)
----------------------------------------------------------
:func:`cpd_beam_search`, batched over users x beams: step 0 keeps the top ``beam`` (digit, code)
pairs of the fully masked state; steps ``1 .. n-2`` keep the global top ``beam`` over beams x unfilled
digits x codes (each step fills one more digit, whichever pair is most confident); the last digit
is filled by argmax. Scores are sums of the conditional log-probabilities along the fill path.
Cross-attention keys/values are computed once per user; the queries of all beams of a user attend
to them in one call, so nothing is copied per beam. Then (:func:`beams_to_items`) finished SIDs are
packed into int64 keys, illegal keys dropped (``SemanticIDs.items_for_keys``), duplicates dropped
keeping the best score, colliding keys expanded to all their items in ascending item id
(``SemanticIDs.expand_to_items``), and the top ``k`` ITEMS returned: metrics are item-level.

The beam width is ``test_beam`` while a Trainer tests or predicts and ``val_beam`` otherwise
(validation, sanity check, direct calls without ``beam=``). The reference uses 32 / 256 (val / test: the
model is then selected under a different decoder than the one tested); both widths are recorded in
``run_notes``, and ``benchmark/perf/diffgrm_speed.py`` times both.

Deviations from the reference, all deliberate
------------------------------------------------------------------
* Cross-attention masks padded history rows (the reference lets them absorb attention mass).
* Item-level evaluation with collisions expanded (the reference compares SID tuples); the
  list is never padded by repeating an item: missing slots are 0 and count as misses.
* The token table has 1 + n·K rows (PAD + digit codes); the reference's unused BOS/EOS rows are
  dropped (they never receive a gradient there, so this changes nothing but the parameter count).
* ``position_anchor="oldest"`` (default, the reference) counts encoder positions from the oldest
  kept item, so the newest item's position varies with the history length; ``"newest"`` anchors
  them at the newest item (as SASRec does). On synthetic data (follow-up signal in the last item)
  ``newest`` reached val NDCG@10 0.116 after 600 steps against 0.063 for ``oldest``: an ablation
  worth running, not the default.
* Warm-up factor ``(step + 1) / warmup_steps`` instead of ``step / warmup_steps``, so the first
  optimiser step is not a no-op.
* Training pairs come from the shared pipeline (every position of the training prefix is a target,
  history truncated to the last ``max_len`` items; the shared pipeline) instead of the reference's
  ``min_hist = 2`` / dropped-target windows. Histories are left-padded; positions are re-indexed from
  the mask so that index 0 is the oldest kept item, as with the reference's right padding.
* ``guided_refresh_each_step`` (re-scoring after each masked digit) and the LLaDA-weighted random
  variant are not implemented (both off in the paper's runs).
* Decoding is unconstrained with post-hoc legality filtering, as in the reference; the invalid share
  among decoded candidates is reported (``invalid_id_rate``).
* Beams are decoded in chunks of at most ``beam_chunk_rows`` (users x beam) rows to bound memory; the
  chunks are blocks of users, each decoded fully batched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from recbench.batch import HISTORY, PAD_ID, TARGET, Batch, trim_left_padding
from recbench.data import SeqRecDataModule
from recbench.diffusion import (
    MASKED,
    apply_mask,
    confidence_order,
    masked_cross_entropy,
    nested_mask_views,
    position_confidence,
    random_mask_views,
    random_order,
)
from recbench.item_side import codebook_size_for, item_embeddings_for, semantic_ids_for
from recbench.metrics import DEFAULT_KS
from recbench.schedules import WarmupSchedule, scheduler_config, sized_schedule
from recbench.semantic_id_model import SemanticIDModel
from recbench.semantic_ids import ParallelPQConfig, SemanticIDs
from recbench.text import DEFAULT_ENCODER

log = logging.getLogger(__name__)

Masking = Literal["guided", "sequential", "random"]
DecodeOrder = Literal["confidence", "fixed"]

#: ``log_probs_fn(codes (B, R, n) with MASKED where unfilled) -> (B, R, n, K) float32 log-probs``.
LogProbsFn = Callable[[Tensor], Tensor]


# ============================================================================================
# network pieces (private)
# ============================================================================================


class _Attention(nn.Module):
    """Multi-head attention with one fused bias-free projection ``W (3d x d)`` (the reference's
    ``c_attn``) and a biased output projection. Self-attention projects q, k, v from ``x``;
    cross-attention projects q from the decoder and k, v from the memory with the same ``W``."""

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"hidden_size={d_model} is not divisible by num_heads={num_heads}")
        self.d_model, self.num_heads, self.dropout = d_model, num_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)

    def _heads(self, x: Tensor) -> Tensor:
        """(R, T, d) -> (R, H, T, d/H)."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).flatten(2))  # (R, T, d)

    def self_attend(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (R, T, d), mask broadcastable to (R, H, T, T) (True = may attend) -> (R, T, d)."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self._attend(self._heads(q), self._heads(k), self._heads(v), mask)

    def self_attend_packed(self, x: Tensor, valid: Tensor, mask: Tensor) -> Tensor:
        """Self-attention over packed tokens: x (M, d) are the ``valid`` (B, L) positions of a padded
        batch in row-major order; mask (B, 1, 1, L). Projections run on the M real tokens only; the
        padded slots get zero queries/keys/values (keys masked, outputs dropped) -> (M, d)."""
        projected = self.qkv(x)  # (M, 3d), in the autocast dtype where one is active
        qkv = projected.new_zeros(*valid.shape, 3 * self.d_model)  # (B, L, 3d)
        qkv[valid] = projected
        q, k, v = qkv.chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(
            self._heads(q), self._heads(k), self._heads(v), attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, L, d/H)
        return self.out(y.transpose(1, 2).flatten(2)[valid])  # (M, d)

    def memory_kv(self, memory: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values of packed memory tokens (M, d) at the ``valid`` (B, L)
        slots -> two (B, H, L, d/H), zero at padded slots (the reference's zeroed pad rows)."""
        projected = F.linear(memory, self.qkv.weight[self.d_model :])  # (M, 2d)
        kv = projected.new_zeros(*valid.shape, 2 * self.d_model)  # (B, L, 2d)
        kv[valid] = projected
        k, v = kv.chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def cross_attend(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """x (B, Q, d) attends to per-user keys/values (B, H, L, d/H); mask (B, 1, 1, L)."""
        q = F.linear(x, self.qkv.weight[: self.d_model])
        return self._attend(self._heads(q), k, v, mask)


class _Block(nn.Module):
    """Pre-LN block: self-attention [+ cross-attention] + GELU FFN, residual dropout after each."""

    def __init__(self, d_model: int, num_heads: int, inner_size: int, dropout: float, cross: bool) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(d_model, eps=1e-5)
        self.self_attention = _Attention(d_model, num_heads, dropout)
        self.cross_norm = nn.LayerNorm(d_model, eps=1e-5) if cross else None
        self.cross_attention = _Attention(d_model, num_heads, dropout) if cross else None
        self.ffn_norm = nn.LayerNorm(d_model, eps=1e-5)
        self.ffn = nn.Sequential(nn.Linear(d_model, inner_size), nn.GELU(), nn.Linear(inner_size, d_model))
        self.dropout = nn.Dropout(dropout)

    def encode(self, x: Tensor, valid: Tensor, mask: Tensor) -> Tensor:
        """Encoder block on packed tokens: x (M, d) = the ``valid`` (B, L) slots; key mask (B, 1, 1, L).
        Everything but the attention product runs on the M real tokens only (exact: padded slots
        never reach a real token's output)."""
        h = self.self_norm(x)
        x = x + self.dropout(self.self_attention.self_attend_packed(h, valid, mask))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))

    def decode(self, x: Tensor, k: Tensor, v: Tensor, memory_mask: Tensor) -> Tensor:
        """Decoder block: x (B, R, n, d) = R rows (views or beams) per user; k, v (B, H, L, d/H).

        Self-attention runs per row over its n positions; cross-attention runs per USER with the
        R·n queries of all its rows against the user's keys/values (queries do not interact in
        cross-attention, so this equals attending row by row, without repeating k/v per row).
        """
        assert self.cross_attention is not None and self.cross_norm is not None
        batch, rows, n, width = x.shape
        h = self.self_norm(x).reshape(batch * rows, n, width)
        x = x + self.dropout(self.self_attention.self_attend(h)).view(batch, rows, n, width)
        h = self.cross_norm(x).reshape(batch, rows * n, width)
        x = x + self.dropout(self.cross_attention.cross_attend(h, k, v, memory_mask)).view(batch, rows, n, width)
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class _Decoder(nn.Module):
    """The decoder's own modules (mask vectors, input dropout, blocks), grouped so that the OCN
    scoring pass can switch exactly these to eval mode."""

    def __init__(self, n_digits: int, d_model: int, num_heads: int, inner_size: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.mask_embedding = nn.Parameter(torch.empty(n_digits, d_model))  # M_d, one per digit
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(d_model, num_heads, inner_size, dropout, cross=True) for _ in range(layers))


@dataclass(frozen=True)
class _Memory:
    """Encoder output prepared for the decoder: per decoder layer (k, v) each (B, H, L, d/H), and the
    key-padding mask (B, 1, 1, L) (True = real history item)."""

    kv: tuple[tuple[Tensor, Tensor], ...]
    mask: Tensor

    def detach(self) -> _Memory:
        return _Memory(tuple((k.detach(), v.detach()) for k, v in self.kv), self.mask)


# ============================================================================================
# CPD beam (batched over users x beams)
# ============================================================================================


@dataclass(frozen=True)
class BeamResult:
    """Finished beams, best first per user.

    codes: (B, W, n) LongTensor: complete SIDs.
    scores: (B, W) float32: sum of log-probabilities along each beam's fill path, non-increasing
        along W; ``-inf`` marks an empty slot (merged duplicates, or fewer candidates than W), whose
        codes are all ``MASKED``.
    """

    codes: Tensor
    scores: Tensor


def _partial_state_keys(codes: Tensor, codebook_size: int) -> Tensor:
    """(..., n) partial codes (MASKED where unfilled) -> (...,) int64: one key per (filled set, codes)
    state, radix K + 1 with 0 = masked."""
    n = codes.shape[-1]
    radix = codebook_size + 1
    place = radix ** torch.arange(n - 1, -1, -1, device=codes.device, dtype=torch.long)
    return ((codes + 1) * place).sum(-1)


def _first_occurrence(keys: Tensor) -> Tensor:
    """(B, M) keys -> (B, M) bool, True at the first occurrence of each key in its row."""
    sorted_keys, order = torch.sort(keys, dim=1, stable=True)
    first = torch.ones_like(sorted_keys, dtype=torch.bool)
    first[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    return torch.zeros_like(first).scatter_(1, order, first)


def cpd_beam_search(
    log_probs_fn: LogProbsFn,
    batch_size: int,
    n_digits: int,
    codebook_size: int,
    beam: int,
    decode_order: DecodeOrder = "confidence",
    fixed_order: Sequence[int] | None = None,
    merge_duplicate_beams: bool = False,
    device: torch.device | str = "cpu",
) -> BeamResult:
    """Confidence-guided parallel denoising (CPD) beam, batched over users x beams.

    The only Python loop is over the ``n - 1`` filling steps. Per step, the network is called once
    on every (user, beam) state (``log_probs_fn``), and the next beams are one ``topk`` per user
    over the flattened (beam, digit, code) candidates.

    Args:
        log_probs_fn: codes (B, R, n) with ``MASKED`` where unfilled -> (B, R, n, K) log-probs.
        batch_size: B (users).
        n_digits: n >= 2.
        codebook_size: K, codes per digit.
        beam: B_act, beams kept per user.
        decode_order: ``confidence``: each step fills whichever unfilled (digit, code) pair is most
            confident (the paper). ``fixed``: step t fills digit ``fixed_order[t]`` (ablation;
            identity order by default); the last digit is still argmax-filled, so only the order
            differs from ``confidence``.
        fixed_order: permutation of ``0..n-1`` for ``decode_order="fixed"``.
        merge_duplicate_beams: merge beams that reach the same partial SID through different fill
            orders, keeping the best score (frees beam slots, so results may change).
            Exact: at step s a state has at most s + 1 parents, so the top ``beam`` distinct
            states are among the top ``beam·(s + 1)`` candidates.
        device: where the states live.

    Returns:
        :class:`BeamResult` with W = min(beam, number of reachable candidates) slots.
    """
    n, k = n_digits, codebook_size
    if n < 2:
        raise ValueError(f"the CPD beam needs n_digits >= 2, got {n}")
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    if decode_order == "fixed":
        order = list(range(n)) if fixed_order is None else [int(d) for d in fixed_order]
        if sorted(order) != list(range(n)):
            raise ValueError(f"fixed_order must be a permutation of 0..{n - 1}, got {fixed_order}")
    elif decode_order != "confidence":
        raise ValueError(f"decode_order must be 'confidence' or 'fixed', got {decode_order!r}")
    if merge_duplicate_beams and (k + 1) ** n >= 2**62:
        raise ValueError(f"merge_duplicate_beams: partial states of {n} digits x {k} codes do not fit an int64 key")
    neg_inf = float("-inf")
    codes = torch.full((batch_size, 1, n), MASKED, dtype=torch.long, device=device)  # (B, W, n)
    scores = torch.zeros(batch_size, 1, device=device)  # (B, W)
    digit_ids = torch.arange(n, device=device)
    for step in range(n - 1):  # loop over digits filled, never over users or beams
        log_p = log_probs_fn(codes).float()  # (B, W, n, K)
        width_in = codes.shape[1]
        if decode_order == "confidence":
            allowed = codes == MASKED  # (B, W, n): unfilled digits
            open_digits = n - step
        else:
            allowed = (digit_ids == order[step]).expand_as(codes)
            open_digits = 1
        candidates = (scores[..., None, None] + log_p.masked_fill(~allowed.unsqueeze(-1), neg_inf)).flatten(1)
        allowed_count = width_in * open_digits * k  # candidates that fill an unfilled digit
        width = min(beam, allowed_count)
        pool = min(width * (step + 1), allowed_count) if merge_duplicate_beams and step > 0 else width
        top_scores, top_index = candidates.topk(pool, dim=1)  # (B, P), sorted descending
        parent = top_index // (n * k)
        digit = (top_index // k) % n
        code = top_index % k
        new_codes = codes.gather(1, parent.unsqueeze(-1).expand(-1, -1, n)).clone()  # (B, P, n)
        new_codes.scatter_(2, digit.unsqueeze(-1), code.unsqueeze(-1))
        if merge_duplicate_beams and step > 0:
            # Merge duplicate partial states: keep the first (= best-scored) occurrence.
            keep = _first_occurrence(_partial_state_keys(new_codes, k))
            top_scores = top_scores.masked_fill(~keep, neg_inf)
            top_scores, chosen = top_scores.topk(width, dim=1)
            new_codes = new_codes.gather(1, chosen.unsqueeze(-1).expand(-1, -1, n))
        codes, scores = new_codes, top_scores
    # Final step: each beam has exactly one unfilled digit; fill it with its argmax code.
    log_p = log_probs_fn(codes).float()  # (B, W, n, K)
    remaining = codes == MASKED  # (B, W, n), one True per row
    best, index = log_p.masked_fill(~remaining.unsqueeze(-1), neg_inf).flatten(2).max(dim=-1)  # (B, W)
    codes = codes.clone()
    codes.scatter_(2, (index // k).unsqueeze(-1), (index % k).unsqueeze(-1))
    scores = scores + best
    scores, rank = torch.sort(scores, dim=1, descending=True, stable=True)
    codes = codes.gather(1, rank.unsqueeze(-1).expand(-1, -1, n))
    # Empty slots (a -inf score: merged duplicates, or a dead parent) may hold partial states: blank them.
    codes = codes.masked_fill(~torch.isfinite(scores).unsqueeze(-1), MASKED)
    return BeamResult(codes, scores)


def beams_to_items(sids: SemanticIDs, beams: BeamResult, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Finished beams -> the top-``k`` items (item-level ranking).

    Keys are packed (digit 0 most significant); keys of no item are dropped; a repeated key keeps
    its best-scored occurrence; each key expands to all its items in ascending item id.

    Returns:
        items (B, k) LongTensor (0 where fewer), invalid count and candidate count (scalar int64
        tensors: decoded finished beams that map to no item, and all finished beams; empty slots
        are not candidates).
    """
    alive = torch.isfinite(beams.scores)  # (B, W)
    keys = sids.pack(beams.codes)  # (B, W)
    valid = sids.items_for_keys(keys).valid
    invalid = (alive & ~valid).sum()
    items = sids.expand_to_items(keys, alive, k)
    return items, invalid, alive.sum()


# ============================================================================================
# the system
# ============================================================================================


class DiffGRM(SemanticIDModel):
    """DiffGRM (see the module docstring).

    Args:
        num_items, max_len: linked from the data.
        n_digits: SID digits n (PQ sub-spaces).
        codebook_size: codes per digit K (a power of two). When the training split has fewer
            items than K, ``setup`` falls back to the largest power of two <= the number of
            training items, with a warning recorded in ``run_notes`` (the token table keeps K rows
            per digit; only the first K' are used).
        embedding_source: ``text`` (sentence embeddings of the item text, or collaborative ones for
            a dataset without text) or ``collaborative`` (training co-occurrence PPMI-SVD).
        text_encoder: sentence-transformers name or path for ``text``.
        collaborative_dim: width of collaborative embeddings.
        pca_dim, whiten, use_opq, sid_seed: PSE settings (:class:`ParallelPQConfig`); ``pca_dim``
            is clamped to the embedding width and to (training items - 1), rounded down to a
            multiple of ``n_digits``.
        hidden_size: d.
        encoder_layers, decoder_layers, num_heads, inner_size: transformer sizes.
        dropout: embedding, attention and residual dropout.
        position_anchor: encoder position 0 is the ``oldest`` kept item (the reference) or the
            ``newest`` one.
        masking: ``guided`` (OCN), ``sequential`` or ``random``.
        confidence_metric: ``msp`` or ``entropy`` (guided masking).
        guided_select: ``least`` (mask the least confident digits first, the paper) or ``most``.
        random_mask_prob, random_views: Bernoulli rate and views per sample for ``random``
            (default views: n, the decoder cost of the other strategies).
        label_smoothing: epsilon of the per-digit cross-entropy.
        val_beam, test_beam: CPD beam width for validation and direct calls / for test and predict.
        decode_order, fixed_digit_order: ``confidence`` (the paper) or ``fixed`` (ablation).
        merge_duplicate_beams: merge equal partial beams (frees beam slots), off by default.
        beam_chunk_rows: at most this many (user x beam) rows are decoded at once.
        lr, weight_decay: AdamW.
        warmup_steps: linear warm-up length in optimiser steps.
        decay_steps: step at which the cosine reaches 0 (default: the trainer's total steps).
        gradient_clip_val: gradient-norm clip (0 disables); a Trainer setting overrides it.
        ks: see :class:`~recbench.model.SeqRecModel`.
    """

    training_view = "pairs"

    def __init__(
        self,
        num_items: int,
        max_len: int = 50,
        n_digits: int = 4,
        codebook_size: int = 256,
        embedding_source: Literal["text", "collaborative"] = "text",
        text_encoder: str = DEFAULT_ENCODER,
        collaborative_dim: int = 64,
        pca_dim: int = 256,
        whiten: bool = True,
        use_opq: bool = True,
        sid_seed: int = 0,
        hidden_size: int = 256,
        encoder_layers: int = 1,
        decoder_layers: int = 4,
        num_heads: int = 4,
        inner_size: int = 1024,
        dropout: float = 0.1,
        position_anchor: Literal["oldest", "newest"] = "oldest",
        masking: Masking = "guided",
        confidence_metric: Literal["msp", "entropy"] = "msp",
        guided_select: Literal["least", "most"] = "least",
        random_mask_prob: float = 0.5,
        random_views: int | None = None,
        label_smoothing: float = 0.1,
        val_beam: int = 32,
        test_beam: int = 256,
        decode_order: DecodeOrder = "confidence",
        fixed_digit_order: list[int] | None = None,
        merge_duplicate_beams: bool = False,
        beam_chunk_rows: int = 8192,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 10_000,
        decay_steps: int | None = None,
        gradient_clip_val: float = 1.0,
        ks: Sequence[int] = DEFAULT_KS,
    ) -> None:
        super().__init__(
            num_items, max_len, lr, weight_decay, ks, n_digits=n_digits, codebook_size=codebook_size, collision_digit=False
        )
        self.save_hyperparameters()
        if n_digits < 2:
            raise ValueError(f"n_digits must be >= 2, got {n_digits}")
        if codebook_size < 2 or codebook_size & (codebook_size - 1):
            raise ValueError(f"codebook_size must be a power of two >= 2, got {codebook_size}")
        if min(val_beam, test_beam, beam_chunk_rows) < 1:
            raise ValueError("val_beam, test_beam and beam_chunk_rows must be >= 1")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
        if masking not in ("guided", "sequential", "random"):
            raise ValueError(f"masking must be guided, sequential or random, got {masking!r}")
        if decode_order == "fixed" and fixed_digit_order is not None and sorted(fixed_digit_order) != list(range(n_digits)):
            raise ValueError(f"fixed_digit_order must be a permutation of 0..{n_digits - 1}")
        if merge_duplicate_beams and (codebook_size + 1) ** n_digits >= 2**62:
            raise ValueError("merge_duplicate_beams needs (codebook_size + 1) ** n_digits < 2**62")
        if position_anchor not in ("oldest", "newest"):
            raise ValueError(f"position_anchor must be 'oldest' or 'newest', got {position_anchor!r}")
        self.position_anchor = position_anchor
        self.masking, self.confidence_metric, self.guided_select = masking, confidence_metric, guided_select
        self.random_mask_prob = random_mask_prob
        self.random_views = n_digits if random_views is None else random_views
        self.label_smoothing = label_smoothing
        self.val_beam, self.test_beam = val_beam, test_beam
        self.decode_order, self.fixed_digit_order = decode_order, fixed_digit_order
        self.merge_duplicate_beams = merge_duplicate_beams
        self.beam_chunk_rows = beam_chunk_rows
        self.warmup_steps, self.decay_steps = warmup_steps, decay_steps
        self.gradient_clip_val = gradient_clip_val

        # Network.
        self.token_embedding = nn.Embedding(1 + n_digits * codebook_size, hidden_size)  # E, tied
        self.item_mlp = nn.Sequential(
            nn.Linear(n_digits * hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.position_embedding = nn.Embedding(max_len, hidden_size)  # index 0 = oldest kept item
        self.embedding_dropout = nn.Dropout(dropout)
        self.encoder_blocks = nn.ModuleList(
            _Block(hidden_size, num_heads, inner_size, dropout, cross=False) for _ in range(encoder_layers)
        )
        self.decoder = _Decoder(n_digits, hidden_size, num_heads, inner_size, decoder_layers, dropout)
        self.final_norm = nn.LayerNorm(hidden_size, eps=1e-5)  # ln_f, shared by encoder and decoder
        self.apply(self._init_weights)
        nn.init.normal_(self.decoder.mask_embedding, std=0.02)
        self.register_buffer("token_offsets", 1 + torch.arange(n_digits) * codebook_size, persistent=False)

        self._schedule: WarmupSchedule | None = None  # set by configure_optimizers

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ item side
    @property
    def active_codebook_size(self) -> int:
        """K' = codes per digit actually used (K, or the small-data fallback); a host value."""
        self.require_semantic_ids()
        return self.active_codebook_sizes[0]

    def check_semantic_ids(self, sids: SemanticIDs) -> None:
        if len(set(sids.codebook_sizes)) != 1 or sids.collision_digit:
            raise ValueError(
                f"DiffGRM needs one codebook size for every digit and no collision digit, got "
                f"{sids.codebook_sizes} (collision_digit={sids.collision_digit})"
            )

    def build_semantic_ids(self, data: SeqRecDataModule) -> tuple[SemanticIDs, dict[str, Any]]:
        """Embeddings -> PSE codes fitted on training items (cached on disk), with their provenance."""
        hp = self.hparams
        if data.num_items != self.num_items:
            raise ValueError(f"the data has {data.num_items} items, the model {self.num_items}")
        embeddings = item_embeddings_for(
            data,
            source=hp.embedding_source,
            encoder=hp.text_encoder,
            collaborative_dim=hp.collaborative_dim,
            show_progress=False,
        )
        n_train = int(data.train_item_mask().sum())
        k, fallback = codebook_size_for(self.codebook_size, n_train, "DiffGRM")
        notes: dict[str, Any] = {"embedding_source": embeddings.source, "codebook_fallback": fallback or None}
        pca = min(self.hparams.pca_dim, embeddings.dim, n_train - 1)
        pca -= pca % self.n_digits  # PQ splits the PCA output into n equal sub-spaces
        if pca != self.hparams.pca_dim:
            log.warning("DiffGRM: PCA dimension %d clamped to %d", self.hparams.pca_dim, pca)
        notes["pca_dim"] = pca
        config = ParallelPQConfig(
            n_digits=self.n_digits,
            codebook_size=k,
            pca_dim=pca,
            whiten=hp.whiten,
            use_opq=hp.use_opq,
            collision_digit=False,
            seed=hp.sid_seed,
        )
        return semantic_ids_for(data, config, embeddings), notes

    # ------------------------------------------------------------------ network
    def _tokens(self, codes: Tensor) -> Tensor:
        """(..., n) codes (negative = PAD / masked) -> (..., n) rows of E (0 where negative)."""
        return torch.where(codes >= 0, codes + self.token_offsets, torch.zeros_like(codes))

    def encode(self, history: Tensor) -> _Memory:
        """Left-padded history (B, L) -> cross-attention memory: per decoder layer (k, v) of shape
        (B, H, L', d/H) for the trimmed length L', and the key-padding mask (B, 1, 1, L')."""
        history = trim_left_padding(history)
        if history.shape[1] > self.max_len:
            raise ValueError(f"history length {history.shape[1]} exceeds max_len {self.max_len}")
        valid = history != PAD_ID  # (B, L)
        # Packed: only the M real history items are embedded and transformed (most histories are far
        # shorter than the longest one in the batch); padded slots exist only inside attention.
        tokens = self._tokens(self.sid_codes[history[valid]])  # (M, n)
        x = self.item_mlp(self.token_embedding(tokens).flatten(1))  # (M, d): one token per item
        if self.position_anchor == "oldest":  # 0 = oldest kept item (the reference's right padding)
            position = valid.long().cumsum(1) - 1
        else:  # 0 = newest item
            position = valid.long().flip(1).cumsum(1).flip(1) - 1
        x = self.embedding_dropout(x + self.position_embedding(position[valid]))
        # A row without any item (not produced by the pipeline) may attend to its last slot (zero
        # key and value), so the softmax stays defined.
        attend = valid.clone()
        attend[:, -1] |= ~valid.any(dim=1)
        mask = attend[:, None, None, :]  # (B, 1, 1, L)
        for block in self.encoder_blocks:
            x = block.encode(x, valid, mask)
        h = self.final_norm(x)  # (M, d)
        kv = tuple(block.cross_attention.memory_kv(h, valid) for block in self.decoder.blocks)  # type: ignore[union-attr]
        return _Memory(kv, mask)

    def decoder_logits(self, memory: _Memory, codes: Tensor) -> Tensor:
        """Decoder over R rows per user: memory of B users, codes (B, R, n) with ``MASKED`` where
        masked -> logits (B, R, n, K') over each digit's active codes."""
        masked = (codes == MASKED).unsqueeze(-1)  # (B, R, n, 1)
        x = self.token_embedding(self._tokens(codes))  # (B, R, n, d)
        x = torch.where(masked, self.decoder.mask_embedding.to(x.dtype), x)
        x = self.decoder.input_dropout(x)
        for block, (k, v) in zip(self.decoder.blocks, memory.kv, strict=True):
            x = block.decode(x, k, v, memory.mask)
        h = self.final_norm(x)
        k_active = self.active_codebook_size
        table = self.token_embedding.weight[1:].view(self.n_digits, self.codebook_size, -1)[:, :k_active]
        return torch.einsum("brnd,nkd->brnk", h, table.to(h.dtype))  # tied digit slices

    # ------------------------------------------------------------------ training
    def training_masks(self, memory: _Memory, batch_size: int) -> Tensor:
        """The views' masks (B, V, n), True = masked, for the configured strategy."""
        n, device = self.n_digits, self.sid_codes.device
        if self.masking == "random":
            return random_mask_views(batch_size, n, self.random_views, self.random_mask_prob, device=device)
        if self.masking == "sequential":
            return nested_mask_views(random_order(batch_size, n, device=device))
        # guided (OCN): score the fully masked target with the decoder in eval mode, no gradient.
        was_training = self.decoder.training
        self.decoder.train(False)
        try:
            with torch.no_grad():
                all_masked = torch.full((batch_size, 1, n), MASKED, dtype=torch.long, device=device)
                logits = self.decoder_logits(memory.detach(), all_masked)[:, 0]  # (B, n, K')
        finally:
            self.decoder.train(was_training)
        confidence = position_confidence(logits, self.confidence_metric)  # (B, n)
        return nested_mask_views(confidence_order(confidence, self.guided_select))

    def loss(self, batch: Batch) -> Tensor:
        if not self.has_semantic_ids:
            raise RuntimeError("DiffGRM has no semantic IDs: fit it with a datamodule or call set_semantic_ids")
        memory = self.encode(batch[HISTORY])
        target = self.sid_codes[batch[TARGET]]  # (B, n)
        mask = self.training_masks(memory, target.shape[0])  # (B, V, n)
        logits = self.decoder_logits(memory, apply_mask(target, mask))  # (B, V, n, K'), one encoder pass
        return masked_cross_entropy(logits, target.unsqueeze(1).expand_as(mask), mask, self.label_smoothing)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.adamw()
        allowed = float(self.decay_steps) if self.decay_steps is not None else float(self.trainer.estimated_stepping_batches)
        self._schedule = sized_schedule("cosine", self.warmup_steps, allowed)  # recorded in run_notes
        return {"optimizer": optimizer, "lr_scheduler": scheduler_config(optimizer, self._schedule)}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # The Trainer's value (when set) wins; otherwise the model's own (reference: norm 1.0).
        value = gradient_clip_val if gradient_clip_val is not None else self.gradient_clip_val
        if value and value > 0:
            self.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm=gradient_clip_algorithm)

    # ------------------------------------------------------------------ decoding
    def current_beam(self) -> int:
        """``test_beam`` while a Trainer tests or predicts, else ``val_beam`` (validation, sanity
        check, and direct calls: the expensive width is spent only on the final evaluation; pass
        ``beam=`` to ``recommend`` to choose)."""
        trainer = self._trainer
        if trainer is not None and (trainer.testing or trainer.predicting):
            return self.test_beam
        return self.val_beam

    def _log_probs(self, memory: _Memory, codes: Tensor) -> Tensor:
        return torch.log_softmax(self.decoder_logits(memory, codes).float(), dim=-1)

    @torch.no_grad()
    def beam_search(self, history: Tensor, beam: int) -> BeamResult:
        """CPD beam for a batch of histories (B, L), all users x beams at once."""
        memory = self.encode(history)
        return cpd_beam_search(
            partial(self._log_probs, memory),
            history.shape[0],
            self.n_digits,
            self.active_codebook_size,
            beam,
            decode_order=self.decode_order,
            fixed_order=self.fixed_digit_order,
            merge_duplicate_beams=self.merge_duplicate_beams,
            device=history.device,
        )

    @torch.inference_mode()
    def recommend(self, history: Tensor, k: int, beam: int | None = None) -> Tensor:
        """Top-``k`` distinct items (B, k) by the CPD beam (width ``beam``, default by stage).

        Runs under ``inference_mode`` (not only ``no_grad``): Lightning resets ``decode_stats``
        inside inference mode during validate/test, which turns its states into inference tensors
        that only an inference-mode call may update in place (e.g. a direct call after a test).
        """
        beam = self.current_beam() if beam is None else beam
        sids = self.semantic_ids
        users_per_chunk = max(1, self.beam_chunk_rows // beam)
        ranked = []
        for chunk in history.split(users_per_chunk):  # blocks of users bound memory; each is batched
            items, invalid, candidates = beams_to_items(sids, self.beam_search(chunk, beam), k)
            self.decode_stats.update(invalid, candidates)
            ranked.append(items)
        return torch.cat(ranked) if ranked else history.new_zeros(0, k)

    # ------------------------------------------------------------------ reporting
    def item_id_stats(self) -> dict[str, float]:
        if not self.has_semantic_ids:
            return {}
        stats = self.semantic_ids.stats()
        return {
            "collision_rate": stats.collision_rate,
            "n_unique_ids": float(stats.n_unique_ids),
            "max_collision_group": float(stats.max_collision_group),
        }

    def run_notes(self) -> dict[str, object]:
        notes: dict[str, object] = {
            "embedding_source": self.item_side_info.get("embedding_source"),
            "sid_scheme": self.item_side_info.get("scheme"),
            "codebook_size": self.active_codebook_sizes[0] or None,
            "codebook_fallback": self.item_side_info.get("codebook_fallback"),
            "pca_dim": self.item_side_info.get("pca_dim"),
            "position_anchor": self.position_anchor,
            "masking": self.masking,
            "confidence_metric": self.confidence_metric if self.masking == "guided" else None,
            "guided_select": self.guided_select if self.masking == "guided" else None,
            "label_smoothing": self.label_smoothing,
            "val_beam": self.val_beam,
            "test_beam": self.test_beam,
            "decode_order": self.decode_order,
            "fixed_digit_order": self.fixed_digit_order if self.decode_order == "fixed" else None,
            "merge_duplicate_beams": self.merge_duplicate_beams,
            "decoding": "unconstrained CPD beam, illegal IDs dropped, collisions expanded (ascending item id)",
            "metrics_level": "item",
            "cross_attention_padding_mask": True,
            "warmup_steps": self._schedule.warmup_steps if self._schedule else self.warmup_steps,
            "decay_steps": self._schedule.total_steps if self._schedule else self.decay_steps,
            "gradient_clip_val": self.gradient_clip_val,
        }
        return notes
