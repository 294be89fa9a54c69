"""DiffGRM: masked discrete diffusion over parallel semantic-ID digits, after the paper (arXiv
2510.21805) and its reference code (liuzhao09/DiffGRM, ``genrec/models/DIFF_GRM``).

Items are ``n``-digit parallel semantic IDs (PSE: PCA + OPQ/PQ, ``recbench.semantic_ids``; as an
ablation, ``id_scheme="rq"``, the TIGER-style model's residual k-means IDs). A history encoder (one
token per item, bidirectional, one pass per training pair) conditions a bidirectional decoder over
the ``n`` digit positions through cross-attention; training masks the digits along the model's own
confidence order (OCN), decoding fills them most-confident-first with a beam (CPD), and decoded IDs
are mapped to items (metrics are item-level). Every block is the shared
:class:`recbench.nn.TransformerBlock`.

The encoder stays bidirectional with one pass per (history, target) pair, as in the paper: a
one-pass-per-user sequence view would need a causal encoder (a different model), and the encoder is
only 21-38% of a quick Beauty training step (measured, bucketed / unbucketed batches); the decoder,
paid per target either way, is the rest.

Hot paths: on CPU the encoder runs on the packed real history items; on any other device it runs on
the padded grid, because finding the real items (``nonzero``) costs a host synchronisation per step;
``loss`` and a decoding step read nothing back to the host there.

The full description (network, OCN, CPD, the packed/padded choice, why the encoder keeps one pass
per training pair, with its measured cost share, and every deliberate deviation from the reference)
is in ``docs/models/diffgrm.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from recbench.batch import HISTORY, PAD_ID, TARGET, Batch, trim_left_padding
from recbench.data import SeqRecDataModule
from recbench.diffusion import (
    MASKED,
    BeamResult,
    DecodeOrder,
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
from recbench.item_side import ItemOrder, semantic_ids_for
from recbench.metrics import DEFAULT_KS
from recbench.nn import Dropout, TransformerBlock
from recbench.schedules import RateSchedule, ScheduleKind
from recbench.semantic_id_model import EmbeddingSource, SemanticIDModel
from recbench.semantic_ids import ParallelPQConfig, ResidualKMeansConfig, SemanticIDs, ranked_codes_to_items
from recbench.text import DEFAULT_ENCODER

log = logging.getLogger(__name__)

Masking = Literal["guided", "sequential", "fixed", "random"]
LossPositions = Literal["masked", "next"]


# ----- network pieces (private) --------------------------------------------------------------------


def _block(d_model: int, num_heads: int, inner_size: int, dropout: float, cross: bool) -> TransformerBlock:
    """The reference's block: pre-LN, bias-free attention projections (its fused ``c_attn``), GELU FFN
    without dropout between its two linears (only after the FFN), LayerNorm eps 1e-5."""
    return TransformerBlock(
        d_model, num_heads, inner_size, dropout, activation="gelu", norm_eps=1e-5,
        cross_attention=cross, attention_bias=False, ffn_dropout=False,
    )


class _Decoder(nn.Module):
    """The decoder's own modules (mask vectors, input dropout, blocks), grouped so that the OCN
    scoring pass can switch exactly these to eval mode."""

    def __init__(self, n_digits: int, d_model: int, num_heads: int, inner_size: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.mask_embedding = nn.Parameter(torch.empty(n_digits, d_model))  # M_d, one per digit
        self.input_dropout = Dropout(dropout)
        self.blocks = nn.ModuleList(
            _block(d_model, num_heads, inner_size, dropout, cross=True) for _ in range(layers)
        )


@dataclass(frozen=True)
class _Memory:
    """Encoder output prepared for the decoder: per decoder layer (k, v) each (B, H, L, d/H), zero at
    padded slots, and the key-padding mask (B, 1, 1, L) (True = real history item)."""

    kv: tuple[tuple[Tensor, Tensor], ...]
    mask: Tensor

    def detach(self) -> _Memory:
        return _Memory(tuple((k.detach(), v.detach()) for k, v in self.kv), self.mask)


# ----- the system ----------------------------------------------------------------------------------


class DiffGRM(SemanticIDModel):
    """DiffGRM (see the module docstring).

    Args:
        num_items, max_len: linked from the data.
        n_digits: SID digits n: PQ sub-spaces (or residual levels), plus the collision digit when
            ``collision_digit``.
        id_scheme: ``pq`` (PSE, the paper: parallel digits) or ``rq`` (an ablation: the TIGER-style
            model's residual k-means IDs, ``n_digits`` minus the collision digit levels, so both
            generative models decode the same IDs and differ only in how).
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
            multiple of the PQ sub-spaces. ``rq`` uses ``sid_seed`` only (k-means on the raw
            embeddings, as :class:`ResidualKMeansConfig`).
        collision_digit: append TIGER's collision digit to the PQ codes (an option of the spec,
            not the paper: there an ID may stand for several items), so every item has its own ID.
            The digit is masked in every training view and decoded last, by a beam step
            (:func:`~recbench.diffusion.masked_first`, ``cpd_beam_search(last_digit=...)``); nested masking only.
        item_order: order in which a decoded ID expands to its items: ``popularity`` (training
            occurrences, most frequent first) or ``item_id``.
        hidden_size: d.
        encoder_layers, decoder_layers, num_heads, inner_size: transformer sizes.
        dropout: embedding, attention and residual dropout.
        position_anchor: encoder position 0 is the ``oldest`` kept item (the reference) or the
            ``newest`` one.
        masking: ``guided`` (OCN), ``sequential`` (nested views along a random order), ``fixed``
            (nested views along the reverse of the decoding order: the states a ``fixed`` decode
            visits) or ``random``.
        confidence_metric: ``msp`` or ``entropy`` (guided masking).
        guided_select: ``least`` (mask the least confident digits first, the paper) or ``most``.
        random_mask_prob, random_views: Bernoulli rate and views per sample for ``random``
            (default views: n, the decoder cost of the other strategies).
        label_smoothing: epsilon of the per-digit cross-entropy.
        loss_positions: ``masked`` (the paper: every masked digit of a view) or ``next`` (nested
            views only: the one digit a view's decode fills next, i.e. masked in it and revealed in
            the previous view; under ``fixed`` masking, autoregressive training in that order).
        val_beam, test_beam: CPD beam width for validation and direct calls / for test and predict.
        decode_order, fixed_digit_order: ``confidence`` (the paper) or ``fixed`` (ablation; digits
            in ``fixed_digit_order``, default 0..n-1).
        merge_duplicate_beams: merge equal partial beams (frees beam slots), off by default.
        beam_chunk_rows: at most this many (user x beam) rows are decoded at once.
        batch_size: training batch size of this recipe (None: the datamodule's ``batch_size``); see
            :attr:`~recbench.model.SeqRecModel.training_batch_size`.
        lr, weight_decay: AdamW.
        lr_schedule: ``cosine`` (the reference) or ``constant``/``inverse_sqrt`` after the warm-up
            (per optimiser step; :class:`~recbench.schedules.RateSchedule`).
        warmup_steps: linear warm-up length in optimiser steps.
        decay_steps: step at which the cosine reaches 0 (default: the trainer's total steps).
        decay_epochs: or the cosine reaches 0 after this many epochs' steps (dataset-independent;
            :func:`recbench.schedules.fit_steps`), where the fit is complete (trained to that epoch,
            not cut by early stopping); at most one of the two.
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
        id_scheme: Literal["pq", "rq"] = "pq",
        embedding_source: EmbeddingSource = "text",
        text_encoder: str = DEFAULT_ENCODER,
        collaborative_dim: int = 64,
        pca_dim: int = 256,
        whiten: bool = True,
        use_opq: bool = True,
        sid_seed: int = 0,
        collision_digit: bool = False,
        item_order: ItemOrder = "popularity",
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
        loss_positions: LossPositions = "masked",
        val_beam: int = 32,
        test_beam: int = 256,
        decode_order: DecodeOrder = "confidence",
        fixed_digit_order: list[int] | None = None,
        merge_duplicate_beams: bool = False,
        beam_chunk_rows: int = 8192,
        batch_size: int | None = None,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        lr_schedule: ScheduleKind = "cosine",
        warmup_steps: int = 10_000,
        decay_steps: int | None = None,
        decay_epochs: int | None = None,
        gradient_clip_val: float = 1.0,
        ks: Sequence[int] = DEFAULT_KS,
    ) -> None:
        super().__init__(
            num_items, max_len, lr, weight_decay, ks, n_digits=n_digits, codebook_size=codebook_size, collision_digit=collision_digit,
            item_order=item_order,
        )
        self.save_hyperparameters()
        self.training_batch_size = batch_size
        if n_digits < 2:
            raise ValueError(f"n_digits must be >= 2, got {n_digits}")
        if codebook_size < 2 or codebook_size & (codebook_size - 1):
            raise ValueError(f"codebook_size must be a power of two >= 2, got {codebook_size}")
        if min(val_beam, test_beam, beam_chunk_rows) < 1:
            raise ValueError("val_beam, test_beam and beam_chunk_rows must be >= 1")
        if min(val_beam, test_beam) < max(self.ks):  # fewer decoded IDs than K would truncate the lists
            raise ValueError(f"val_beam and test_beam must be >= the largest K {max(self.ks)}, got {val_beam}, {test_beam}")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
        if masking not in ("guided", "sequential", "fixed", "random"):
            raise ValueError(f"masking must be guided, sequential, fixed or random, got {masking!r}")
        digit_order = list(range(n_digits)) if fixed_digit_order is None else list(fixed_digit_order)
        if sorted(digit_order) != list(range(n_digits)):
            raise ValueError(f"fixed_digit_order must be a permutation of 0..{n_digits - 1}, got {fixed_digit_order}")
        if merge_duplicate_beams and (codebook_size + 1) ** n_digits >= 2**62:
            raise ValueError("merge_duplicate_beams needs (codebook_size + 1) ** n_digits < 2**62")
        if loss_positions not in ("masked", "next") or (loss_positions == "next" and masking == "random"):
            raise ValueError(f"loss_positions must be 'masked', or 'next' with nested views, got {loss_positions!r}")
        if masking == "fixed" and decode_order != "fixed":
            raise ValueError("masking='fixed' trains the states of a fixed-order decode: it needs decode_order='fixed'")
        if collision_digit and (masking == "random" or (decode_order == "fixed" and digit_order[-1] != n_digits - 1)):
            raise ValueError("collision_digit needs nested views (not random masking) and, under a fixed order, the digit decoded last")
        if id_scheme not in ("pq", "rq"):
            raise ValueError(f"id_scheme must be 'pq' or 'rq', got {id_scheme!r}")
        if position_anchor not in ("oldest", "newest"):
            raise ValueError(f"position_anchor must be 'oldest' or 'newest', got {position_anchor!r}")
        self.position_anchor = position_anchor
        self.id_scheme = id_scheme
        self.masking, self.confidence_metric, self.guided_select = masking, confidence_metric, guided_select
        self.random_mask_prob = random_mask_prob
        self.random_views = n_digits if random_views is None else random_views
        self.label_smoothing = label_smoothing
        self.loss_positions = loss_positions
        self.val_beam, self.test_beam = val_beam, test_beam
        self.decode_order, self.fixed_digit_order = decode_order, fixed_digit_order
        # Masking order of `fixed` views: the digit decoded last is masked first (not saved: config).
        self.register_buffer("fixed_masking_order", torch.tensor(digit_order[::-1]), persistent=False)
        self.merge_duplicate_beams = merge_duplicate_beams
        self.beam_chunk_rows = beam_chunk_rows
        self.use_rate_schedule(RateSchedule(lr_schedule, warmup_steps, decay_epochs, decay_steps))
        self.gradient_clip_val = gradient_clip_val

        # Network.
        self.token_embedding = nn.Embedding(1 + n_digits * codebook_size, hidden_size)  # E, tied
        self.item_mlp = nn.Sequential(
            nn.Linear(n_digits * hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.position_embedding = nn.Embedding(max_len, hidden_size)  # index 0 = oldest kept item
        self.embedding_dropout = Dropout(dropout)
        self.encoder_blocks = nn.ModuleList(
            _block(hidden_size, num_heads, inner_size, dropout, cross=False) for _ in range(encoder_layers)
        )
        self.decoder = _Decoder(n_digits, hidden_size, num_heads, inner_size, decoder_layers, dropout)
        self.final_norm = nn.LayerNorm(hidden_size, eps=1e-5)  # ln_f, shared by encoder and decoder
        self.apply(self._init_weights)
        nn.init.normal_(self.decoder.mask_embedding, std=0.02)
        self.register_buffer("token_offsets", 1 + torch.arange(n_digits) * codebook_size, persistent=False)

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
        if len(set(sids.codebook_sizes)) != 1 or sids.collision_digit != self.collision_digit:
            raise ValueError(
                f"DiffGRM needs one codebook size for every digit and collision_digit={self.collision_digit}, "
                f"got {sids.codebook_sizes} (collision_digit={sids.collision_digit})"
            )

    def build_semantic_ids(self, data: SeqRecDataModule) -> tuple[SemanticIDs, dict[str, Any]]:
        """Embeddings -> PSE (or residual k-means) codes fitted on training items (cached on disk),
        with their provenance."""
        hp = self.hparams
        if data.num_items != self.num_items:
            raise ValueError(f"the data has {data.num_items} items, the model {self.num_items}")
        embeddings, n_train, k, notes = self.item_side_inputs(
            data, hp.embedding_source, hp.text_encoder, hp.collaborative_dim
        )
        sub_spaces = self.n_digits - int(self.collision_digit)
        if self.id_scheme == "rq":
            residual = ResidualKMeansConfig(sub_spaces, k, self.collision_digit, hp.sid_seed)
            return semantic_ids_for(data, residual, embeddings, item_order=self.item_order), notes
        pca = min(self.hparams.pca_dim, embeddings.dim, n_train - 1)
        pca -= pca % sub_spaces  # PQ splits the PCA output into equal sub-spaces
        if pca != self.hparams.pca_dim:
            log.warning("DiffGRM: PCA dimension %d clamped to %d", self.hparams.pca_dim, pca)
        notes["pca_dim"] = pca
        config = ParallelPQConfig(
            n_digits=sub_spaces,
            codebook_size=k,
            pca_dim=pca,
            whiten=hp.whiten,
            use_opq=hp.use_opq,
            collision_digit=self.collision_digit,
            seed=hp.sid_seed,
        )
        return semantic_ids_for(data, config, embeddings, item_order=self.item_order), notes

    # ------------------------------------------------------------------ network
    def _tokens(self, codes: Tensor) -> Tensor:
        """(..., n) codes (negative = PAD / masked) -> (..., n) rows of E (0 where negative)."""
        return torch.where(codes >= 0, codes + self.token_offsets, torch.zeros_like(codes))

    def _item_tokens(self, items: Tensor, position: Tensor) -> Tensor:
        """History items (...) and their positions (...) -> encoder input tokens (..., d)."""
        tokens = self._tokens(self.sid_codes[items])  # (..., n)
        x = self.item_mlp(self.token_embedding(tokens).flatten(-2))  # (..., d): one token per item
        return self.embedding_dropout(x + self.position_embedding(position))

    def encode(self, history: Tensor, packed: bool | None = None) -> _Memory:
        """Left-padded history (B, L) -> cross-attention memory: per decoder layer (k, v) of shape
        (B, H, L', d/H), zero at padded slots, and the key-padding mask (B, 1, 1, L').

        ``packed`` (default: on CPU only) trims all-padding columns (L' <= L) and runs the encoder
        on the real items only; else it runs on the padded grid (L' = L). Both are exact; the packed
        path reads sizes back to the host, a synchronisation per step on a GPU
        (docs/models/diffgrm.md).
        """
        packed = history.device.type == "cpu" if packed is None else packed
        if packed:
            history = trim_left_padding(history)
        if history.shape[1] > self.max_len:
            raise ValueError(f"history length {history.shape[1]} exceeds max_len {self.max_len}")
        valid = history != PAD_ID  # (B, L)
        if self.position_anchor == "oldest":  # 0 = oldest kept item (the reference's right padding)
            position = valid.long().cumsum(1) - 1
        else:  # 0 = newest item
            position = valid.long().flip(1).cumsum(1).flip(1) - 1
        # A row without any item (not produced by the pipeline) may attend to its last slot (zero
        # key and value), so the softmax stays defined.
        attend = valid.clone()
        attend[:, -1] |= ~valid.any(dim=1)
        mask = attend[:, None, None, :]  # (B, 1, 1, L)
        crosses = [block.cross_attention for block in self.decoder.blocks]  # project K/V once per user
        if packed:
            index = valid.flatten().nonzero().squeeze(1)  # (M,) real slots of the (B, L) grid
            x = self._item_tokens(history.flatten()[index], position.flatten()[index])  # (M, d)
            for block in self.encoder_blocks:
                x = block.forward_packed(x, index, mask)
            h = self.final_norm(x)  # (M, d); padded slots get zero keys/values without projection
            grid = (history.shape[0], history.shape[1])
            kv = tuple(c.memory_key_values(h, index, grid) for c in crosses)  # type: ignore[union-attr]
        else:
            x = self._item_tokens(history, position.clamp(min=0))  # (B, L, d)
            for block in self.encoder_blocks:
                x = block(x, mask)
            # Zeroed pad rows (the reference's) give zero keys/values (bias-free), as packed does.
            h = self.final_norm(x) * valid.unsqueeze(-1)  # (B, L, d)
            kv = tuple(c.memory_key_values(h) for c in crosses)  # type: ignore[union-attr]
        return _Memory(kv, mask)

    def decoder_logits(self, memory: _Memory, codes: Tensor, scored: Tensor | None = None) -> Tensor:
        """Decoder over R rows per user: memory of B users, codes (B, R, n) with ``MASKED`` where
        masked -> logits (B, R, n, K') over each digit's active codes.

        ``scored`` (B, Q): the flat positions (of each user's R n) whose logits the caller reads; the
        last block then runs its cross-attention and FFN on those alone, and every other position's
        logits are 0 (meaningless, for the caller to ignore)."""
        masked = (codes == MASKED).unsqueeze(-1)  # (B, R, n, 1)
        x = self.token_embedding(self._tokens(codes))  # (B, R, n, d)
        x = torch.where(masked, self.decoder.mask_embedding.to(x.dtype), x)
        x = self.decoder.input_dropout(x)
        last = len(self.decoder.blocks) - 1
        for layer, (block, kv) in enumerate(zip(self.decoder.blocks, memory.kv, strict=True)):
            keep = scored if layer == last else None
            x = block.forward_with_memory(x, kv, memory.mask, keep=keep)  # (B, R, n, d), or (B, Q, d)
        h = self.final_norm(x)
        if scored is not None:  # back to the grid, zero at the unread positions
            batch, rows, n = codes.shape
            grid = h.new_zeros(batch, rows * n, h.shape[-1])
            h = grid.scatter(1, scored.unsqueeze(-1).expand_as(h), h).view(batch, rows, n, -1)  # (B, R, n, d)
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
            return nested_mask_views(self._collision_digit_first(random_order(batch_size, n, device=device)))
        if self.masking == "fixed":
            return nested_mask_views(self.fixed_masking_order.expand(batch_size, n))
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
        return nested_mask_views(self._collision_digit_first(confidence_order(confidence, self.guided_select)))

    def _collision_digit_first(self, order: Tensor) -> Tensor:
        return masked_first(order, self.n_digits - 1) if self.collision_digit else order

    def _loss_mask(self, mask: Tensor) -> Tensor:
        """(B, V, n) True where the loss reads a view's logits: its masked digits, or (``next``) the
        one digit masked in it but not in the previous nested view."""
        if self.loss_positions == "masked":
            return mask
        return mask & ~torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)

    def _scored_positions(self, scored: Tensor) -> Tensor | None:
        """Flat indices (B, Q) of the True positions of (B, V, n), or None. With nested views every
        row has 1 + 2 + ... + V masked positions (or V ``next`` ones), a count known on the host;
        random views mask a count that varies by row (selecting it would read it back: a GPU sync)."""
        if self.masking == "random":
            return None
        views = scored.shape[1]
        count = views if self.loss_positions == "next" else views * (views + 1) // 2
        unscored_last = (~scored.flatten(1)).to(torch.uint8)  # (B, V n): 0 = scored
        return torch.argsort(unscored_last, dim=1, stable=True)[:, :count]

    def loss(self, batch: Batch) -> Tensor:
        if not self.has_semantic_ids:
            raise RuntimeError("DiffGRM has no semantic IDs: fit it with a datamodule or call set_semantic_ids")
        memory = self.encode(batch[HISTORY])
        target = self.sid_codes[batch[TARGET]]  # (B, n)
        mask = self.training_masks(memory, target.shape[0])  # (B, V, n)
        scored = self._loss_mask(mask)  # (B, V, n)
        logits = self.decoder_logits(memory, apply_mask(target, mask), self._scored_positions(scored))  # (B, V, n, K')
        targets = target.unsqueeze(1).expand_as(mask)  # (B, V, n)
        # The einsum's logits are a view of digit-major storage (n, B, V, K'), and the mean over the
        # masked positions does not depend on their order: taken in that order, flattening copies
        # nothing (in (B, V, n) order it copies every logit, forward and backward).
        return masked_cross_entropy(
            logits.permute(2, 0, 1, 3), targets.permute(2, 0, 1), scored.permute(2, 0, 1), self.label_smoothing
        )

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
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
            partial(self._log_probs, memory), history.shape[0], self.n_digits, self.active_codebook_size,
            beam, self.decode_order, self.fixed_digit_order, self.merge_duplicate_beams, history.device,
            last_digit=self.n_digits - 1 if self.collision_digit else None,
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
            beams = self.beam_search(chunk, beam)
            alive = torch.isfinite(beams.scores)  # (B, W): -inf marks an empty slot
            items, invalid, candidates = ranked_codes_to_items(sids, beams.codes, alive, k)
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
        sized = self.sized_rate_schedule  # once the fit has started: the warm-up capped, the end in steps
        return {
            "embedding_source": self.item_side_info.get("embedding_source"),
            "sid_scheme": self.item_side_info.get("scheme"),
            "codebook_size": self.active_codebook_sizes[0] or None,
            "codebook_fallback": self.item_side_info.get("codebook_fallback"),
            "id_scheme": self.id_scheme,
            "pca_dim": self.item_side_info.get("pca_dim"),
            "position_anchor": self.position_anchor,
            "masking": self.masking,
            "confidence_metric": self.confidence_metric if self.masking == "guided" else None,
            "guided_select": self.guided_select if self.masking == "guided" else None,
            "label_smoothing": self.label_smoothing,
            "loss_positions": self.loss_positions,
            "val_beam": self.val_beam,
            "test_beam": self.test_beam,
            "decode_order": self.decode_order,
            "fixed_digit_order": self.fixed_digit_order if self.decode_order == "fixed" else None,
            "merge_duplicate_beams": self.merge_duplicate_beams,
            "collision_digit": self.collision_digit,
            "decoding": "unconstrained CPD beam, illegal IDs dropped, collisions expanded in the IDs' item order"
            + (" (none: a collision digit, decoded last)" if self.collision_digit else ""),
            "metrics_level": "item",
            "cross_attention_padding_mask": True,
            "lr_schedule": self.rate_schedule.kind,
            "warmup_steps": sized.warmup_steps if sized else self.rate_schedule.warmup_steps,
            "decay_steps": sized.total_steps if sized else self.rate_schedule.decay_steps,
            "decay_epochs": self.rate_schedule.decay_epochs,
            "gradient_clip_val": self.gradient_clip_val,
        }
