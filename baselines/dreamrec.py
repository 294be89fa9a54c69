"""DreamRec (Yang et al., NeurIPS 2023; code: YangZhengyi98/DreamRec): guided Gaussian diffusion that
generates an "oracle item" embedding, then retrieves the nearest real items.

The system, with ``d`` the width, ``E`` the item table ``(N + 1, d)`` and ``∅`` a learned null vector:

1. **History encoder** (:class:`FaithfulTEnc`, ref. ``Tenc``): one SASRec-style block with one head,
   pooled at the last real position, giving ``h`` ``(B, d)``.
2. **Denoiser** ``f(x_i, c, i)`` predicts ``x0`` from the noisy vector ``x_i``, a condition ``c``
   (``h`` or ``∅``) and a time embedding ``temb_i = MLP(sinusoid(i))`` (``Tenc.forward``):
   ``mlp1``: ``f = W [x_i; c; temb_i] + b`` (one linear layer), ``mlp2``: ``Linear(3d, 2d) -> GELU ->
   Linear(2d, d)``.
3. **Training**, for every target of the training split: ``x0 = sg(E[target])`` (the same
   table as the encoder input; ``sg`` = stop the gradient, see below), ``h`` replaced by ``∅``
   with probability ``p`` per row (classifier-free-guidance dropout), ``i ~ U{0..T-1}``, ``x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps`` and
   ``loss = mean ||x0 - f(x_i, h, i)||^2`` (``GaussianDiffusion.training_loss``), averaged over
   the batch's targets.

   ``training_view="sequence"`` (default): T-enc is causal, so ONE encoder pass over a user's
   training window gives ``h`` for every target position at once (as SASRec trains); the reference
   and ``training_view="pairs"`` run one pass per (history, target) pair. Per target it is the same
   computation (tests/test_dreamrec.py checks the loss to 1e-5); the two differences, both within
   noise, are in ``docs/models/dreamrec.md``. The choice is recorded in :meth:`DreamRec.run_notes`.
4. **Sampling**: DDPM ancestral sampling over all ``T`` steps with the guided prediction
   ``x̂0 = (1 + w) f(x_i, h, i) - w f(x_i, ∅, i)``; ``h`` without CFG dropout, modules in eval mode.
5. **Retrieval**: the generated ``x0`` scores items by ``x0 · E[j]`` through
   :class:`~recbench.retrieval.ItemIndex` (faiss when installed); PAD is never returned.

Fixes of flaws in the reference code, each one a plain improvement unless an option says otherwise:
evaluation runs in eval mode (the reference never calls ``eval()``, so dropout stays on at test
time); PAD is masked (the reference can recommend the padding row); no evaluation case is dropped
(the reference skips the last partial batch; the base class evaluates every batch); the checkpoint
is selected on validation NDCG@10 (the reference prints test every 10 epochs and selects nothing;
the shared trainer config). **Changes results, hence options** (both
recorded in the hyper-parameters of every result row):

- ``stop_target_gradient`` (default True; the reference: False). With the target ``x0 = E[y]``
  trainable, the MSE is lowered by shrinking the targets themselves, and the search then returns the
  rarely trained items that kept their norm (YooChoose validation NDCG@10 0.049 -> 0.000 in 12
  epochs; measurements in ``docs/models/dreamrec.md``). With ``x0 = sg(E[y])`` the table learns only
  through the encoder input, so the target space stays near its random start.
- ``item_scope``: ``"trained"`` (default) retrieves among training items; ``"all"`` (the reference)
  lets never-trained items, which keep their ``N(0, 1)`` norm, dominate the dot-product search.
- ``target_norm``: targets and retrieval keys rescaled to a fixed norm (trainable targets cannot shrink).
- ``ranking_weight`` ``lambda`` (default 0, the paper): adds ``lambda`` times a softmax cross-entropy of
  the retrieval scores ``x̂0 · E[j]`` of the predicted ``x̂0`` (:meth:`DreamRec.ranking_loss`), so the
  detached target space learns which items follow which histories without the reference's collapse.
- ``popularity_prior`` ``b`` (default 0, the paper): retrieval scores ``x0 · E[j] + b log(1 + n_j)``
  (``n_j`` the training count): the random target space has no popularity direction, so without it
  DreamRec almost never recommends head items (Steam; ``recbench bands``).

Sampling speed-ups (exact ones and the approximate DDIM) and the evaluation noise, keyed by history
so that ``recommend`` is a deterministic function of it: ``docs/models/dreamrec.md``.

Data conventions: histories are left-padded with 0 (the reference right-pads with id N), so the
pooled "last real position" is index ``L - 1``; positions count from the oldest real item, as in the
reference. An empty history (never under our protocols) pools to ``LN3(0)``, as in the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from recbench.batch import HISTORY, PAD_ID, SEQUENCE, TARGET, Batch
from recbench.data import SeqRecDataModule
from recbench.diffusion import (
    GaussianDiffusion,
    KeyedNoise,
    ScheduleName,
    classifier_free_x0,
    ddim_sample,
    ddpm_sample,
    precompute_time_table,
    sequence_keys,
    sinusoidal_time_embedding,
)
from recbench.losses import IGNORE_INDEX, linear_cross_entropy
from recbench.metrics import DEFAULT_KS
from recbench.model import SeqRecModel, float32_scores
from recbench.nn import Dropout
from recbench.retrieval import Backend, ItemIndex

DenoiserKind = Literal["mlp1", "mlp2"]
EncoderKind = Literal["faithful"]
SamplerKind = Literal["ddpm", "ddim"]
ItemScope = Literal["trained", "all"]
TrainingView = Literal["sequence", "pairs"]
SamplingPath = Literal["fused", "naive"]

#: The reference's "minus infinity" for masked attention logits (finite, so a row whose keys are all
#: masked gets a uniform softmax instead of NaN).
REFERENCE_MASK_FILL = -(2.0**32) + 1


class FaithfulTEnc(nn.Module):
    r"""DreamRec's history encoder ("T-enc", ``Tenc.cacu_h``) with the reference's quirks kept.

    For embedded items ``X0 = E[S]`` ``(B, L, d)`` and the real-item mask ``m`` ``(B, L)``:

    1. ``X = Dropout(X0 + P[pos]) * m``: positions counted from the oldest real item; padding rows 0.
    2. ``Q = LN1(X)``. One head, query from ``Q``, keys and values from the *un-normalised* ``X``
       (linear maps with bias): ``S = (Q W_q)(X W_k)^T / sqrt(d)``; keys whose row of ``X`` sums to 0
       (padding) and future keys get ``-2^32 + 1``; ``softmax``; then *query masking*: rows whose ``Q``
       sums to 0 are zeroed (``LN1`` of a padding row is ``LN1``'s bias, so this masks padding queries
       only while that bias sums to 0: a faithful quirk; padding rows are dropped anyway); attention dropout;
       ``A = softmax(S) (X W_v) + Q`` (the residual is the *normalised* query).
    3. ``R = LN2(A)``; ``F = LN_ffn(Dropout(W_2 ReLU(W_1 R)) + R)`` with ``W_1, W_2`` of size d x d.
    4. ``H = LN3(F * m)``; the caller pools ``H[:, L - 1]``.

    One layer, so the pooled row sees the others only as keys and values: ``last_only=True`` (default)
    computes the last query row alone (exact; the test compares it with the full computation).

    Args:
        hidden_size: d.
        max_len: rows of the position table (the longest history).
        dropout: embedding, attention and FFN dropout.
    """

    def __init__(self, hidden_size: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.position_embedding = nn.Embedding(max_len, hidden_size)  # N(0, 1), the torch default
        self.embedding_dropout = Dropout(dropout)
        self.query_norm = nn.LayerNorm(hidden_size)  # LN1
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.attention_dropout = Dropout(dropout)
        self.ffn_input_norm = nn.LayerNorm(hidden_size)  # LN2
        self.ffn_in = nn.Linear(hidden_size, hidden_size)  # the reference's 1x1 convolutions
        self.ffn_out = nn.Linear(hidden_size, hidden_size)
        self.ffn_dropout = Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(hidden_size)  # the FFN's own post-residual LayerNorm
        self.output_norm = nn.LayerNorm(hidden_size)  # LN3

    def forward(self, items: Tensor, valid: Tensor, last_only: bool = True) -> Tensor:
        """Hidden states of the last position ``(B, 1, d)`` (``last_only``) or of all ``(B, L, d)``.

        Args:
            items: item embeddings ``E[S]`` ``(B, L, d)``, left-padded histories.
            valid: BoolTensor ``(B, L)``, True at real items.
            last_only: compute only the row that is pooled (position ``L - 1``).
        """
        length = items.shape[1]
        if length > self.position_embedding.num_embeddings:
            raise ValueError(
                f"history length {length} exceeds the encoder's max_len {self.position_embedding.num_embeddings}"
            )
        keep = valid.unsqueeze(-1).to(items.dtype)  # (B, L, 1)
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, L): 0 = oldest real item
        x = self.embedding_dropout(items + self.position_embedding(positions)) * keep  # (B, L, d)
        q = self.query_norm(x)  # (B, L, d): LN1
        if last_only:
            q = q[:, -1:]  # (B, 1, d)
        scores = self.query(q) @ self.key(x).transpose(1, 2) / math.sqrt(self.hidden_size)  # (B, Lq, L)
        fill = max(REFERENCE_MASK_FILL, torch.finfo(scores.dtype).min)
        key_padding = (x.sum(dim=-1) == 0).unsqueeze(1)  # (B, 1, L): the reference's "row sum is 0"
        scores = scores.masked_fill(key_padding, fill)
        if not last_only:  # the last query may see every key; earlier ones only the past
            future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(diagonal=1)
            scores = scores.masked_fill(future, fill)
        weights = torch.softmax(scores, dim=-1)  # (B, Lq, L)
        weights = weights * (q.sum(dim=-1, keepdim=True) != 0).to(weights.dtype)  # query masking
        attended = self.attention_dropout(weights) @ self.value(x) + q  # (B, Lq, d): residual on LN1(x)
        r = self.ffn_input_norm(attended)  # LN2
        f = self.ffn_norm(self.ffn_dropout(self.ffn_out(F.relu(self.ffn_in(r)))) + r)  # (B, Lq, d)
        return self.output_norm(f * keep[:, -q.shape[1] :])  # (B, Lq, d): LN3


@dataclass(frozen=True)
class _SamplingTables:
    """What one evaluation reuses across batches; rebuilt whenever the weights may have changed."""

    device: torch.device
    time_table: Tensor  # (T, d): temb_i for every step
    # mlp1 only: x0_hat = x @ weight_x + step_bias[i] + (guided condition) @ weight_h
    weight_x: Tensor | None  # (d, d), transposed for x @ W
    weight_h: Tensor | None  # (d, d)
    step_bias: Tensor | None  # (T, d): W_t temb_i + b


class DreamRec(SeqRecModel):
    """DreamRec with the faithful encoder, x0-predicting denoiser, CFG and retrieval (module docstring).

    Args:
        num_items: N (linked from the data).
        max_len: history length L (linked from the data); sizes the position table.
        hidden_size: d (even, >= 4: the sinusoidal time embedding needs it).
        timesteps: T, the number of diffusion steps.
        beta_schedule: ``linear``, ``cosine``, ``exp`` or ``sqrt`` (the reference's ``*_beta_schedule``).
        beta_start: first beta of the linear schedule.
        beta_end: last beta of the linear schedule.
        guidance_weight: w in ``(1 + w) f(x, h) - w f(x, ∅)``.
        uncond_prob: p, the CFG dropout rate: probability that a training row's ``h`` becomes ``∅``.
        dropout: encoder dropout (embedding, attention, FFN).
        stop_target_gradient: diffuse ``sg(E[target])`` (default) instead of the trainable
            ``E[target]`` of the reference (False), see the module docstring.
        target_norm: diffuse ``target_norm * E[y] / ||E[y]||`` and retrieve by the same normalised
            vectors (cosine ranking) instead of the raw rows (None, the reference); with trainable
            targets the loss can then no longer shrink them, see the module docstring.
        denoiser: ``mlp1`` (one linear layer, every README command) or ``mlp2``.
        encoder: ``faithful`` (the reference's T-enc); the only option so far.
        sampler: ``ddpm`` (exact, all T steps) or ``ddim`` (strided, approximate).
        ddim_steps: S, the DDIM steps (``sampler="ddim"`` only).
        ddim_eta: DDIM's eta (0 deterministic given the start; 1 with S = T equals DDPM).
        eval_seed: seed of the evaluation noise (keyed by history, see the module docstring).
        item_scope: ``trained`` (retrieve only items that occur in the training split) or ``all``
            (the reference: every item but PAD).
        retrieval_backend: :class:`~recbench.retrieval.ItemIndex` backend (``auto``: faiss when
            installed).
        popularity_prior: weight of ``log(1 + training count)`` added to retrieval scores (0: off).
        ranking_weight: lambda of the ranking term added to the MSE (0: off, the reference), see
            :meth:`ranking_loss`.
        training_view: ``sequence`` (one encoder pass per user window, every target at once;
            default) or ``pairs`` (one pass per target, the reference), see the module docstring.
        lr, weight_decay, ks, decay_epochs: see :class:`~recbench.model.SeqRecModel`. The
            reference uses Adam/AdamW with eps 1e-8 and weight decay 0 (identical optimisers then).
    """

    def __init__(
        self,
        num_items: int,
        max_len: int = 50,
        hidden_size: int = 64,
        timesteps: int = 200,
        beta_schedule: ScheduleName = "exp",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        guidance_weight: float = 2.0,
        uncond_prob: float = 0.1,
        dropout: float = 0.1,
        stop_target_gradient: bool = True,
        target_norm: float | None = None,
        denoiser: DenoiserKind = "mlp1",
        encoder: EncoderKind = "faithful",
        sampler: SamplerKind = "ddpm",
        ddim_steps: int = 50,
        ddim_eta: float = 0.0,
        eval_seed: int = 0,
        item_scope: ItemScope = "trained",
        retrieval_backend: Backend = "auto",
        popularity_prior: float = 0.0,
        ranking_weight: float = 0.0,
        training_view: TrainingView = "sequence",
        lr: float = 5e-3,
        weight_decay: float = 0.0,
        ks: Sequence[int] = DEFAULT_KS,
        decay_epochs: int | None = None,
    ) -> None:
        super().__init__(num_items, max_len, lr, weight_decay, ks, decay_epochs)
        self.save_hyperparameters()
        if hidden_size % 2 or hidden_size < 4:
            raise ValueError(f"hidden_size must be even and >= 4, got {hidden_size}")
        if not 0.0 <= uncond_prob < 1.0:
            raise ValueError(f"uncond_prob must be in [0, 1), got {uncond_prob}")
        if denoiser not in ("mlp1", "mlp2"):
            raise ValueError(f"denoiser must be mlp1 or mlp2, got {denoiser!r}")
        if encoder != "faithful":
            raise ValueError(f"encoder must be 'faithful', got {encoder!r}")
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be ddpm or ddim, got {sampler!r}")
        if sampler == "ddim" and not 1 <= ddim_steps <= timesteps:
            raise ValueError(f"ddim_steps must be in [1, timesteps={timesteps}], got {ddim_steps}")
        if item_scope not in ("trained", "all"):
            raise ValueError(f"item_scope must be trained or all, got {item_scope!r}")
        if popularity_prior < 0:
            raise ValueError(f"popularity_prior must be >= 0, got {popularity_prior}")
        self.popularity_prior = popularity_prior
        if ranking_weight < 0:
            raise ValueError(f"ranking_weight must be >= 0, got {ranking_weight}")
        self.ranking_weight = ranking_weight
        if training_view not in ("sequence", "pairs"):
            raise ValueError(f"training_view must be sequence or pairs, got {training_view!r}")
        self.training_view = training_view  # type: ignore[misc]  # per instance: the datamodule asks it
        self.hidden_size = hidden_size
        self.guidance_weight = guidance_weight
        self.uncond_prob = uncond_prob
        self.stop_target_gradient = stop_target_gradient
        if target_norm is not None and target_norm <= 0:
            raise ValueError(f"target_norm must be > 0 or None, got {target_norm}")
        self.target_norm = target_norm
        self.denoiser_kind: DenoiserKind = denoiser
        self.sampler: SamplerKind = sampler
        self.ddim_steps = ddim_steps
        self.ddim_eta = ddim_eta
        self.eval_seed = eval_seed
        self.item_scope: ItemScope = item_scope
        self.retrieval_backend: Backend = retrieval_backend

        d = hidden_size
        # One table: encoder input, diffusion target and retrieval keys (as in the reference).
        self.item_embedding = nn.Embedding(num_items + 1, d)
        nn.init.normal_(self.item_embedding.weight, 0.0, 1.0)
        self.null_condition = nn.Parameter(torch.randn(d))  # ∅, learned
        self.encoder = FaithfulTEnc(d, max_len, dropout)
        self.time_mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        if denoiser == "mlp1":
            self.denoiser: nn.Module = nn.Linear(3 * d, d)
        else:
            self.denoiser = nn.Sequential(nn.Linear(3 * d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.diffusion = GaussianDiffusion.from_schedule(beta_schedule, timesteps, beta_start, beta_end)
        # Items that occur in the training split, from the datamodule in setup(); a persistent
        # buffer so that a checkpoint evaluates the same way without its datamodule. All False =
        # not known yet.
        self.register_buffer("train_items", torch.zeros(num_items + 1, dtype=torch.bool))
        self.register_buffer("log_train_counts", torch.zeros(num_items + 1))  # the prior's log(1 + n_j)
        self._tables: _SamplingTables | None = None
        self._index: ItemIndex | None = None

    # ------------------------------------------------------------------ networks
    def condition(self, history: Tensor) -> Tensor:
        """The history encoding ``h`` ``(B, d)`` pooled at the last position (no CFG dropout)."""
        valid = history != PAD_ID  # (B, L)
        items = self.item_embedding(history)  # (B, L, d)
        return self.encoder(items, valid, last_only=True)[:, -1]  # (B, d): left padding, newest last

    def cfg_dropout(self, h: Tensor) -> Tensor:
        """Training only: each row of ``h`` ``(B, d)`` becomes ``∅`` with probability ``p``; eval: ``h``.

        Draws from the global RNG (seeded by Lightning), one uniform per row as the reference does.
        """
        if not self.training or self.uncond_prob == 0.0:
            return h
        drop = torch.rand(h.shape[0], device=h.device) < self.uncond_prob  # (B,)
        return torch.where(drop.unsqueeze(1), self.null_condition.to(h.dtype).expand_as(h), h)

    def time_embedding(self, t: Tensor) -> Tensor:
        """``temb = MLP(sinusoid(t))`` ``(B, d)`` for integer steps ``t`` ``(B,)``."""
        return self.time_mlp(sinusoidal_time_embedding(t, self.hidden_size).to(self.null_condition.dtype))

    def denoise(self, x_t: Tensor, cond: Tensor, temb: Tensor) -> Tensor:
        """``x̂0 = f([x_t; c; temb])`` ``(B, d)`` from ``x_t``, a condition and a time embedding, each (B, d)."""
        return self.denoiser(torch.cat([x_t, cond, temb], dim=-1))

    # ------------------------------------------------------------------ training
    def loss(self, batch: Batch) -> Tensor:
        """x0-prediction MSE (the reference's ``diffusion.p_losses``), averaged over the batch's targets; either view."""
        self.clear_sampling_cache()  # the weights are about to change
        weight = None
        if SEQUENCE in batch:  # one causal pass per window gives h for every target position
            sequence = batch[SEQUENCE]  # (B, L' + 1), trimmed by the datamodule
            inputs, targets = sequence[:, :-1], sequence[:, 1:]  # (B, L') each
            valid = inputs != PAD_ID  # (B, L'): left padding, so a real input has a real next item
            hidden = self.encoder(self.item_embedding(inputs), valid, last_only=False)  # (B, L', d)
            if hidden.device.type == "cpu":  # real rows only, row-major as pairs would come
                h, target = hidden[valid], targets[valid]  # (M, d), (M,)
            else:  # selecting rows costs a host sync on GPU: keep the grid, weigh padding 0
                h, target, weight = hidden.flatten(0, 1), targets.flatten(), valid.flatten().to(hidden.dtype)
        else:
            h, target = self.condition(batch[HISTORY]), batch[TARGET]  # (B, d), (B,)
        x0 = self.target_vectors(self.item_embedding(target))  # (M, d)
        if self.stop_target_gradient:  # the reference lets the loss shrink its own targets
            x0 = x0.detach()
        h = self.cfg_dropout(h)  # one uniform per target, then t and eps per target
        predictions: list[Tensor] = []  # x̂0 (M, d), for the ranking term

        def denoiser(x_t: Tensor, cond: Tensor, t: Tensor) -> Tensor:
            predictions.append(self.denoise(x_t, cond, self.time_embedding(t)))
            return predictions[-1]

        loss = self.diffusion.training_loss(denoiser, x0, h, weight=weight)
        if self.ranking_weight > 0:
            loss = loss + self.ranking_weight * self.ranking_loss(predictions[0], target, weight)
        return loss

    def ranking_loss(self, x0_hat: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        """Softmax cross-entropy of the retrieval scores ``x̂0 · K_j`` ``(M, d)`` over the retrievable
        items (``K`` = :meth:`target_vectors` of the table, with gradient), averaged over the targets of
        ``weight`` 1 (0/1 as in the MSE), chunked: no ``(M, N)`` scores. Not in DreamRec; DiffuRec's loss."""
        keys = self.target_vectors(self.item_embedding.weight)  # (N + 1, d)
        # (N + 1,): a mask, not retrievable_items(), which reads the host (a sync per step on GPU)
        blocked = ~self.train_items if self.item_scope == "trained" else torch.zeros_like(self.train_items)
        blocked[PAD_ID] = True
        labels = target if weight is None else torch.where(weight > 0, target, IGNORE_INDEX)  # (M,)
        return linear_cross_entropy(x0_hat, keys, labels, excluded=blocked)

    def target_vectors(self, rows: Tensor) -> Tensor:
        """Diffusion targets and retrieval keys ``(..., d)`` from item-table rows: the rows themselves,
        or rescaled to ``target_norm``."""
        if self.target_norm is None:
            return rows
        return F.normalize(rows, dim=-1) * self.target_norm

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        # The table is a diffusion target (without stop-gradient in the reference): watch its scale.
        with torch.no_grad():
            norms = self.item_embedding.weight.norm(dim=1)  # (N + 1,)
            trained = self.train_items  # PAD is never set (set_train_items)
            if bool(trained.any()):
                self.log("train/item_norm_trained", norms[trained].mean())
            untrained = ~trained
            untrained[PAD_ID] = False
            if bool(untrained.any()):
                self.log("train/item_norm_untrained", norms[untrained].mean())

    # ------------------------------------------------------------------ item scope and caches
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if isinstance(datamodule, SeqRecDataModule):
            self.set_train_items(datamodule.train_item_mask(), datamodule.train_item_counts())

    def set_train_items(self, mask: Tensor, counts: Tensor | None = None) -> None:
        """Set the items of the training split (BoolTensor ``(N + 1,)``), used by ``item_scope="trained"``,
        and optionally their training counts ``(N + 1,)``, used by ``popularity_prior``."""
        if mask.shape != self.train_items.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"train item mask must be a bool tensor of shape {tuple(self.train_items.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        with torch.no_grad():
            self.train_items.copy_(mask)
            self.train_items[PAD_ID] = False
            if counts is not None:
                self.log_train_counts.copy_(torch.log1p(counts.float()))
        self.clear_sampling_cache()

    def retrievable_items(self) -> Tensor:
        """BoolTensor ``(N + 1,)`` of items that ``recommend`` may return (PAD never)."""
        if self.item_scope == "all":
            allowed = torch.ones_like(self.train_items)
        else:
            if not bool(self.train_items.any()):
                raise RuntimeError(
                    "item_scope='trained' needs the training items: fit/test through a SeqRecDataModule, "
                    "load a checkpoint that has them, or call set_train_items(mask)"
                )
            allowed = self.train_items.clone()
        allowed[PAD_ID] = False
        return allowed

    def clear_sampling_cache(self) -> None:
        """Drop the per-evaluation tables and index; call after changing weights by hand. Training
        steps, every evaluation epoch's start and checkpoint loading call it (never stale tables)."""
        self._tables = None
        self._index = None

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.clear_sampling_cache()

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self.clear_sampling_cache()

    def on_predict_epoch_start(self) -> None:
        super().on_predict_epoch_start()
        self.clear_sampling_cache()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # Checkpoints from before popularity_prior lack the counts: zeros, and the prior refuses them.
        checkpoint["state_dict"].setdefault("log_train_counts", torch.zeros_like(self.log_train_counts))
        self.clear_sampling_cache()

    @torch.no_grad()
    def _sampling_tables(self) -> _SamplingTables:
        """Time table and mlp1 split weights, built once per evaluation (exact speed-ups 2-3)."""
        device = self.item_embedding.weight.device
        if self._tables is not None and self._tables.device == device:
            return self._tables
        T, d = self.diffusion.num_timesteps, self.hidden_size
        time_table = precompute_time_table(self.time_mlp, T, d, device).float()  # (T, d)
        weight_x = weight_h = step_bias = None
        if self.denoiser_kind == "mlp1":
            assert isinstance(self.denoiser, nn.Linear)
            w = self.denoiser.weight.float()  # (d, 3d): [W_x | W_h | W_t], the order of the concat
            weight_x, weight_h = w[:, :d].T.contiguous(), w[:, d : 2 * d].T.contiguous()  # (d, d) each
            step_bias = time_table @ w[:, 2 * d :].T + self.denoiser.bias.float()  # (T, d)
        self._tables = _SamplingTables(device, time_table, weight_x, weight_h, step_bias)
        return self._tables

    @torch.no_grad()
    def item_index(self) -> ItemIndex:
        """The nearest-item index over ``E`` restricted to :meth:`retrievable_items`, built once per evaluation."""
        table = self.item_embedding.weight
        if self._index is None or self._index.table.device != table.device:
            bias = None
            if self.popularity_prior > 0:
                if not bool(self.log_train_counts.any()):
                    raise RuntimeError("popularity_prior needs training counts: set_train_items(mask, counts)")
                bias = self.popularity_prior * self.log_train_counts
            self._index = ItemIndex(
                self.target_vectors(table.float()), self.retrievable_items(), self.retrieval_backend, item_bias=bias
            )
        return self._index

    # ------------------------------------------------------------------ sampling
    def _guided_x0(self, h: Tensor, path: SamplingPath) -> Callable[[Tensor, Tensor], Tensor]:
        """The CFG x0-predictor ``(x (B, d), t (B,)) -> (1 + w) f(x, h, t) - w f(x, ∅, t)``."""
        w = self.guidance_weight
        null = self.null_condition.float()  # (d,)
        if path == "naive":  # the reference: two calls per step, the time MLP at every step

            def denoise_on_the_fly(x: Tensor, cond: Tensor, t: Tensor) -> Tensor:
                return self.denoise(x, cond, self.time_embedding(t))

            return classifier_free_x0(denoise_on_the_fly, h, null, w, batched=False)
        tables = self._sampling_tables()
        if self.denoiser_kind == "mlp2":  # fused = both branches as one 2B batch, time table lookup

            def denoise_from_table(x: Tensor, cond: Tensor, t: Tensor) -> Tensor:
                return self.denoise(x, cond, tables.time_table[t])

            return classifier_free_x0(denoise_from_table, h, null, w, batched=True)
        # mlp1 is affine: CFG collapses to one matmul per step with a guided condition term.
        assert tables.weight_x is not None and tables.weight_h is not None and tables.step_bias is not None
        weight_x, step_bias = tables.weight_x, tables.step_bias
        condition_term = ((1 + w) * h - w * null) @ tables.weight_h  # (B, d), once per batch

        def guided_x0(x: Tensor, t: Tensor) -> Tensor:
            # t is one step for the whole batch; t[:1] indexes without a host sync on a GPU.
            return torch.addmm(condition_term + step_bias[t[:1]], x, weight_x)  # (B, d)

        return guided_x0

    @torch.no_grad()
    def generate(
        self,
        history: Tensor,
        *,
        path: SamplingPath = "fused",
        sampler: SamplerKind | None = None,
        ddim_steps: int | None = None,
        ddim_eta: float | None = None,
    ) -> Tensor:
        """Generate the oracle item embedding ``x0`` ``(B, d)`` for each history ``(B, L)``.

        Float32 whatever the autocast context (500 chained steps in bf16 would drift).

        Args:
            history: left-padded histories.
            path: ``fused`` (exact speed-ups) or ``naive`` (the reference's per-step loop, for
                benchmarks and tests); both give the same samples up to float rounding.
            sampler, ddim_steps, ddim_eta: override the model's settings for this call.
        """
        sampler = sampler or self.sampler
        steps = ddim_steps if ddim_steps is not None else self.ddim_steps
        eta = ddim_eta if ddim_eta is not None else self.ddim_eta
        device = history.device
        with float32_scores(device):
            h = self.condition(history).float()  # (B, d): no CFG dropout at evaluation
            guided = self._guided_x0(h, path)
            noise = KeyedNoise(sequence_keys(history, PAD_ID), self.eval_seed)
            shape = (history.shape[0], self.hidden_size)
            if sampler == "ddpm":
                return ddpm_sample(self.diffusion, guided, shape, noise, device=device, dtype=torch.float32)
            return ddim_sample(
                self.diffusion, guided, shape, noise, steps, eta, device=device, dtype=torch.float32
            )

    @torch.no_grad()
    def recommend(self, history: Tensor, k: int) -> Tensor:
        x0 = self.generate(history)  # (B, d)
        _, items = self.item_index().search(x0, k)  # (B, k); PAD never, 0 = no item left
        return items

    # ------------------------------------------------------------------ descriptions for result rows
    @property
    def sampling_is_exact(self) -> bool:
        """True for DDPM over all T steps (and DDIM that reduces to it: S = T, eta = 1)."""
        T = self.diffusion.num_timesteps
        return self.sampler == "ddpm" or (self.ddim_steps == T and self.ddim_eta == 1.0)

    def sampler_description(self) -> str:
        """One line for result rows: the sampler, whether it is exact, guidance and the noise seed."""
        T = self.diffusion.num_timesteps
        common = f"w={self.guidance_weight:g}, noise keyed by history with eval_seed={self.eval_seed}"
        if self.sampler == "ddpm":
            return f"ddpm exact: all T={T} steps, {common}"
        label = "exact (equals DDPM)" if self.sampling_is_exact else "APPROXIMATE"
        return f"ddim {label}: {self.ddim_steps} of T={T} steps, eta={self.ddim_eta:g}, {common}"

    def retrieval_description(self) -> str:
        """One line for result rows: the index backend and the item scope."""
        allowed = int(self.retrievable_items().sum())
        backend = self.item_index().describe()
        prior = f", popularity_prior={self.popularity_prior:g}" if self.popularity_prior else ""
        return f"{backend}, item_scope={self.item_scope} ({allowed} of {self.num_items} items){prior}"

    def run_notes(self) -> dict[str, object]:
        """Recorded in every result row: sampler (exact or approximate), noise seed, retrieval."""
        return {
            "sampler": self.sampler_description(),
            "sampling_exact": self.sampling_is_exact,
            "eval_seed": self.eval_seed,
            "retrieval": self.retrieval_description(),
            "training_view": (
                "sequence: one causal encoder pass per user window, loss over every target position"
                if self.training_view == "sequence"
                else "pairs: one encoder pass per (history, target) pair (the reference)"
            ),
        }
