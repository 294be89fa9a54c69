"""Diffusion machinery shared by the generative recommenders (diffusers-style split).

Schedules, forward processes and samplers live here; networks live in ``baselines/``. A sampler
never owns a network: it receives a callable and only calls it. This module has two sections:

* **Gaussian diffusion** (DreamRec): beta schedules, the forward process
  ``q(x_i | x_0)``, the x0-prediction training loss, DDPM ancestral sampling, strided DDIM, and
  classifier-free guidance (CFG) helpers.
* **Masked discrete diffusion** (DiffGRM): a target of ``n`` discrete positions
  (semantic-ID digits) is noised by masking positions; helpers build the masked *views* a
  denoiser trains on (nested views from a confidence or random order, Bernoulli views), score
  positions by confidence, compute the masked-position loss, and decode with the
  confidence-guided parallel denoising (CPD) beam. The DiffGRM network lives in
  ``baselines/diffgrm.py``.

Conventions
-----------
Diffusion steps are indexed ``i = 0 .. T-1`` (``T`` = ``num_timesteps``), as in DreamRec:
``alpha_i = 1 - beta_i``, ``abar_i = prod_{j<=i} alpha_j`` and ``abar_{-1} := 1`` (so the last
reverse step ``i = 0`` returns ``x0_hat`` itself). All schedule arithmetic is done in float64 on
the CPU and cast once to the working dtype, so float32 buffers carry no accumulated cumprod error.

The network interface for sampling is an *x0-predictor with guidance already applied*::

    guided_x0(x_t: Tensor[B, *D], t: LongTensor[B]) -> Tensor[B, *D]

The samplers always pass ``t`` as a LongTensor of shape ``(B,)`` (every entry equal, an expanded
view of a single step index, so it costs no allocation), which is the same type a network sees
during training, so one ``forward`` serves both. For training, ``GaussianDiffusion.training_loss``
takes ``denoiser(x_t, cond, t) -> x0_hat``.

Randomness
----------
Nothing here touches a hidden global RNG at sampling time: every sampler takes a
``torch.Generator``. Noise is drawn on the generator's device (a CPU generator therefore gives the
same numbers whatever device the chain runs on; a generator on the chain's device avoids one small
host-to-device copy per step) and then moved to the chain's device. Draw order, documented because
two samplers that consume the same numbers in the same order give the same outputs:

* ``ddpm_sample``: one ``randn(shape)`` for the start ``x_{T-1}``, then one ``randn(shape)`` per
  step ``i = T-1, ..., 1`` (none at ``i = 0``).
* ``ddim_sample``: one ``randn(shape)`` for the start, then, only if ``eta > 0``, one
  ``randn(shape)`` per step except the last. With ``num_steps = T`` and ``eta = 1`` this is
  exactly DDPM's order, and the two samplers then agree sample-for-sample (not only in
  distribution), up to float rounding.

The numbers also depend on the dtype they are drawn in (``randn`` in float32 and float64 differ).

Instead of a ``torch.Generator`` the samplers also accept a :class:`KeyedNoise`: counter-based
noise whose row ``r`` is a pure function of ``(seed, key_r, draw number)``. With it a row's sample
does not depend on the batch it shares (batch size, order, DDP rank), which is what an evaluation
needs to be reproducible across batch sizes and process counts. The draw order above is the same.

Exact speed-ups (DreamRec)
-----------------------------------------
"Exact" means: same outputs given the same noise, up to float rounding (a matmul over a batch of
a different size may round differently). Which ones this module provides or enables:

1. **Large batches.** The samplers are batched over ``B``; the chain state is only ``B x d``, so a
   whole validation split can be one batch. Rows never interact, so batch size changes nothing
   but the number of sequential steps.
2. **Precomputed time embeddings.** ``precompute_time_table`` runs the time MLP once over all
   ``T`` steps (a ``T x d`` table); the network then indexes the table instead of recomputing a
   sinusoid and an MLP at every step.
3. **Precomputed per-step coefficients.** ``GaussianDiffusion`` holds ``c1, c2, sigma`` as device
   buffers; ``ddim_sample`` builds its per-step coefficient table once per call in float64.
4. **Fused conditional/unconditional calls.** ``classifier_free_x0(..., batched=True)`` runs the
   two CFG branches as one ``2B`` batch (exact for row-wise networks, e.g. ``mlp2``). For an
   affine denoiser such as DreamRec's ``mlp1``,
   ``x0_hat = W_x x + W_h h + W_t temb + b``, CFG collapses into a single call:
   ``(1+w) f(x,h,t) - w f(x,null,t) = W_x x + W_t temb + b + W_h ((1+w) h - w null)``,
   i.e. one matmul per step with a guided condition computed once per batch. That fusion belongs
   to the model (``baselines/dreamrec.py``); ``tests/test_diffusion.py`` checks it against the
   two-call path with the same generator.

**Approximate** (changes the distribution; label results that use it): ``ddim_sample`` with
``num_steps < T`` or ``eta != 1``. Report the exact ``T``-step DDPM result as primary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# =================================================================================================
# Gaussian diffusion
# =================================================================================================

ScheduleName = Literal["linear", "cosine", "exp", "sqrt"]

#: ``guided_x0(x_t (B, *D), t (B,)) -> x0_hat (B, *D)``: an x0-predictor with CFG already applied.
X0Predictor = Callable[[Tensor, Tensor], Tensor]

#: ``denoiser(x_t (B, *D), cond (B, ...), t (B,)) -> x0_hat (B, *D)``: the raw conditional network.
Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]


# ------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------


def beta_schedule(
    name: ScheduleName,
    timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> Tensor:
    r"""Noise schedule ``beta_i``, ``i = 0 .. T-1``, exactly as DreamRec's ``*_beta_schedule`` functions.

    Computed and **returned in float64** on the CPU (``GaussianDiffusion`` casts once, after all
    products and square roots, so float32 buffers inherit no cumprod error).

    * ``"linear"``: ``beta_i = linspace(beta_start, beta_end, T)``. ``beta_start``/``beta_end``
      are used by this schedule only.
    * ``"cosine"`` (Nichol & Dhariwal, ``s = 0.008``): ``abar(u) = cos^2(((u/T)+s)/(1+s) * pi/2)``
      for ``u = 0..T``, normalised by ``abar(0)``; ``beta_i = 1 - abar(i+1)/abar(i)`` clipped to
      ``[1e-4, 0.9999]``. (The upper clip makes ``abar_{T-1}`` about 6e-11 at ``T = 2000``.)
    * ``"exp"`` (VP-SDE-like, ``beta_min = 0.1``, ``beta_max = 10``): with the reference's grid
      ``x = linspace(1, 2T+1, T)`` (step ``2T/(T-1)``, not 2: a faithful quirk of the reference),
      ``beta_i = 1 - exp(-beta_min/T - x_i (beta_max - beta_min) / (2 T^2))``.
      For ``T = 500``: ``beta`` from 2.2e-4 to 0.0198, ``abar_{T-1}`` about 0.0064.
    * ``"sqrt"``: ``abar(u) = 1 - sqrt(u + 1e-4)``; ``beta_i = min(1 - abar((i+1)/T)/abar(i/T),
      0.999)``.

    Args:
        name: schedule name.
        timesteps: ``T >= 1``, the number of diffusion steps.
        beta_start: first beta of the linear schedule.
        beta_end: last beta of the linear schedule.

    Returns:
        ``Tensor[T]``, float64, CPU.
    """
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    T = timesteps
    f64 = torch.float64
    if name == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=f64)
    if name == "cosine":
        s = 0.008
        u = torch.arange(T + 1, dtype=f64)  # (T+1,)
        abar = torch.cos(((u / T) + s) / (1 + s) * math.pi / 2) ** 2
        abar = abar / abar[0]
        return (1 - abar[1:] / abar[:-1]).clamp(1e-4, 0.9999)
    if name == "exp":
        beta_min, beta_max = 0.1, 10.0
        x = torch.linspace(1, 2 * T + 1, T, dtype=f64)  # the reference's grid, reproduced as is
        return 1 - torch.exp(-beta_min / T - x * (beta_max - beta_min) / (2 * T * T))
    if name == "sqrt":
        i = torch.arange(T, dtype=f64)

        def abar_fn(u: Tensor) -> Tensor:
            return 1 - torch.sqrt(u + 1e-4)

        return (1 - abar_fn((i + 1) / T) / abar_fn(i / T)).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {name!r}; expected linear, cosine, exp or sqrt")


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------


def _randn(
    shape: Sequence[int],
    generator: torch.Generator | KeyedNoise | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """Standard normal noise; drawn on the generator's device, then moved (see module doc).

    A :class:`KeyedNoise` source gives its next counter-based draw instead (same shape contract).
    """
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    if isinstance(generator, KeyedNoise):
        return generator.next(shape, dtype).to(device)
    z = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype)
    return z.to(device)


def _randint(
    high: int, shape: Sequence[int], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Uniform integers in ``[0, high)``, drawn like ``_randn``."""
    if generator is None:
        return torch.randint(0, high, tuple(shape), device=device)
    t = torch.randint(0, high, tuple(shape), generator=generator, device=generator.device)
    return t.to(device)


