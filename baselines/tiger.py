"""TIGER-style generative retrieval (Rajput et al., NeurIPS 2023, arXiv
2305.05065), after the paper and the re-implementations GRID (snap-research/GRID) and AR_GRM
(liuzhao09/DiffGRM).

Two stages, with ``n`` digits per semantic ID (SID), ``K`` codes per digit and ``d`` the width:

1. **Item side** (one sentence encoder for every semantic-ID model). Item text -> sentence embeddings
   (:func:`recbench.item_side.item_embeddings_for`; collaborative co-occurrence embeddings where a
   dataset has no text, or when ``embedding_source="collaborative"``) -> residual k-means with
   ``levels`` x ``codebook_size`` codes plus a collision digit (default 3 x 256 + 1, so ``n = 4``
   and every ID is exactly one item), fitted on training items only
   (:func:`recbench.item_side.semantic_ids_for`, cached on disk). The codes are a persistent buffer
   ``sid_codes`` ``(N + 1, n)``, so a checkpoint decodes without the data or the cache; the lookup
   tables (:class:`~recbench.semantic_ids.SemanticIDs`) are rebuilt lazily from it.
2. **Sequence model**: a pre-LN transformer encoder-decoder
   (:class:`~recbench.nn.TransformerBlock`, ReLU FFN).

   * Vocabulary: one token per (digit, code), ``1 + t * K + c`` (per-digit offsets into one shared
     table), token 0 = PAD. The vocabulary is sized by the *configured* ``codebook_size``, so the
     parameter shapes never depend on the data (see *Small data* below).
   * Encoder input (``encoder_input``): ``"flat"`` (default, TIGER) = the SID tokens of the last
     ``history_items`` items, flattened (``history_items * n`` tokens), each token embedded as
     token + learned position (over token positions, counted from the newest so that the newest
     item always has the same positions) + learned digit type; ``"item"`` (AR_GRM/DiffGRM style)
     = one token per item, the concatenation of its ``n`` digit embeddings through
     ``Linear(n d, d) -> ReLU -> Linear(d, d)``, plus a learned item position. In both, a learned
     *context token* is prepended; it stands where TIGER puts its hashed user token (the
     ``recommend(history, k)`` contract carries no user id, so we use none) and keeps attention
     defined for an empty history. Padding is masked as keys; the encoder is bidirectional.
   * Decoder: ``[BOS, e(c_0), ..., e(c_{n-2})]`` + learned decoder positions, causal
     self-attention, cross-attention to the encoder output; position ``t`` predicts digit ``t``.
     Output (``output_head``): ``"tied"`` = dot product with digit ``t``'s slice of the shared
     token table (AR_GRM), or ``"separate"`` = one ``(K, d)`` head per digit (GRID); both with a
     per-digit bias.
   * Loss: cross-entropy averaged over the ``n`` digits, optional ``label_smoothing``.

3. **Decoding**: :func:`beam_search`, batched over users x beams, a
   loop over the ``n`` digits only. At every digit the log-probabilities (log-softmax over all
   ``K`` codes, *not* renormalised over the allowed ones, so a beam's score is the model's joint
   log-probability of the ID) of codes that extend the prefix to no real item are set to
   ``-inf`` (``constrained=True``, :meth:`~recbench.semantic_ids.PrefixTable.lookup`), then the
   best ``beam_size`` children of all beams are kept. Finished beams map to items
   (:meth:`~recbench.semantic_ids.SemanticIDs.expand_to_items`: invalid IDs dropped, duplicates
   dropped, collisions expanded). ``constrained=False`` decodes freely and drops invalid IDs
   afterwards, as GRID's default and AR_GRM do; either way the invalid decoded IDs are counted in
   ``decode_stats`` (``val/ test/invalid_id_rate``; 0 by construction when constrained).
   The decoder runs one token per step with a KV cache (:class:`_DecodeState`): self-attention
   keys/values of past steps are kept and re-ordered by parent beam; the cross-attention keys and
   values are computed once per user and never copied per beam, because the ``w`` beams of a user
   are fed to attention as ``w`` queries of the same user (``(B, H, w, Dh)`` against
   ``(B, H, S, Dh)``).

   With ``beam_size`` at least the number of valid IDs the search is exact (every valid prefix
   survives every step); smaller beams are the usual approximation. ``recommend(history, k)`` returns at
   most ``beam_size`` items (the rest is padded with 0), so keep ``beam_size >= max(ks) = 20``
   (and ``>= 20 + L`` for exact history-excluded test metrics; narrower beams make those
   approximate, and the share of short excluded lists is reported).

Speed (exact): the encoder runs its projections and FFN on the real tokens only (padding is most
of a left-padded batch; :meth:`~recbench.nn.TransformerBlock.forward_packed`), the loss is one (B x n x K) cross-entropy,
and decoding touches the encoder once per user and the decoder once per digit with a KV cache.

Small data. Residual k-means needs at least ``codebook_size`` training items. When the training
split has fewer (e.g. the 240-item test slice of the synthetic data), ``setup`` falls back to the
largest power of two not above the number of training items, logs a WARNING and records it in
``run_notes()`` (``codebook_fallback``). Codes then use the first ``K_eff`` entries of each digit's
vocabulary slice; the rest is never a target and, when constrained, never decoded.

Optimisation (``configure_optimizers``): AdamW (default) or Adafactor, with ``lr_schedule``
``"constant"`` (optional linear warm-up), ``"inverse_sqrt"`` (T5/TIGER: the base rate for the first
``warmup_steps`` steps, then ``lr * sqrt(warmup_steps / step)``) or ``"cosine"`` (linear warm-up,
then cosine to 0 over the run, AR_GRM), all from the shared :func:`recbench.schedules.sized_schedule`,
sized from the optimiser steps the profile allows (warm-up at most half of them). Note that torch's Adafactor already scales its step by
``min(lr, 1 / sqrt(t))``: with ``lr=0.01`` and a constant schedule it *is* T5's "0.01 for 10k steps,
then inverse square root" (the TIGER paper's schedule), so do not stack ``inverse_sqrt`` on it.

Deviations from TIGER, all deliberate: no user tokens (above); residual k-means instead of the
RQ-VAE (cheaper, and still one unique ID per item); the same sentence encoder as every other SID
model (all-MiniLM-L6-v2 offline by default; ``text_encoder``) rather than Sentence-T5; pre-LN with
learned absolute positions rather than T5's relative position buckets.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from recbench.batch import HISTORY, TARGET, Batch, trim_left_padding
from recbench.data import SeqRecDataModule
from recbench.item_side import codebook_size_for, item_embeddings_for, semantic_ids_for
from recbench.metrics import DEFAULT_KS
from recbench.nn import TransformerBlock
from recbench.schedules import ScheduleKind, scheduler_config, sized_schedule
from recbench.semantic_id_model import SemanticIDModel
from recbench.semantic_ids import INVALID_KEY, ResidualKMeansConfig, SemanticIDs
from recbench.text import DEFAULT_ENCODER

log = logging.getLogger(__name__)

EncoderInput = Literal["flat", "item"]
OutputHead = Literal["tied", "separate"]
EmbeddingSource = Literal["text", "collaborative"]
OptimizerName = Literal["adamw", "adafactor"]


# --------------------------------------------------------------------------------------------
# beam search (model-agnostic: any digit-by-digit scorer)
# --------------------------------------------------------------------------------------------


class DigitStep(Protocol):
    """One decoding step of a digit-by-digit SID model.

    Called with ``step`` = t, ``prefix`` (B, w, t) the codes of the current beams, and ``parents``
    (B, w) the index of each beam's parent among the previous step's beams (``None`` at t = 0, where
    every user has one empty beam). A stateful scorer (KV cache) re-orders its state by
    ``parents``. Returns the logits (B, w, V) of digit t given each prefix.
    """

    def __call__(self, step: int, prefix: Tensor, parents: Tensor | None) -> Tensor: ...


class BeamResult(NamedTuple):
    """Finished beams of :func:`beam_search`, best first per user.

    codes: (B, W, n) codes of each beam.
    scores: (B, W) joint log-probability; ``-inf`` for dead beams (fewer allowed IDs than W).
    keys: (B, W) packed SID keys; ``INVALID_KEY`` for dead beams and out-of-range codes.
    alive: (B, W) finite score: a decoded candidate.
    valid: (B, W) alive and the ID of a real item.
    """

    codes: Tensor
    scores: Tensor
    keys: Tensor
    alive: Tensor
    valid: Tensor


@torch.no_grad()
def beam_search(
    step_fn: DigitStep,
    batch_size: int,
    sids: SemanticIDs,
    beam_size: int,
    constrained: bool = True,
    device: torch.device | str | None = None,
) -> BeamResult:
    """Beam search over the ``sids.n_digits`` digits, batched over users x beams.

    At digit t every live beam's log-softmax over the V codes is added to its score; with
    ``constrained`` the codes that extend the prefix to no real item get ``-inf``
    (``sids.prefix_table(t)``; codes at or above the digit's codebook size, possible when the
    model's vocabulary is larger, are never allowed). The best ``beam_size`` of the ``w x V``
    children are kept (``torch.topk``, ties in unspecified order). The only Python loop is over
    the digits.

    Returns:
        :class:`BeamResult` with W = min(beam_size, number of children at the last step).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    device = sids.device if device is None else torch.device(device)
    prefix = torch.zeros(batch_size, 1, 0, dtype=torch.long, device=device)  # (B, 1, 0)
    scores = torch.zeros(batch_size, 1, device=device)  # (B, 1)
    parents: Tensor | None = None
    for step in range(sids.n_digits):  # n <= 8 digits; users and beams are batched
        logits = step_fn(step, prefix, parents)  # (B, w, V)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        vocab = log_probs.shape[-1]
        if constrained:
            allowed = sids.prefix_table(step).lookup(sids.pack(prefix))  # (B, w, K_t)
            width = allowed.shape[-1]
            if width > vocab:
                raise ValueError(f"digit {step} has {width} codes but the scorer returns {vocab} logits")
            if width < vocab:
                allowed = F.pad(allowed, (0, vocab - width), value=False)  # (B, w, V)
            log_probs = log_probs.masked_fill(~allowed, float("-inf"))
        total = (scores.unsqueeze(-1) + log_probs).flatten(1)  # (B, w * V)
        scores, flat = total.topk(min(beam_size, total.shape[1]), dim=1)  # (B, W) best first
        parents = torch.div(flat, vocab, rounding_mode="floor")  # (B, W)
        codes = flat - parents * vocab  # (B, W)
        inherited = prefix.gather(1, parents.unsqueeze(-1).expand(-1, -1, step))  # (B, W, t)
        prefix = torch.cat([inherited, codes.unsqueeze(-1)], dim=-1)  # (B, W, t + 1)
    alive = torch.isfinite(scores)  # (B, W)
    keys = torch.where(alive, sids.pack(prefix), torch.full_like(scores, INVALID_KEY, dtype=torch.long))
    valid = sids.items_for_keys(keys).valid & alive
    return BeamResult(prefix, scores, keys, alive, valid)


# --------------------------------------------------------------------------------------------
# network
# --------------------------------------------------------------------------------------------


@dataclass
class _DecodeState:
    """KV cache of one beam search.

    memory_kv: per decoder layer, cross-attention (keys, values), each (B, H, S, Dh); computed
        once per user and shared by all of the user's beams.
    memory_mask: (B, 1, 1, S) True = real encoder position.
    cache: per decoder layer, self-attention (keys, values) of the past steps, (B * w, H, t, Dh),
        rows user-major (beam j of user b is row ``b * w + j``).
    beams: w, beams per user in ``cache``.
    """

    memory_kv: list[tuple[Tensor, Tensor]]
    memory_mask: Tensor
    cache: list[tuple[Tensor, Tensor]]
    beams: int


class _TigerNetwork(nn.Module):
    """Encoder-decoder over SID tokens; works in code space ((..., n) codes, ``PAD_CODE`` = none)."""

    def __init__(
        self,
        n_digits: int,
        codebook_size: int,
        history_items: int,
        encoder_input: EncoderInput,
        hidden_size: int,
        encoder_layers: int,
        decoder_layers: int,
        num_heads: int,
        head_dim: int | None,
        ffn_size: int,
        dropout: float,
        output_head: OutputHead,
    ) -> None:
        super().__init__()
        n, K, d = n_digits, codebook_size, hidden_size
        self.n_digits, self.codebook_size, self.hidden_size = n, K, d
        self.history_items, self.encoder_input, self.output_head = history_items, encoder_input, output_head
        self.token_embedding = nn.Embedding(1 + n * K, d, padding_idx=0)  # 0 = PAD, 1 + t*K + c
        encoder_positions = history_items * n if encoder_input == "flat" else history_items
        self.encoder_position = nn.Embedding(encoder_positions, d)
        self.digit_type = nn.Embedding(n, d)  # flat input only
        self.item_mlp = (
            nn.Sequential(nn.Linear(n * d, d), nn.ReLU(), nn.Linear(d, d))
            if encoder_input == "item"
            else None
        )
        self.context_token = nn.Parameter(torch.empty(d))
        self.bos = nn.Parameter(torch.empty(d))
        self.decoder_position = nn.Embedding(n, d)
        self.dropout = nn.Dropout(dropout)
        block = dict(
            num_heads=num_heads, ffn_dim=ffn_size, dropout=dropout, activation="relu", head_dim=head_dim
        )
        self.encoder = nn.ModuleList(TransformerBlock(d, **block) for _ in range(encoder_layers))
        self.decoder = nn.ModuleList(
            TransformerBlock(d, cross_attention=True, **block) for _ in range(decoder_layers)
        )
        self.encoder_norm = nn.LayerNorm(d)
        self.decoder_norm = nn.LayerNorm(d)
        self.head = nn.Parameter(torch.empty(n, K, d)) if output_head == "separate" else None
        self.output_bias = nn.Parameter(torch.zeros(n, K))
        for embedding in (
            self.token_embedding,
            self.encoder_position,
            self.digit_type,
            self.decoder_position,
        ):
            nn.init.normal_(embedding.weight, std=0.02)
        for parameter in (self.context_token, self.bos):
            nn.init.normal_(parameter, std=0.02)
        if self.head is not None:
            nn.init.normal_(self.head, std=0.02)
        with torch.no_grad():
            self.token_embedding.weight[0].zero_()

    # ---- tokens --------------------------------------------------------------------------
    def tokens(self, codes: Tensor) -> Tensor:
        """(..., n) codes -> (..., n) token ids; ``PAD_CODE`` -> 0."""
        digit = torch.arange(self.n_digits, device=codes.device)
        return torch.where(codes >= 0, 1 + digit * self.codebook_size + codes, torch.zeros_like(codes))

    def digit_weights(self, step: int | None = None) -> Tensor:
        """Output weights (n, K, d), or (K, d) of digit ``step``."""
        if self.head is not None:
            weights = self.head
        else:  # tied: digit t's slice of the shared token table
            weights = self.token_embedding.weight[1:].view(self.n_digits, self.codebook_size, -1)
        return weights if step is None else weights[step]

    # ---- encoder -------------------------------------------------------------------------
    def encode(self, history_codes: Tensor, packed: bool = True) -> tuple[Tensor, Tensor]:
        """(B, L, n) codes of the left-padded history -> memory (B, 1 + S, d) and its mask (B, 1 + S).

        Uses the last ``history_items`` items. Positions count from the newest slot, so leading
        columns that are padding in every row can be dropped beforehand without changing anything.
        ``packed`` (exact, default) runs the position-wise layers on real tokens only
        (:meth:`recbench.nn.TransformerBlock.forward_packed`); padded positions of the memory are zero (and masked).
        """
        codes = history_codes[:, -self.history_items :]  # (B, L', n)
        batch, length, n = codes.shape
        tokens = self.tokens(codes)  # (B, L', n)
        if self.encoder_input == "flat":
            tokens = tokens.reshape(batch, length * n)  # (B, S), S = L' * n, item-major
            size = self.encoder_position.num_embeddings
            positions = torch.arange(size - length * n, size, device=codes.device)  # (S,) newest last
            digits = torch.arange(length * n, device=codes.device) % n  # (S,)
            x = (
                self.token_embedding(tokens) + self.encoder_position(positions) + self.digit_type(digits)
            )  # (B, S, d)
            valid = tokens != 0  # (B, S)
        else:
            assert self.item_mlp is not None
            x = self.item_mlp(self.token_embedding(tokens).reshape(batch, length, -1))  # (B, L', d)
            size = self.encoder_position.num_embeddings
            x = x + self.encoder_position(torch.arange(size - length, size, device=codes.device))
            valid = (codes >= 0).all(-1)  # (B, L')
        context = self.context_token.to(x.dtype).expand(batch, 1, -1)  # (B, 1, d)
        x = self.dropout(torch.cat([context, x], dim=1))  # (B, 1 + S, d)
        valid = torch.cat([valid.new_ones(batch, 1), valid], dim=1)  # (B, 1 + S)
        mask = valid[:, None, None, :]  # (B, 1, 1, 1 + S): keys only; bidirectional
        if not packed:
            for block in self.encoder:
                x = block(x, mask)
            return self.encoder_norm(x), valid
        index = valid.flatten().nonzero().squeeze(1)  # (M,) real positions of the (B * (1 + S)) grid
        h = x.flatten(0, 1)[index]  # (M, d)
        for block in self.encoder:
            h = block.forward_packed(h, index, mask)
        h = self.encoder_norm(h)
        return h.new_zeros(valid.numel(), h.shape[-1]).index_copy(0, index, h).view(*valid.shape, -1), valid

    # ---- decoder, teacher forcing ----------------------------------------------------------
    def decoder_inputs(self, codes: Tensor) -> Tensor:
        """(R, n) target codes -> (R, n, d): [BOS, e(c_0), ..., e(c_{n-2})] + positions."""
        rows = codes.shape[0]
        shifted = self.token_embedding(self.tokens(codes)[:, :-1])  # (R, n - 1, d)
        bos = self.bos.to(shifted.dtype).expand(rows, 1, -1)  # (R, 1, d)
        positions = self.decoder_position(torch.arange(self.n_digits, device=codes.device))  # (n, d)
        return torch.cat([bos, shifted], dim=1) + positions  # (R, n, d)

    def forward(self, memory: Tensor, memory_valid: Tensor, codes: Tensor) -> Tensor:
        """Teacher-forced logits (R, n, K) of the target codes (R, n) given memory (R, S, d)."""
        x = self.dropout(self.decoder_inputs(codes))  # (R, n, d)
        causal = torch.ones(self.n_digits, self.n_digits, dtype=torch.bool, device=codes.device).tril()
        memory_mask = memory_valid[:, None, None, :]  # (R, 1, 1, S)
        for block in self.decoder:
            x = block(x, causal, memory, memory_mask)
        h = self.decoder_norm(x)  # (R, n, d)
        return torch.einsum("rnd,nkd->rnk", h, self.digit_weights()) + self.output_bias  # (R, n, K)

    # ---- decoder, incremental (beam search) -----------------------------------------------
    def start_decoding(self, memory: Tensor, memory_valid: Tensor) -> _DecodeState:
        """Cross-attention keys/values of every decoder layer, once per user."""
        memory_kv = []
        for block in self.decoder:
            cross = block.cross_attention
            assert cross is not None
            memory_kv.append(cross.memory_key_values(memory))  # (B, H, S, Dh) each
        empty = [(k[:, :, :0], v[:, :, :0]) for k, v in memory_kv]  # (B, H, 0, Dh): no past yet
        return _DecodeState(memory_kv, memory_valid[:, None, None, :], empty, beams=1)

    def decode_step(self, state: _DecodeState, step: int, prefix: Tensor, parents: Tensor | None) -> Tensor:
        """:class:`DigitStep` for :func:`beam_search`: logits (B, w, K) of digit ``step``."""
        users, beams = prefix.shape[:2]
        if parents is not None:  # re-order the cache: row of each new beam's parent
            rows = (parents + state.beams * torch.arange(users, device=parents.device).unsqueeze(1)).flatten()
            state.cache = [(k[rows], v[rows]) for k, v in state.cache]  # (B * w, H, t, Dh)
        state.beams = beams
        if step == 0:
            x = self.bos.expand(users * beams, 1, -1)  # (B * w, 1, d)
        else:
            digit = step - 1
            token = 1 + digit * self.codebook_size + prefix[..., -1]  # (B, w)
            x = self.token_embedding(token).view(users * beams, 1, -1)
        x = x + self.decoder_position.weight[step]
        new_cache = []
        for block, past, memory_kv in zip(self.decoder, state.cache, state.memory_kv, strict=True):
            x, kv = block.decode_step(x, past, memory_kv, state.memory_mask, beams)
            new_cache.append(kv)
        state.cache = new_cache
        h = self.decoder_norm(x).view(users, beams, -1)  # (B, w, d)
        return h @ self.digit_weights(step).T + self.output_bias[step]  # (B, w, K)


# --------------------------------------------------------------------------------------------
# the system
# --------------------------------------------------------------------------------------------


class TIGER(SemanticIDModel):
    """TIGER-style autoregressive semantic-ID recommender (see the module docstring).

    Args:
        num_items: N (linked from the data).
        max_len: history length the data provides (linked from the data).
        history_items: the encoder reads the last this many items (TIGER: 20).
        encoder_input: ``"flat"`` (n tokens per item) or ``"item"`` (one MLP token per item).
        hidden_size: d.
        encoder_layers, decoder_layers: transformer blocks of each side.
        num_heads: attention heads.
        head_dim: width per head; ``None`` = ``hidden_size // num_heads`` (TIGER: 6 x 64 at d 128).
        ffn_size: FFN inner width (ReLU).
        dropout: embedding, attention, residual and FFN dropout.
        output_head: ``"tied"`` (shared token table) or ``"separate"`` (per-digit heads).
        label_smoothing: of the per-digit cross-entropy.
        beam_size: beams kept per digit; ``recommend`` returns at most this many items.
        constrained: mask codes that lead to no real item at every digit (else drop invalid IDs
            afterwards and count them).
        embedding_source: ``"text"`` (sentence embeddings; collaborative if the data has no text)
            or ``"collaborative"`` (co-occurrence factorisation; fast, for tests).
        text_encoder: sentence-transformers model name or path for ``"text"``.
        collaborative_dim: width of collaborative embeddings.
        levels: residual k-means levels (digits before the collision digit).
        codebook_size: codes per digit (vocabulary); falls back to a smaller power of two when the
            training split has fewer items (module docstring).
        collision_digit: append the digit that makes every ID unique (n = levels + 1).
        sid_seed: k-means seed.
        kmeans_iters: Lloyd iterations per level.
        optimizer: ``"adamw"`` or ``"adafactor"`` (torch's, with its relative step size).
        lr: base learning rate.
        weight_decay: decoupled weight decay.
        lr_schedule: ``"constant"``, ``"inverse_sqrt"`` or ``"cosine"`` (per optimiser step).
        warmup_steps: linear warm-up (constant, cosine) or constant phase (inverse_sqrt) in steps.
        ks: see :class:`~recbench.model.SeqRecModel`.
    """

    training_view = "pairs"

    def __init__(
        self,
        num_items: int,
        max_len: int = 50,
        history_items: int = 20,
        encoder_input: EncoderInput = "flat",
        hidden_size: int = 128,
        encoder_layers: int = 2,
        decoder_layers: int = 2,
        num_heads: int = 4,
        head_dim: int | None = None,
        ffn_size: int = 512,
        dropout: float = 0.1,
        output_head: OutputHead = "tied",
        label_smoothing: float = 0.0,
        beam_size: int = 20,
        constrained: bool = True,
        embedding_source: EmbeddingSource = "text",
        text_encoder: str = DEFAULT_ENCODER,
        collaborative_dim: int = 64,
        levels: int = 3,
        codebook_size: int = 256,
        collision_digit: bool = True,
        sid_seed: int = 0,
        kmeans_iters: int = 20,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: ScheduleKind = "constant",
        warmup_steps: int = 0,
        ks: Sequence[int] = DEFAULT_KS,
    ) -> None:
        super().__init__(
            num_items,
            max_len,
            lr,
            weight_decay,
            ks,
            n_digits=levels + int(collision_digit),
            codebook_size=codebook_size,
            collision_digit=collision_digit,
        )
        self.save_hyperparameters()
        if history_items < 1 or beam_size < 1 or levels < 1 or codebook_size < 2 or warmup_steps < 0:
            raise ValueError(
                "need history_items >= 1, beam_size >= 1, levels >= 1, codebook_size >= 2, warmup_steps >= 0; got "
                f"{history_items}, {beam_size}, {levels}, {codebook_size}, {warmup_steps}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.history_items = min(history_items, max_len)  # the data never supplies more
        self.beam_size = beam_size
        self.constrained = constrained
        self.label_smoothing = label_smoothing
        self.embedding_source = embedding_source
        self.text_encoder = text_encoder
        self.collaborative_dim = collaborative_dim
        self.levels = levels
        self.sid_seed, self.kmeans_iters = sid_seed, kmeans_iters
        self.optimizer_name, self.lr_schedule, self.warmup_steps = optimizer, lr_schedule, warmup_steps
        self.network = _TigerNetwork(
            self.n_digits,
            codebook_size,
            self.history_items,
            encoder_input,
            hidden_size,
            encoder_layers,
            decoder_layers,
            num_heads,
            head_dim,
            ffn_size,
            dropout,
            output_head,
        )

    # ------------------------------------------------------------------ item side
    def build_semantic_ids(self, datamodule: SeqRecDataModule) -> tuple[SemanticIDs, dict[str, str]]:
        """Residual k-means IDs of ``datamodule``'s items (cached on disk) and their provenance; the
        lifecycle around it (setup, buffers, checkpoint) is :class:`~recbench.semantic_id_model.SemanticIDModel`'s."""
        embeddings = item_embeddings_for(
            datamodule,
            source=self.embedding_source,
            encoder=self.text_encoder,
            collaborative_dim=self.collaborative_dim,
            show_progress=False,
        )
        n_train = int(datamodule.train_item_mask().sum())
        size, fallback = codebook_size_for(self.codebook_size, n_train, "TIGER")
        info = {"embedding_source": embeddings.source, "codebook_fallback": fallback}
        config = ResidualKMeansConfig(
            levels=self.levels,
            codebook_size=size,
            collision_digit=self.collision_digit,
            seed=self.sid_seed,
            niter=self.kmeans_iters,
        )
        return semantic_ids_for(datamodule, config, embeddings), info

    # ------------------------------------------------------------------ training
    def _history_codes(self, history: Tensor) -> Tensor:
        """(B, L) items -> (B, L', n) codes of the last ``history_items`` (all-padding columns dropped)."""
        return self.sid_codes[trim_left_padding(history[:, -self.history_items :])]

    def loss(self, batch: Batch) -> Tensor:
        """Mean cross-entropy over the n digits of the target's ID, teacher-forced."""
        self.require_semantic_ids()
        target_codes = self.sid_codes[batch[TARGET]]  # (B, n)
        memory, valid = self.network.encode(self._history_codes(batch[HISTORY]))  # (B, S, d), (B, S)
        logits = self.network(memory, valid, target_codes)  # (B, n, K)
        return F.cross_entropy(
            logits.float().flatten(0, 1), target_codes.flatten(), label_smoothing=self.label_smoothing
        )

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, object]:
        parameters = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "adafactor":
            optimizer: torch.optim.Optimizer = torch.optim.Adafactor(
                parameters, lr=self.lr, weight_decay=self.weight_decay
            )
        else:
            optimizer = self.adamw(parameters)
        if self.lr_schedule == "constant" and self.warmup_steps == 0:
            return optimizer
        schedule = sized_schedule(self.lr_schedule, self.warmup_steps, float(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": scheduler_config(optimizer, schedule)}

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode(
        self, history: Tensor, beam_size: int | None = None, constrained: bool | None = None
    ) -> BeamResult:
        """Beam search for (B, L) histories; the finished beams, best first."""
        sids = self.semantic_ids
        memory, valid = self.network.encode(self._history_codes(history))
        state = self.network.start_decoding(memory, valid)

        def step(t: int, prefix: Tensor, parents: Tensor | None) -> Tensor:
            return self.network.decode_step(state, t, prefix, parents)

        return beam_search(
            step,
            history.shape[0],
            sids,
            self.beam_size if beam_size is None else beam_size,
            self.constrained if constrained is None else constrained,
            device=history.device,
        )

    @torch.no_grad()
    def recommend(self, history: Tensor, k: int) -> Tensor:
        """Top-``k`` distinct items from the beams (0-padded past ``beam_size`` valid beams)."""
        result = self.decode(history)
        self.decode_stats.update((result.alive & ~result.valid).sum(), result.alive.sum())
        return self.semantic_ids.expand_to_items(result.keys, result.valid, k)

    @torch.no_grad()
    def sequence_log_prob(self, history: Tensor, codes: Tensor) -> Tensor:
        """Teacher-forced joint log-probability (B, M) of candidate IDs ``codes`` (B, M, n) (no beam
        search, no constraint): the quantity the beam ranks by. For tests and analysis."""
        batch, m, _ = codes.shape
        memory, valid = self.network.encode(self._history_codes(history))  # (B, S, d)
        memory = memory.repeat_interleave(m, dim=0)  # (B * M, S, d)
        valid = valid.repeat_interleave(m, dim=0)
        flat = codes.reshape(batch * m, -1)  # (B * M, n)
        log_probs = F.log_softmax(self.network(memory, valid, flat).float(), dim=-1)  # (B * M, n, K)
        return log_probs.gather(2, flat.unsqueeze(-1)).squeeze(-1).sum(-1).view(batch, m)

    # ------------------------------------------------------------------ reporting
    def item_id_stats(self) -> dict[str, float]:
        if not self.has_semantic_ids:
            return {}
        return {"collision_rate": self.semantic_ids.stats().collision_rate}

    def run_notes(self) -> dict[str, object]:
        notes: dict[str, object] = {
            "beam_size": self.beam_size,
            "constrained": self.constrained,
            "encoder_input": self.network.encoder_input,
            "history_items": self.history_items,
            "output_head": self.network.output_head,
            **self.item_side_info,
        }
        if self.has_semantic_ids:
            stats = self.semantic_ids.stats()
            notes |= {
                "codebook_sizes": list(self.semantic_ids.codebook_sizes),
                "n_unique_ids": stats.n_unique_ids,
                "max_collision_group": stats.max_collision_group,
                "code_usage": list(stats.code_usage),
            }
        return notes
