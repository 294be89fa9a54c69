"""TIGER-style generative retrieval (Rajput et al., NeurIPS 2023, arXiv 2305.05065), after the paper
and the re-implementations GRID and AR_GRM. Full description, measurements and deviations from the
paper: ``docs/models/tiger.md``.

Item side: text (or co-occurrence) embeddings -> residual k-means ``levels`` x ``codebook_size`` plus
a collision digit (``n`` digits, one item per ID), fitted on training items, kept in the persistent
buffer ``sid_codes`` ``(N + 1, n)`` so that a checkpoint decodes without the data.

Sequence model: SID tokens ``1 + t K + c`` (0 = PAD), a learned context token before the history (in
TIGER's user-token slot), and a digit decoder ``[BOS, e(c_0), ..., e(c_{n-2})]`` (causal self-attention,
cross-attention to the encoder, tied or per-digit output), mean cross-entropy over the digits.

* ``architecture="encoder_decoder"`` (TIGER): bidirectional encoder over the last ``history_items``
  items (``encoder_input`` ``"flat"`` SID tokens or one ``"item"`` MLP token per item), trained on
  (history, target) pairs: one encoder pass per target.
* ``architecture="causal"``: causal item-level encoder over a user's whole window, every target
  trained in ONE pass; the decoder row of the target after item ``t`` cross-attends to encoder
  positions ``<= t`` only, so each target's loss is exactly its pairs loss (tested). The quick
  default: on Beauty it reached val NDCG@10 0.0108 / 0.0156 after 92 / 205 s of training (51 s/epoch)
  vs 440 s/epoch for the flat encoder-decoder (figures: ``benchmark/configs/model/tiger.yaml``).

Decoding: :func:`recbench.beam.beam_search` (constrained, KV cache, memory keys/values once per user).
On CPU the encoder, memory keys/values and decoder rows run on real tokens only (``nonzero``); a GPU
runs the padded path, since a packed size costs a host synchronisation per step and length-bucketed
GPU batches leave little padding. ``loss`` and decoding steps never read a device tensor (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from recbench.batch import HISTORY, PAD_ID, SEQUENCE, TARGET, Batch
from recbench.beam import BeamResult, beam_search
from recbench.data import SeqRecDataModule
from recbench.item_side import ItemOrder, semantic_ids_for
from recbench.metrics import DEFAULT_KS
from recbench.nn import Dropout, TransformerBlock, causal_padding_mask
from recbench.schedules import RateSchedule, ScheduleKind
from recbench.semantic_id_model import EmbeddingSource, SemanticIDModel
from recbench.semantic_ids import PAD_CODE, ResidualKMeansConfig, SemanticIDs
from recbench.text import DEFAULT_ENCODER

Architecture = Literal["encoder_decoder", "causal"]
EncoderInput = Literal["flat", "item"]
OutputHead = Literal["tied", "separate"]
OptimizerName = Literal["adamw", "adafactor"]


# ---------------------------------------------------------------------------------------- network


class _Memory(NamedTuple):
    """Encoder output over ``[context, history]``: ``states`` (B, S, d), or (M, d) for the real positions
    only when packed at flat ``index`` (M,) (else ``None``); ``valid`` (B, S) True = real position."""

    states: Tensor
    valid: Tensor
    index: Tensor | None


@dataclass
class _DecodeState:
    """KV cache of one beam search: cross-attention (keys, values) (B, H, S, Dh) per decoder layer,
    once per user and shared by its beams; ``memory_mask`` (B, 1, 1, S); self-attention cache per layer
    (B * w, H, t, Dh), rows user-major (beam j of user b is row ``b * w + j``); ``beams`` = w."""

    memory_kv: list[tuple[Tensor, Tensor]]
    memory_mask: Tensor
    cache: list[tuple[Tensor, Tensor]]
    beams: int


class _TigerNetwork(nn.Module):
    """Encoder + digit decoder over SID tokens; works in code space ((..., n) codes, ``PAD_CODE`` = none)."""

    def __init__(
        self, n_digits: int, codebook_size: int, history_items: int, architecture: Architecture,
        encoder_input: EncoderInput, hidden_size: int, encoder_layers: int, decoder_layers: int, num_heads: int,
        head_dim: int | None, ffn_size: int, dropout: float, output_head: OutputHead,
    ) -> None:  # fmt: skip
        super().__init__()
        n, K, d = n_digits, codebook_size, hidden_size
        self.n_digits, self.codebook_size, self.hidden_size = n, K, d
        self.architecture, self.encoder_input, self.output_head = architecture, encoder_input, output_head
        self.token_embedding = nn.Embedding(1 + n * K, d, padding_idx=0)  # 0 = PAD, 1 + t*K + c
        self.encoder_position = nn.Embedding(history_items * n if encoder_input == "flat" else history_items, d)
        self.digit_type = nn.Embedding(n, d)  # flat input only
        self.item_mlp = (
            nn.Sequential(nn.Linear(n * d, d), nn.ReLU(), nn.Linear(d, d)) if encoder_input == "item" else None
        )
        self.context_token = nn.Parameter(torch.empty(d))
        self.bos = nn.Parameter(torch.empty(d))
        self.decoder_position = nn.Embedding(n, d)
        self.dropout = Dropout(dropout)
        block = dict(num_heads=num_heads, ffn_dim=ffn_size, dropout=dropout, activation="relu", head_dim=head_dim)
        self.encoder = nn.ModuleList(TransformerBlock(d, **block) for _ in range(encoder_layers))
        self.decoder = nn.ModuleList(TransformerBlock(d, cross_attention=True, **block) for _ in range(decoder_layers))
        self.encoder_norm = nn.LayerNorm(d)
        self.decoder_norm = nn.LayerNorm(d)
        self.head = nn.Parameter(torch.empty(n, K, d)) if output_head == "separate" else None
        self.output_bias = nn.Parameter(torch.zeros(n, K))
        for embedding in (self.token_embedding, self.encoder_position, self.digit_type, self.decoder_position):
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
    def encode(self, codes: Tensor, packed: bool) -> _Memory:
        """(B, L, n) codes of left-padded items (at most ``history_items``) -> memory over
        ``[context, items]``, S = 1 + L (flat: 1 + L n).

        Encoder-decoder: bidirectional, positions counted from the newest slot (leading all-padding
        columns change nothing). Causal: position i attends to positions <= i, positions counted from
        the oldest real item, so the prefix of a sequence is encoded exactly as the same items given
        as a history. ``packed`` (exact) runs projections and FFN on the real tokens only
        (:meth:`~recbench.nn.TransformerBlock.forward_packed`).
        """
        batch, length, n = codes.shape
        tokens = self.tokens(codes)  # (B, L, n)
        size = self.encoder_position.num_embeddings
        if self.encoder_input == "flat":
            tokens = tokens.reshape(batch, length * n)  # (B, L n), item-major
            positions = torch.arange(size - length * n, size, device=codes.device)  # (L n,) newest last
            digits = torch.arange(length * n, device=codes.device) % n
            x = self.token_embedding(tokens) + self.encoder_position(positions) + self.digit_type(digits)
            valid = tokens != 0  # (B, L n)
        else:
            assert self.item_mlp is not None
            x = self.item_mlp(self.token_embedding(tokens).reshape(batch, length, -1))  # (B, L, d)
            valid = (codes >= 0).all(-1)  # (B, L)
            if self.architecture == "causal":
                positions = (valid.cumsum(1) - 1).clamp(min=0)  # (B, L) from the oldest real item
            else:
                positions = torch.arange(size - length, size, device=codes.device)  # (L,) newest last
            x = x + self.encoder_position(positions)
        x = self.dropout(torch.cat([self.context_token.to(x.dtype).expand(batch, 1, -1), x], dim=1))  # (B, S, d)
        valid = torch.cat([valid.new_ones(batch, 1), valid], dim=1)  # (B, S)
        # causal: the context token is first, so it attends to itself only (a learned constant)
        mask = causal_padding_mask(valid) if self.architecture == "causal" else valid[:, None, None, :]
        if not packed:
            for block in self.encoder:
                x = block(x, mask)
            return _Memory(self.encoder_norm(x), valid, None)
        index = valid.flatten().nonzero().squeeze(1)  # (M,) real positions of the (B S) grid
        h = x.flatten(0, 1)[index]  # (M, d)
        for block in self.encoder:
            h = block.forward_packed(h, index, mask)
        return _Memory(self.encoder_norm(h), valid, index)

    def memory_key_values(self, memory: _Memory) -> list[tuple[Tensor, Tensor]]:
        """Cross-attention (keys, values) (B, H, S, Dh) of every decoder layer, once per user."""
        grid = (memory.valid.shape[0], memory.valid.shape[1])
        memory_kv = []
        for block in self.decoder:
            assert block.cross_attention is not None  # every decoder block has one
            memory_kv.append(block.cross_attention.memory_key_values(memory.states, memory.index, grid))
        return memory_kv

    # ---- decoder, teacher forcing ----------------------------------------------------------
    def decoder_inputs(self, codes: Tensor) -> Tensor:
        """(..., n) target codes -> (..., n, d): [BOS, e(c_0), ..., e(c_{n-2})] + positions."""
        shifted = self.token_embedding(self.tokens(codes)[..., :-1])  # (..., n - 1, d)
        bos = self.bos.to(shifted.dtype).expand(*codes.shape[:-1], 1, -1)  # (..., 1, d)
        positions = self.decoder_position(torch.arange(self.n_digits, device=codes.device))  # (n, d)
        return torch.cat([bos, shifted], dim=-2) + positions  # (..., n, d)

    def forward(
        self,
        memory_kv: list[tuple[Tensor, Tensor]],
        memory_mask: Tensor,
        codes: Tensor,
        index: Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> Tensor:
        """Teacher-forced logits (..., n, K) of target codes (B, R, n): R rows per user, or only the
        real rows (M, n) at flat ``index`` of a ``(B, R)`` ``grid``; ``memory_mask`` (B, 1, 1 or R n, S)."""
        x = self.dropout(self.decoder_inputs(codes))  # (B, R, n, d) or (M, n, d)
        causal = torch.ones(self.n_digits, self.n_digits, dtype=torch.bool, device=codes.device).tril()
        for block, kv in zip(self.decoder, memory_kv, strict=True):
            x = block.forward_with_memory(x, kv, memory_mask, causal, index, grid)
        h = self.decoder_norm(x)
        return torch.einsum("...nd,nkd->...nk", h, self.digit_weights()) + self.output_bias

    # ---- decoder, incremental (beam search) -----------------------------------------------
    def start_decoding(self, memory: _Memory) -> _DecodeState:
        """Cross-attention keys/values of every decoder layer, once per user; an empty self-attention cache."""
        memory_kv = self.memory_key_values(memory)
        empty = [(k[:, :, :0], v[:, :, :0]) for k, v in memory_kv]  # (B, H, 0, Dh): no past yet
        return _DecodeState(memory_kv, memory.valid[:, None, None, :], empty, beams=1)

    def decode_step(self, state: _DecodeState, step: int, prefix: Tensor, parents: Tensor | None) -> Tensor:
        """:class:`~recbench.beam.DigitStep` for :func:`~recbench.beam.beam_search`: logits (B, w, K) of digit ``step``."""
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



# ----------------------------------------------------------------------------------------- system


class TIGER(SemanticIDModel):
    """TIGER-style autoregressive semantic-ID recommender (see the module docstring).

    Args:
        num_items: N (linked from the data).
        max_len: history length the data provides (linked from the data).
        history_items: the encoder reads the last this many items (TIGER: 20); for ``"causal"`` also
            the training window (older targets of a longer data window are dropped: use ``max_len``).
        architecture: ``"encoder_decoder"`` (TIGER, pairs view) or ``"causal"`` (sequence view, every
            target of a user in one pass; needs ``encoder_input="item"``).
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
            training split has fewer items (see the docs).
        collision_digit: append the digit that makes every ID unique (n = levels + 1).
        sid_seed: k-means seed.
        item_order: which item of a shared ID gets collision code 0, 1, ...: ``popularity`` (training
            occurrences, most frequent first) or ``item_id``.
        kmeans_iters: Lloyd iterations per level.
        optimizer: ``"adamw"`` or ``"adafactor"`` (torch's, with its relative step size).
        lr: base learning rate.
        weight_decay: decoupled weight decay.
        lr_schedule: ``"constant"``, ``"inverse_sqrt"`` or ``"cosine"`` (per optimiser step).
        warmup_steps: linear warm-up (constant, cosine) or constant phase (inverse_sqrt) in steps.
        decay_epochs: cosine reaches 0 after this many epochs' steps, where the fit is complete
            (trained to that epoch, not cut by early stopping); None: at the profile's cap.
        ks: see :class:`~recbench.model.SeqRecModel`.
    """

    def __init__(
        self,
        num_items: int,
        max_len: int = 50,
        history_items: int = 20,
        architecture: Architecture = "encoder_decoder",
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
        item_order: ItemOrder = "popularity",
        kmeans_iters: int = 20,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: ScheduleKind = "constant",
        warmup_steps: int = 0,
        decay_epochs: int | None = None,
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
            item_order=item_order,
        )
        self.save_hyperparameters()
        if history_items < 1 or beam_size < 1 or levels < 1 or codebook_size < 2:
            raise ValueError(
                "need history_items >= 1, beam_size >= 1, levels >= 1, codebook_size >= 2; got "
                f"{history_items}, {beam_size}, {levels}, {codebook_size}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if architecture == "causal" and encoder_input != "item":
            raise ValueError("architecture='causal' encodes one token per item: set encoder_input='item'")
        self.architecture = architecture
        # Per instance (the datamodule asks the model): the causal model trains on whole windows.
        self.training_view = "sequence" if architecture == "causal" else "pairs"  # type: ignore[misc]
        self.history_items = min(history_items, max_len)  # the data never supplies more
        self.beam_size, self.constrained, self.label_smoothing = beam_size, constrained, label_smoothing
        self.embedding_source, self.text_encoder = embedding_source, text_encoder
        self.collaborative_dim = collaborative_dim
        self.levels = levels
        self.sid_seed, self.kmeans_iters = sid_seed, kmeans_iters
        self.optimizer_name = optimizer
        self.use_rate_schedule(RateSchedule(lr_schedule, warmup_steps, decay_epochs))
        self.network = _TigerNetwork(
            self.n_digits, codebook_size, self.history_items, architecture, encoder_input, hidden_size,
            encoder_layers, decoder_layers, num_heads, head_dim, ffn_size, dropout, output_head,
        )  # fmt: skip

    # ------------------------------------------------------------------ item side
    def build_semantic_ids(self, datamodule: SeqRecDataModule) -> tuple[SemanticIDs, dict[str, str]]:
        """Residual k-means IDs of ``datamodule``'s items (cached on disk) and their provenance; the
        lifecycle around it (setup, buffers, checkpoint) is :class:`~recbench.semantic_id_model.SemanticIDModel`'s."""
        embeddings, _, size, info = self.item_side_inputs(
            datamodule, self.embedding_source, self.text_encoder, self.collaborative_dim
        )
        config = ResidualKMeansConfig(
            levels=self.levels,
            codebook_size=size,
            collision_digit=self.collision_digit,
            seed=self.sid_seed,
            niter=self.kmeans_iters,
        )
        return semantic_ids_for(datamodule, config, embeddings, item_order=self.item_order), info

    # ------------------------------------------------------------------ training
    @staticmethod
    def _packed(grid: Tensor) -> bool:
        # Packing needs the number of real tokens (nonzero): free on CPU, a host synchronisation per
        # step on a GPU, where the padded path runs (length-bucketed batches leave little padding).
        return grid.device.type == "cpu"

    def _encode(self, history: Tensor) -> _Memory:
        """(B, L) left-padded items -> memory over the context and the last ``history_items`` items."""
        history = history[:, -self.history_items :]
        return self.network.encode(self.sid_codes[history], self._packed(history))

    def loss(self, batch: Batch) -> Tensor:
        """Mean cross-entropy over the n digits of every target's ID, teacher-forced. Pairs batches
        (both architectures): one target per row. Sequence batches (causal): every target at once."""
        self.require_semantic_ids()
        if SEQUENCE in batch:  # (M, n, K), (M, n) packed on CPU; padded (B, L, n, K), (B, L, n) elsewhere
            logits, codes = self.sequence_logits(batch[SEQUENCE])
        else:
            codes = self.sid_codes[batch[TARGET]].unsqueeze(1)  # (B, 1, n)
            memory = self._encode(batch[HISTORY])
            logits = self.network(self.network.memory_key_values(memory), memory.valid[:, None, None, :], codes)
        # Mean over real (target, digit) pairs, so every target weighs the same; PAD_CODE marks
        # padded rows (no host read of their count, unlike boolean indexing).
        return F.cross_entropy(
            logits.float().flatten(0, -2),
            codes.flatten(),
            ignore_index=PAD_CODE,
            label_smoothing=self.label_smoothing,
        )

    def sequence_logits(self, sequence: Tensor, packed: bool | None = None) -> tuple[Tensor, Tensor]:
        """Teacher-forced logits of every target of left-padded windows (B, L + 1), one encoder pass.

        The target after input position t (``sequence[:, t + 1]``, where ``sequence[:, t]`` is real)
        is decoded against the memory positions ``<= t`` (the context and inputs ``0..t``), which
        the causal encoder computed without looking further. Returns logits and target codes:
        padded (B, L, n, K), (B, L, n) with ``PAD_CODE`` at rows that are no target, or packed
        (CPU default) (M, n, K), (M, n) for the M real targets.
        """
        if self.architecture != "causal":
            raise ValueError("sequence batches need architecture='causal' (the encoder-decoder trains on pairs)")
        sequence = sequence[:, -(self.history_items + 1) :]  # the encoder's window
        packed = self._packed(sequence) if packed is None else packed
        inputs, targets = sequence[:, :-1], sequence[:, 1:]  # (B, L) each
        batch, length = inputs.shape
        real = (inputs != PAD_ID) & (targets != PAD_ID)  # (B, L): targets with an item before them
        codes = torch.where(real.unsqueeze(-1), self.sid_codes[targets], PAD_CODE)  # (B, L, n)
        memory = self.network.encode(self.sid_codes[inputs], packed)  # S = 1 + L
        prefix = torch.ones(length, length + 1, dtype=torch.bool, device=sequence.device).tril(diagonal=1)
        # Row t's n queries see memory columns <= t + 1 (column 0 = context) that are real.
        mask = (prefix.repeat_interleave(self.n_digits, 0) & memory.valid.unsqueeze(1)).unsqueeze(1)  # (B, 1, L n, S)
        memory_kv = self.network.memory_key_values(memory)
        if not packed:
            return self.network(memory_kv, mask, codes), codes
        index = real.flatten().nonzero().squeeze(1)  # (M,) real targets of the (B L) grid
        codes = codes.flatten(0, 1)[index]  # (M, n)
        return self.network(memory_kv, mask, codes, index, (batch, length)), codes

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, object]:
        parameters = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "adafactor":
            optimizer: torch.optim.Optimizer = torch.optim.Adafactor(
                parameters, lr=self.lr, weight_decay=self.weight_decay
            )
        else:
            optimizer = self.adamw(parameters)
        return self.scheduled(optimizer)

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode(self, history: Tensor, beam_size: int | None = None, constrained: bool | None = None) -> BeamResult:
        """Beam search for (B, L) histories; the finished beams, best first. The decoder attends to
        every history position (for ``"causal"``: the prefix up to the newest item)."""
        sids = self.semantic_ids
        state = self.network.start_decoding(self._encode(history))

        def step(t: int, prefix: Tensor, parents: Tensor | None) -> Tensor:
            return self.network.decode_step(state, t, prefix, parents)

        beam_size = self.beam_size if beam_size is None else beam_size
        constrained = self.constrained if constrained is None else constrained
        return beam_search(step, history.shape[0], sids, beam_size, constrained, device=history.device)

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
        memory = self._encode(history)
        logits = self.network(self.network.memory_key_values(memory), memory.valid[:, None, None, :], codes)
        log_probs = F.log_softmax(logits.float(), dim=-1)  # (B, M, n, K)
        return log_probs.gather(3, codes.unsqueeze(-1)).squeeze(-1).sum(-1)

    # ------------------------------------------------------------------ reporting
    def item_id_stats(self) -> dict[str, float]:
        if not self.has_semantic_ids:
            return {}
        return {"collision_rate": self.semantic_ids.stats().collision_rate}

    def run_notes(self) -> dict[str, object]:
        notes: dict[str, object] = {
            "architecture": self.architecture,
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