# ------------------------------------------------------------------------------------------------
# Keyed (counter-based) noise: reproducible per row, whatever the batch
# ------------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def mix32(x: Tensor) -> Tensor:
    """A 32-bit avalanche hash applied elementwise (C. Wellons' improved ``lowbias32``).

    ``x``: int64 holding values in ``[0, 2^32)``; returns the same. Both multipliers are below
    ``2^31``, so every product is below ``2^63`` and the int64 arithmetic is exact (no reliance on
    overflow wrapping, which is undefined for signed integers in C++).
    """
    x = x ^ (x >> 16)  # a new tensor: the rest works in place on it, never on the input
    x.mul_(0x21F0AAAD).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 15)
    x.mul_(0x735A2D97).bitwise_and_(_MASK32)
    return x.bitwise_xor_(x >> 15)


def sequence_keys(sequences: Tensor, pad_id: int = 0) -> Tensor:
    """One 32-bit key per row of a left-padded id matrix, folded over its non-pad ids in order.

    ``key = fold(mix32(key ^ id))`` over the row's real ids, oldest first, starting from a fixed
    constant; padding is skipped, so the key does not depend on how much left padding there is.
    Rows with the same ids in the same order get the same key.

    Args:
        sequences: LongTensor ``(B, L)``, ids in ``[0, 2^32)``.
        pad_id: the id that is skipped.

    Returns:
        int64 ``(B,)`` in ``[0, 2^32)``.
    """
    key = torch.full((sequences.shape[0],), 0x9E3779B9, dtype=torch.int64, device=sequences.device)
    for column in sequences.long().unbind(dim=1):  # L small ops on (B,): cheap, once per batch
        key = torch.where(column != pad_id, mix32(key ^ (column & _MASK32)), key)
    return key


class KeyedNoise:
    r"""Counter-based standard normal noise whose row ``r`` depends only on ``(seed, keys[r], n)``.

    A drop-in noise source for ``ddpm_sample`` / ``ddim_sample`` (pass it as ``generator``). Draw
    number ``n = 0, 1, ...`` of shape ``(B, *D)`` has, at row ``r`` and flat feature ``j``:

    .. math::

        u = \frac{(\mathrm{mix32}(\rho_r \oplus \gamma_{n,j}) \gg 8) + 1/2}{2^{24}}, \qquad
        z = \sqrt 2\,\operatorname{erfinv}(2u - 1) \sim \mathcal N(0, 1),

    with row hash ``rho_r = mix32(mix32(keys[r]) ^ s1)`` and column hash
    ``gamma_{n,j} = mix32(mix32(n * F + j) ^ s2)`` (``F = prod(D)``; ``s1, s2`` derived from
    ``seed``). So a row's noise does not depend on which other rows share its batch, on the batch
    size, or on the process that evaluates it: a sampler fed ``KeyedNoise`` gives every row the
    same sample whatever the batching (up to float rounding), where a ``torch.Generator`` would
    hand row ``r`` whatever numbers come ``r``-th in the stream. Rows with equal keys get equal
    noise (for a recommender keyed by history: identical histories, identical samples).

    Precision: 24-bit uniforms, so ``|z| <= 5.42`` (the normal's mass beyond is ``6e-8``). Cost on a
    CPU about 2x ``torch.randn`` (int64 elementwise ops, in cache-sized row blocks); a few
    small kernels on a GPU.

    Args:
        keys: int64 ``(B,)`` row keys (e.g. from :func:`sequence_keys`); fixes ``B`` and the device.
        seed: any int; different seeds give unrelated noise.
    """

    def __init__(self, keys: Tensor, seed: int) -> None:
        if keys.dim() != 1:
            raise ValueError(f"keys must be 1-D (B,), got shape {tuple(keys.shape)}")
        seed_hash = mix32(torch.tensor([seed & _MASK32, (seed >> 32) & _MASK32], dtype=torch.int64))
        s1, s2 = (int(v) for v in mix32(seed_hash ^ torch.tensor([0x85EBCA6B, 0x27D4EB2F])))
        self.seed = seed
        self._rows = mix32(mix32(keys.long() & _MASK32) ^ s1)  # (B,)
        self._s2 = s2
        self.draws = 0

    @property
    def device(self) -> torch.device:
        return self._rows.device

    def next(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """Draw number ``self.draws`` (then advance): ``(B, *D)`` standard normal noise."""
        shape = tuple(shape)
        if shape[0] != self._rows.shape[0]:
            raise ValueError(f"KeyedNoise holds {self._rows.shape[0]} row keys, asked for shape {shape}")
        features = math.prod(shape[1:])
        counter = self.draws * features + torch.arange(features, device=self.device)  # (F,)
        columns = mix32(mix32(counter & _MASK32) ^ self._s2)  # (F,)
        self.draws += 1
        rows = self._rows
        if rows.device.type != "cpu" or rows.numel() * features <= self._CPU_CHUNK:
            return self._normal(rows, columns).reshape(shape).to(dtype)
        # On a CPU the ~15 elementwise passes are memory-bound: row blocks that stay in cache are
        # about twice as fast (measured). Values are per element, so blocking changes nothing.
        out = torch.empty(rows.numel(), features, dtype=torch.float32)
        step = max(1, self._CPU_CHUNK // features)
        for first in range(0, rows.numel(), step):
            out[first : first + step] = self._normal(rows[first : first + step], columns)
        return out.reshape(shape).to(dtype)

    #: Elements per block on a CPU (2 MiB of int64).
    _CPU_CHUNK = 1 << 18

    @staticmethod
    def _normal(rows: Tensor, columns: Tensor) -> Tensor:
        """``(R,)`` row hashes x ``(F,)`` column hashes -> ``(R, F)`` float32 N(0, 1)."""
        bits = mix32(rows.unsqueeze(1) ^ columns.unsqueeze(0))  # (R, F)
        # 2u - 1 = (2m + 1 - 2^24) / 2^24 with m the top 24 bits: an exact float32 in (-1, 1).
        centred = (bits >> 8).mul_(2).add_(1 - (1 << 24)).to(torch.float32).mul_(2.0**-24)
        return torch.special.erfinv(centred).mul_(math.sqrt(2.0))  # (R, F)


def _gather(coef: Tensor, t: Tensor | int, like: Tensor) -> Tensor:
    """``coef[t]`` shaped to broadcast against ``like`` of shape ``(B, *D)``.

    ``t`` is a Python int (one step for the whole batch: returns a 0-dim tensor) or a LongTensor
    ``(B,)`` (per-row steps: returns ``(B, 1, ..., 1)``).
    """
    coef = coef.to(device=like.device, dtype=like.dtype)
    if isinstance(t, int):
        return coef[t]
    return coef[t].reshape(t.shape[0], *([1] * (like.dim() - 1)))


# ------------------------------------------------------------------------------------------------
# Forward process, posterior, training loss
# ------------------------------------------------------------------------------------------------


class GaussianDiffusion(nn.Module):
    r"""Gaussian forward process and DDPM posterior for a fixed beta schedule.

    Holds, as non-persistent buffers (they follow ``.to(device)`` but are not written to
    checkpoints, since they are a pure function of the schedule), for ``i = 0 .. T-1``:

    * ``betas``, ``alphas = 1 - betas``, ``alphas_cumprod`` (``abar_i``),
      ``alphas_cumprod_prev`` (``abar_{i-1}``, with ``abar_{-1} = 1``),
      ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``;
    * posterior ``q(x_{i-1} | x_i, x_0) = N(c1_i x_0 + c2_i x_i, sigma_i^2 I)``:

      - ``posterior_mean_coef1`` ``c1_i = beta_i sqrt(abar_{i-1}) / (1 - abar_i)``
      - ``posterior_mean_coef2`` ``c2_i = (1 - abar_{i-1}) sqrt(alpha_i) / (1 - abar_i)``
      - ``posterior_variance`` ``sigma_i^2 = beta_i (1 - abar_{i-1}) / (1 - abar_i)`` and
        ``posterior_std`` ``sigma_i``. ``sigma_0 = 0`` (and unused: no noise is added at
        ``i = 0``); also ``c1_0 = 1``, ``c2_0 = 0``, so the last step returns ``x0_hat``.

    Everything is computed in float64 and cast to ``dtype``. ``alphas_cumprod_f64`` keeps a CPU
    float64 master copy (a plain attribute, not a buffer, so module dtype casts leave it intact)
    for samplers that build their own coefficient tables (DDIM).

    Args:
        betas: ``Tensor[T]`` with ``0 < beta_i < 1`` (e.g. from ``beta_schedule``).
        dtype: dtype of the buffers (float32 by default).
    """

    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    posterior_variance: Tensor
    posterior_std: Tensor

    def __init__(self, betas: Tensor, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        b = torch.as_tensor(betas).detach().to(device="cpu", dtype=torch.float64)
        if b.dim() != 1 or b.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(b.shape)}")
        if not bool(((b > 0) & (b < 1)).all()):
            raise ValueError("every beta must lie in the open interval (0, 1)")

        alphas = 1 - b
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        c1 = b * abar_prev.sqrt() / (1 - abar)
        c2 = (1 - abar_prev) * alphas.sqrt() / (1 - abar)
        var = b * (1 - abar_prev) / (1 - abar)

        self.alphas_cumprod_f64: Tensor = abar
        for name, value in (
            ("betas", b),
            ("alphas", alphas),
            ("alphas_cumprod", abar),
            ("alphas_cumprod_prev", abar_prev),
            ("sqrt_alphas_cumprod", abar.sqrt()),
            ("sqrt_one_minus_alphas_cumprod", (1 - abar).sqrt()),
            ("posterior_mean_coef1", c1),
            ("posterior_mean_coef2", c2),
            ("posterior_variance", var),
            ("posterior_std", var.sqrt()),
        ):
            self.register_buffer(name, value.to(dtype), persistent=False)

    @classmethod
    def from_schedule(
        cls,
        name: ScheduleName,
        timesteps: int,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        dtype: torch.dtype = torch.float32,
    ) -> GaussianDiffusion:
        """``GaussianDiffusion(beta_schedule(name, timesteps, beta_start, beta_end), dtype)``."""
        return cls(beta_schedule(name, timesteps, beta_start, beta_end), dtype=dtype)

    @property
    def num_timesteps(self) -> int:
        """``T``, the number of diffusion steps."""
        return int(self.betas.shape[0])

    def q_sample(self, x0: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        r"""Draw ``x_t ~ q(x_t | x_0)``: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

        Args:
            x0: clean data ``(B, *D)``.
            t: step(s): LongTensor ``(B,)`` or an int for the whole batch.
            noise: standard normal ``(B, *D)``; passed in so the caller owns the RNG.

        Returns:
            ``x_t``, ``(B, *D)``.
        """
        return (
            _gather(self.sqrt_alphas_cumprod, t, x0) * x0
            + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def p_mean(self, x0_hat: Tensor, x_t: Tensor, t: Tensor | int) -> Tensor:
        r"""Posterior mean with ``x0`` replaced by a prediction: ``c1_t x0_hat + c2_t x_t``.

        Args:
            x0_hat: predicted clean data ``(B, *D)``.
            x_t: current state ``(B, *D)``.
            t: step(s): LongTensor ``(B,)`` or an int.

        Returns:
            mean of ``x_{t-1}``, ``(B, *D)``.
        """
        return (
            _gather(self.posterior_mean_coef1, t, x_t) * x0_hat
            + _gather(self.posterior_mean_coef2, t, x_t) * x_t
        )

    def training_loss(
        self,
        denoiser: Denoiser,
        x0: Tensor,
        cond: Tensor,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        weight: Tensor | None = None,
    ) -> Tensor:
        r"""DreamRec's x0-prediction objective (``diffusion.p_losses``).

        ``t ~ Uniform{0..T-1}`` per row, ``eps ~ N(0, I)``,
        ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, and
        ``loss = mean_{b, d} (x0 - denoiser(x_t, cond, t))^2`` (mean over batch and all dims).

        Args:
            denoiser: ``(x_t (B, *D), cond (B, ...), t (B,)) -> x0_hat (B, *D)``. CFG dropout
                of ``cond`` is the caller's business (it is a property of the model).
            x0: clean targets ``(B, *D)``; gradients flow into it (DreamRec's item table is a
                target without stop-gradient; detach it yourself if you want).
            cond: the condition, passed through untouched.
            t: steps ``(B,)``; drawn uniformly when None.
            generator: RNG for ``t`` and ``noise``; None uses the global RNG (as Lightning's
                seeding expects during training). Draw order: ``t`` first, then ``noise``.
            noise: ``(B, *D)``; drawn when None.
            weight: ``(B,)`` row weights (e.g. 0 for padded rows of a grid, so a caller need not
                select the real rows, a host-device sync on GPU): the loss is then the weighted mean
                of the rows' mean squared errors. None = every row alike.

        Returns:
            scalar loss.
        """
        B = x0.shape[0]
        if t is None:
            t = _randint(self.num_timesteps, (B,), generator, x0.device)  # (B,)
        if noise is None:
            noise = _randn(x0.shape, generator, x0.device, x0.dtype)  # (B, *D)
        x_t = self.q_sample(x0, t, noise)  # (B, *D)
        x0_hat = denoiser(x_t, cond, t)  # (B, *D)
        if weight is None:
            return F.mse_loss(x0_hat, x0)
        per_row = (x0_hat - x0).pow(2).flatten(1).mean(1)  # (B,)
        return (per_row * weight).sum() / weight.sum().clamp(min=1e-12)


# ------------------------------------------------------------------------------------------------
# Samplers (network passed in as a callable)
# ------------------------------------------------------------------------------------------------


def _resolve(
    diffusion: GaussianDiffusion, device: torch.device | str | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    return (
        torch.device(device) if device is not None else diffusion.betas.device,
        dtype if dtype is not None else diffusion.betas.dtype,
    )


@torch.no_grad()
def ddpm_sample(
    diffusion: GaussianDiffusion,
    guided_x0: X0Predictor,
    shape: Sequence[int],
    generator: torch.Generator | KeyedNoise,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""DDPM ancestral sampling over all ``T`` steps (DreamRec's ``diffusion.sample``), x0-parameterised.

    ``x_{T-1} ~ N(0, I)``; for ``i = T-1, ..., 0``::

        x0_hat  = guided_x0(x_i, i)                      # CFG already inside
        mean    = c1_i x0_hat + c2_i x_i
        x_{i-1} = mean + sigma_i z,  z ~ N(0, I)        # i > 0
        return mean                                      # i = 0 (no noise; = x0_hat since c1_0=1, c2_0=0)

    No clipping of ``x0_hat``. Runs under ``torch.no_grad()``.

    Args:
        diffusion: schedule and posterior coefficients.
        guided_x0: ``(x (B, *D), t (B,)) -> x0_hat (B, *D)``; ``t`` is an expanded LongTensor.
        shape: ``(B, *D)``, e.g. ``(B, d)``.
        generator: the only noise source. Draw order: ``randn(shape)`` for ``x_{T-1}``, then one
            ``randn(shape)`` per step ``i = T-1 .. 1``.
        device: device of the chain (default: the diffusion buffers' device).
        dtype: dtype of the chain and of the noise (default: the buffers' dtype).

    Returns:
        ``x_0`` samples, ``shape``.
    """
    device, dtype = _resolve(diffusion, device, dtype)
    T, B = diffusion.num_timesteps, shape[0]
    # Per-step coefficient vectors on the chain's device, cast once (exact speed-up 3).
    c1 = diffusion.posterior_mean_coef1.to(device=device, dtype=dtype)  # (T,)
    c2 = diffusion.posterior_mean_coef2.to(device=device, dtype=dtype)  # (T,)
    sigma = diffusion.posterior_std.to(device=device, dtype=dtype)  # (T,)
    steps = torch.arange(T, device=device)  # (T,)

    x = _randn(shape, generator, device, dtype)  # x_{T-1}, (B, *D)
    for i in range(T - 1, -1, -1):
        x0_hat = guided_x0(x, steps[i].expand(B))  # (B, *D)
        mean = c1[i] * x0_hat + c2[i] * x  # (B, *D)
        if i > 0:
            x = mean + sigma[i] * _randn(shape, generator, device, dtype)  # x_{i-1}
        else:
            x = mean  # i = 0: no noise
    return x


def ddim_timesteps(num_timesteps: int, num_steps: int) -> Tensor:
    """Evenly spaced subset of ``0 .. T-1`` for strided DDIM, ascending, LongTensor ``(S,)``.

    ``tau = round(linspace(0, T-1, S))``: it always contains the first noisy step ``T-1`` (where
    ``x ~ N(0, I)`` is the right start) and ``0`` (so the last update is DDPM's ``i = 0`` step);
    the spacing is ``(T-1)/(S-1) >= 1``, so the rounded values are distinct, and ``S = T`` gives
    every step. ``S = 1`` gives ``[T-1]`` (one jump straight to ``x0_hat``).
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    if num_steps == 1:
        return torch.tensor([num_timesteps - 1], dtype=torch.long)
    grid = torch.linspace(0, num_timesteps - 1, num_steps, dtype=torch.float64)
    return torch.round(grid).long()


@torch.no_grad()
def ddim_sample(
    diffusion: GaussianDiffusion,
    guided_x0: X0Predictor,
    shape: Sequence[int],
    generator: torch.Generator | KeyedNoise,
    num_steps: int,
    eta: float = 0.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Strided DDIM (Song, Meng & Ermon 2021) for an x0-predicting network.

    Steps ``tau_{S-1} > ... > tau_0`` from ``ddim_timesteps(T, S)``. Going from ``t = tau_k`` to
    ``s = tau_{k-1}`` (``s = -1``, ``abar_{-1} = 1``, for the last update):

    .. math::

        \hat x_0 = f(x_t, t), \qquad
        \hat\epsilon = \frac{x_t - \sqrt{\bar\alpha_t}\,\hat x_0}{\sqrt{1-\bar\alpha_t}},

        \sigma_t(\eta) = \eta\,\sqrt{\frac{1-\bar\alpha_s}{1-\bar\alpha_t}}
                         \sqrt{1-\frac{\bar\alpha_t}{\bar\alpha_s}},

        x_s = \sqrt{\bar\alpha_s}\,\hat x_0
              + \sqrt{1-\bar\alpha_s-\sigma_t^2}\;\hat\epsilon + \sigma_t z .

    Implemented in the equivalent affine form ``x_s = a_k x0_hat + b_k x_t + sigma_k z`` with
    ``b_k = sqrt(1 - abar_s - sigma^2) / sqrt(1 - abar_t)`` and ``a_k = sqrt(abar_s) -
    b_k sqrt(abar_t)``, tabulated once in float64 (the radicand is clamped at 0 against rounding).

    **Relation to DDPM.** With ``S = T`` (so ``s = t - 1``) and ``eta = 1``:
    ``sigma_t^2 = beta_t (1 - abar_{t-1}) / (1 - abar_t)`` (DDPM's posterior variance), and
    ``sqrt(1 - abar_{t-1} - sigma_t^2) = (1 - abar_{t-1}) sqrt(alpha_t) / sqrt(1 - abar_t)``, so
    ``b = c2_t`` and ``a = sqrt(abar_{t-1}) - c2_t sqrt(abar_t) = c1_t``: the update *is* the DDPM
    step, with the same noise draws in the same order, hence the same distribution (and the same
    samples for the same generator, up to rounding). ``eta = 0`` is deterministic given the start
    ``x_{T-1}``. The last update always has ``abar_s = 1``, hence ``sigma = 0`` and returns
    ``x0_hat``.

    Approximate unless ``S = T`` and ``eta = 1``; label results accordingly.

    Args:
        diffusion: the schedule.
        guided_x0: ``(x (B, *D), t (B,)) -> x0_hat (B, *D)``; receives the *original* step
            index ``tau_k`` (in ``0..T-1``), so the network's time embedding is unchanged.
        shape: ``(B, *D)``.
        generator: noise source. Draw order: ``randn(shape)`` for the start; if ``eta > 0``, one
            ``randn(shape)`` per update except the last.
        num_steps: ``S``, ``1 <= S <= T``.
        eta: ``>= 0``; 0 = deterministic DDIM, 1 = DDPM-like variance.
        device: device of the chain (default: the diffusion buffers' device).
        dtype: dtype of the chain and the noise (default: the buffers' dtype).

    Returns:
        ``x_0`` samples, ``shape``.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    device, dtype = _resolve(diffusion, device, dtype)
    B = shape[0]
    taus = ddim_timesteps(diffusion.num_timesteps, num_steps)  # (S,), ascending, CPU

    # Coefficient table in float64, cast once (exact speed-up 3).
    abar = diffusion.alphas_cumprod_f64
    abar_t = abar[taus]  # (S,)
    abar_s = torch.cat([torch.ones(1, dtype=torch.float64), abar[taus[:-1]]])  # (S,)
    sig = eta * ((1 - abar_s) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_s).sqrt()  # (S,)
    b_xt = (1 - abar_s - sig**2).clamp(min=0).sqrt() / (1 - abar_t).sqrt()  # (S,)
    a_x0 = abar_s.sqrt() - b_xt * abar_t.sqrt()  # (S,)
    a_x0, b_xt, sig = (v.to(device=device, dtype=dtype) for v in (a_x0, b_xt, sig))
    taus_dev = taus.to(device)

    x = _randn(shape, generator, device, dtype)  # x_{T-1}, (B, *D)
    for k in range(num_steps - 1, -1, -1):
        x0_hat = guided_x0(x, taus_dev[k].expand(B))  # (B, *D)
        x = a_x0[k] * x0_hat + b_xt[k] * x  # (B, *D)
        if eta > 0 and k > 0:
            x = x + sig[k] * _randn(shape, generator, device, dtype)
    return x


# ------------------------------------------------------------------------------------------------
# Classifier-free guidance and time embeddings
# ------------------------------------------------------------------------------------------------


def cfg_combine(x0_cond: Tensor, x0_uncond: Tensor, w: float | Tensor) -> Tensor:
    r"""DreamRec's CFG on the x0 prediction: ``(1 + w) x0_cond - w x0_uncond``.

    ``w = 0`` is the purely conditional model. (Other papers write ``w' x0_cond + (1-w') x0_uncond``
    with ``w' = 1 + w``.) ``w`` may be a tensor broadcastable to ``(B, *D)``.
    """
    return (1 + w) * x0_cond - w * x0_uncond


def classifier_free_x0(
    denoiser: Denoiser,
    cond: Tensor,
    null_cond: Tensor,
    w: float | Tensor,
    *,
    batched: bool = True,
) -> X0Predictor:
    """Wrap a conditional ``denoiser`` into a guided x0-predictor for the samplers.

    Returns ``guided_x0(x, t) = cfg_combine(denoiser(x, cond, t), denoiser(x, null, t), w)``.

    With ``batched=True`` the two branches run as one ``2B`` batch (exact speed-up 4 for networks
    whose rows do not interact, e.g. DreamRec's ``mlp2``; put the network in ``eval()`` so dropout
    cannot break this). The doubled condition is built once here, not at every step. For an affine
    denoiser (``mlp1``) fuse further inside the model instead (see the module docstring).

    Args:
        denoiser: ``(x_t (B, *D), cond (B, ...), t (B,)) -> x0_hat (B, *D)``.
        cond: the condition, ``(B, ...)``.
        null_cond: the unconditional token, ``cond.shape[1:]`` or ``cond.shape``; expanded to B.
        w: guidance weight (DreamRec's form, see ``cfg_combine``).
        batched: run both branches in one call of size ``2B``.
    """
    null = null_cond.expand_as(cond)  # (B, ...)
    if not batched:

        def guided_x0(x: Tensor, t: Tensor) -> Tensor:
            return cfg_combine(denoiser(x, cond, t), denoiser(x, null, t), w)

        return guided_x0

    cond2 = torch.cat([cond, null], dim=0)  # (2B, ...), once per sampling call

    def guided_x0_batched(x: Tensor, t: Tensor) -> Tensor:
        out = denoiser(torch.cat([x, x], dim=0), cond2, torch.cat([t, t], dim=0))  # (2B, *D)
        x0_c, x0_u = out.chunk(2, dim=0)
        return cfg_combine(x0_c, x0_u, w)

    return guided_x0_batched


def sinusoidal_time_embedding(t: Tensor, dim: int) -> Tensor:
    r"""DreamRec's sinusoidal step embedding (``SinusoidalPositionEmbeddings``), float32.

    ``half = dim / 2``; ``f_k = exp(-k ln(10000) / (half - 1))`` for ``k = 0 .. half-1``;
    output ``[sin(t f), cos(t f)]`` (all sines first, then all cosines).

    Args:
        t: integer steps, any shape ``(...)``.
        dim: embedding width; even and ``>= 4`` (``half - 1`` must be positive).

    Returns:
        ``(..., dim)`` float32 on ``t``'s device.
    """
    if dim % 2 != 0 or dim < 4:
        raise ValueError(f"dim must be even and >= 4, got {dim}")
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)  # (half,)
    freqs = torch.exp(k * (-math.log(10000.0) / (half - 1)))  # (half,)
    args = t.to(torch.float32).unsqueeze(-1) * freqs  # (..., half)
    return torch.cat([args.sin(), args.cos()], dim=-1)  # (..., dim)


@torch.no_grad()
def precompute_time_table(mlp: nn.Module, timesteps: int, dim: int, device: torch.device | str) -> Tensor:
    """Run the time MLP once over every step: ``table[i] = mlp(sinusoid(i))`` (exact speed-up 2).

    For sampling: the network indexes ``table[t]`` instead of recomputing the sinusoid and MLP at
    each of the ``T`` steps. Identical to on-the-fly computation up to matmul rounding (the MLP
    sees a ``T``-row batch instead of a ``B``-row one). Runs under ``no_grad`` and does not
    change ``mlp``'s train/eval mode (DreamRec's time MLP has no dropout; call ``eval()`` if
    yours does). Recompute it after every optimiser step; during training use the MLP directly.

    Args:
        mlp: maps ``(T, dim)`` sinusoids to ``(T, d_out)``.
        timesteps: ``T``.
        dim: sinusoid width (input width of ``mlp``).
        device: where the table lives (normally the model's device).

    Returns:
        ``Tensor[T, d_out]`` in ``mlp``'s parameter dtype.
    """
    t = torch.arange(timesteps, device=device)  # (T,)
    emb = sinusoidal_time_embedding(t, dim)  # (T, dim), float32
    param = next(mlp.parameters(), None)
    if param is not None:
        emb = emb.to(param.dtype)
    return mlp(emb)  # (T, d_out)


# =================================================================================================
# Masked discrete diffusion
# =================================================================================================
#
# State: ``codes`` (..., n) LongTensor with one code per position, ``MASKED`` (-1) where masked.
# A *view* is one masked copy of the clean target. Masks are boolean with True = masked. All
# helpers are batched (no Python loop over rows) and take an explicit ``torch.Generator`` where
# they draw randomness, so nothing depends on a hidden global RNG.

MASKED = -1
"""Code of a masked position (the same value as ``recbench.semantic_ids.PAD_CODE``)."""

ConfidenceMetric = Literal["msp", "entropy"]


def position_confidence(logits: Tensor, metric: ConfidenceMetric = "msp") -> Tensor:
    """Confidence of each position's predictive distribution.

    Args:
        logits: (..., n, K) unnormalised scores per position.
        metric: ``msp`` = maximum softmax probability; ``entropy`` = minus the entropy (in nats),
            so larger is more confident for both.

    Returns:
        (..., n) float32.
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    if metric == "msp":
        return log_p.max(dim=-1).values.exp()
    if metric == "entropy":
        return (log_p.exp() * log_p).sum(dim=-1)  # = -H
    raise ValueError(f"unknown confidence metric {metric!r}; expected 'msp' or 'entropy'")


def confidence_order(confidence: Tensor, select: Literal["least", "most"] = "least") -> Tensor:
    """Positions sorted by confidence: ``least`` = ascending (the least confident first), ``most`` =
    descending. Ties keep position order (stable sort), so the result is deterministic.

    Args:
        confidence: (B, n).

    Returns:
        (B, n) LongTensor, a permutation of ``0..n-1`` per row.
    """
    if select not in ("least", "most"):
        raise ValueError(f"select must be 'least' or 'most', got {select!r}")
    return torch.sort(confidence, dim=-1, descending=select == "most", stable=True).indices


def random_order(batch: int, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """(B, n) one uniformly random permutation of ``0..n-1`` per row (drawn on the generator's
    device, then moved to ``device``; without a generator, drawn on ``device``: a host-to-device
    copy would synchronise a GPU step)."""
    where = generator.device if generator is not None else device
    noise = torch.rand(batch, n, generator=generator, device=where)
    return noise.argsort(dim=-1).to(device)


def masked_first(order: Tensor, digit: int) -> Tensor:
    """(B, n) masking orders with ``digit`` moved to the front, the others in their order.

    Nested views along the result mask ``digit`` in every view, down to the one that reveals all
    other digits: the state in which :func:`cpd_beam_search` with ``last_digit`` fills it. Meant for
    a collision digit: it only tells apart items that share the other digits, so it is decided last
    (as in TIGER's autoregressive order). A stable sort, not boolean indexing: no host sync.
    """
    moved = torch.argsort((order != digit).to(torch.uint8), dim=1, stable=True)  # (B, n)
    return order.gather(1, moved)


def nested_mask_views(order: Tensor, num_views: int | None = None) -> Tensor:
    """Nested masks along an order: view ``t`` (``t = 1 .. V``) masks the first ``t`` positions of
    ``order`` and reveals the rest, so each view masks a superset of the previous one and view
    ``n`` masks everything; no view is fully revealed.

    With ``order`` = ascending confidence this is DiffGRM's on-policy coherent noising (the states
    along the model's own most-confident-first denoising path); with a random order it is the
    ``sequential`` strategy.

    Args:
        order: (B, n) permutation per row.
        num_views: V in 1..n (default n): views mask 1..V positions.

    Returns:
        (B, V, n) bool, True = masked.
    """
    batch, n = order.shape
    views = n if num_views is None else num_views
    if not 1 <= views <= n:
        raise ValueError(f"num_views must be in [1, {n}], got {views}")
    # rank[b, p] = place of position p in the order (inverse permutation).
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand(batch, n))
    t = torch.arange(1, views + 1, device=order.device)  # (V,)
    return rank.unsqueeze(1) < t.view(1, views, 1)  # (B, V, n)


def random_mask_views(
    batch: int,
    n: int,
    num_views: int,
    mask_prob: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Independent Bernoulli(``mask_prob``) masks per position, ``num_views`` per row; a view that
    would mask nothing gets one uniformly chosen position masked (a fully revealed view carries no
    loss). DiffGRM's ``random`` ablation.

    Returns:
        (B, V, n) bool, True = masked (drawn on the generator's device, else on ``device``).
    """
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    where = generator.device if generator is not None else device
    mask = torch.rand(batch, num_views, n, generator=generator, device=where) < mask_prob
    forced = torch.randint(0, n, (batch, num_views), generator=generator, device=where)
    empty = ~mask.any(dim=-1)  # (B, V)
    mask |= empty.unsqueeze(-1) & F.one_hot(forced, n).bool()
    return mask.to(device)


def apply_mask(codes: Tensor, mask: Tensor) -> Tensor:
    """Views of the clean codes: (B, n) codes and (B, V, n) mask -> (B, V, n) codes with
    ``MASKED`` where masked."""
    return torch.where(mask, torch.full_like(mask, MASKED, dtype=codes.dtype), codes.unsqueeze(1))


def masked_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy over masked positions only: the sum over every masked position of every
    view divided by the number of masked positions (DiffGRM's normalisation, so views that mask
    more positions weigh more in total).

    Args:
        logits: (..., n, K).
        targets: (..., n) codes in 0..K-1 (any value where not masked).
        mask: (..., n) bool, True = masked (= scored).
        label_smoothing: epsilon of the smoothed target (``torch.nn.functional.cross_entropy``).

    Returns:
        Scalar float32 (0 when nothing is masked).

    A weighted mean over all positions, not ``logits[mask]``: boolean indexing has a data-dependent
    size, which costs a host synchronisation on a GPU. Unmasked positions get weight 0 (their
    targets are clamped into range so any placeholder is allowed there).
    """
    k = logits.shape[-1]
    per_position = F.cross_entropy(
        logits.reshape(-1, k).float(), targets.reshape(-1).clamp(0, k - 1),
        label_smoothing=label_smoothing, reduction="none",
    )  # (P,)
    weight = mask.reshape(-1).to(per_position.dtype)
    return (per_position * weight).sum() / weight.sum().clamp(min=1.0)


# --------------------------------------------------------------------------------------------
# Confidence-guided parallel denoising (CPD) beam: DiffGRM's sampler
# --------------------------------------------------------------------------------------------
# A sampler over ``n`` parallel masked digits: it receives ``log_probs_fn`` (the network) and only
# calls it, batched over users x beams; no host reads, so a GPU decoding step never synchronises.

DecodeOrder = Literal["confidence", "fixed"]

#: ``log_probs_fn(codes (B, R, n) with MASKED where unfilled) -> (B, R, n, K) float32 log-probs``.
LogProbsFn = Callable[[Tensor], Tensor]


def _partial_state_keys(codes: Tensor, codebook_size: int) -> Tensor:
    """(..., n) partial codes (MASKED where unfilled) -> (...,) int64: one key per (filled set, codes)
    state, radix K + 1 with 0 = masked."""
    n = codes.shape[-1]
    place = (codebook_size + 1) ** torch.arange(n - 1, -1, -1, device=codes.device, dtype=torch.long)
    return ((codes + 1) * place).sum(-1)


def _first_occurrence(keys: Tensor) -> Tensor:
    """(B, M) keys -> (B, M) bool, True at the first occurrence of each key in its row."""
    sorted_keys, order = torch.sort(keys, dim=1, stable=True)
    first = torch.ones_like(sorted_keys, dtype=torch.bool)
    first[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    return torch.zeros_like(first).scatter_(1, order, first)


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
    last_digit: int | None = None,
) -> BeamResult:
    """Confidence-guided parallel denoising (CPD) beam, batched over users x beams: the only Python
    loop is over the ``n - 1`` filling steps; per step the network is called once on every (user,
    beam) state and the next beams are one ``topk`` per user over (beam, digit, code) candidates.

    Args:
        log_probs_fn: codes (B, R, n) with ``MASKED`` where unfilled -> (B, R, n, K) log-probs.
        batch_size, n_digits, codebook_size, beam: B users, n >= 2 digits, K codes, beams kept.
        decode_order: ``confidence`` (the paper): each step fills whichever unfilled (digit, code)
            pair is most confident; ``fixed`` (ablation): step t fills digit ``fixed_order[t]``
            (a permutation, identity by default); the last digit is argmax-filled either way.
        merge_duplicate_beams: merge beams that reach the same partial SID through different fill
            orders, keeping the best score (frees slots, so results may change). Exact: at step s a
            state has at most s + 1 parents, so the top ``beam`` distinct states are among the top
            ``beam·(s + 1)`` candidates.
        last_digit: a digit held back until every other one is filled (under ``fixed``, the order's
            last digit), e.g. a collision digit; its step is then a beam step over (beams x codes),
            so several items that share the other digits can all be kept, instead of the argmax.

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
    if last_digit is not None and not 0 <= last_digit < n:
        raise ValueError(f"last_digit must be a digit in 0..{n - 1}, got {last_digit}")
    if last_digit is not None and decode_order == "fixed" and order[-1] != last_digit:
        raise ValueError(f"last_digit {last_digit} must come last in the fixed order {order}")
    if merge_duplicate_beams and (k + 1) ** n >= 2**62:
        raise ValueError(f"merge_duplicate_beams: partial states of {n} digits x {k} codes overflow an int64 key")
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
            if last_digit is not None:
                allowed = allowed & (digit_ids != last_digit)
                open_digits -= 1
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
    log_p = log_probs_fn(codes).float()  # (B, W, n, K)
    if last_digit is not None:
        # Final step over (beam, code) pairs of the held-back digit: top `beam` of W x K.
        candidates = (scores.unsqueeze(-1) + log_p[:, :, last_digit]).flatten(1)  # (B, W K)
        scores, top_index = candidates.topk(min(beam, candidates.shape[1]), dim=1)  # (B, W')
        codes = codes.gather(1, (top_index // k).unsqueeze(-1).expand(-1, -1, n)).clone()  # (B, W', n)
        codes[:, :, last_digit] = top_index % k
    else:
        # Final step: each beam has exactly one unfilled digit; fill it with its argmax code.
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
