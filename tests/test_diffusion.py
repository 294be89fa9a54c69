"""Tests for recbench.diffusion (Gaussian section). Fast, CPU only.

Reference values are computed independently here with plain ``math``/``numpy`` from the formulas
in DreamRec's reference code (YangZhengyi98/DreamRec, ``DreamRec.py``), not by calling the code under test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from recbench.diffusion import (
    GaussianDiffusion,
    beta_schedule,
    cfg_combine,
    classifier_free_x0,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    precompute_time_table,
    sinusoidal_time_embedding,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    # The chains here are hundreds of tiny sequential ops; on a busy 2-core machine intra-op
    # threads only add contention (measured: 18 s with 2 threads vs 5 s with 1). Restored after.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------


def _np_abar(betas: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - betas)


def test_linear_schedule_endpoints() -> None:
    b = beta_schedule("linear", 500)
    assert b.dtype == torch.float64 and b.shape == (500,)
    assert b[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert b[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert np.allclose(np.diff(b.numpy()), (0.02 - 1e-4) / 499, atol=1e-15)
    b2 = beta_schedule("linear", 10, beta_start=1e-3, beta_end=0.5)
    assert (b2[0].item(), b2[-1].item()) == pytest.approx((1e-3, 0.5))


def test_cosine_schedule_hand_formula() -> None:
    s = 0.008

    def abar(u: float, T: int) -> float:
        return math.cos(((u / T) + s) / (1 + s) * math.pi / 2) ** 2

    for T in (10, 100, 2000):
        b = beta_schedule("cosine", T).numpy()
        first = min(max(1 - abar(1, T) / abar(0, T), 1e-4), 0.9999)
        last = min(max(1 - abar(T, T) / abar(T - 1, T), 1e-4), 0.9999)
        assert b[0] == pytest.approx(first, rel=1e-12)
        assert b[-1] == pytest.approx(last, rel=1e-12)
        mid = T // 2
        assert b[mid] == pytest.approx(1 - abar(mid + 1, T) / abar(mid, T), rel=1e-12)
        assert b.min() >= 1e-4 and b.max() <= 0.9999
    # DreamRec's schedules: T = 2000 ends clipped at 0.9999, giving abar_{T-1} about 6e-11.
    b = beta_schedule("cosine", 2000).numpy()
    assert b[-1] == pytest.approx(0.9999)
    assert _np_abar(b)[-1] == pytest.approx(6.06e-11, rel=0.01)


def test_exp_schedule_T500() -> None:
    T, bmin, bmax = 500, 0.1, 10.0
    b = beta_schedule("exp", T).numpy()
    # The reference's grid x = linspace(1, 2T+1, T): step 2T/(T-1), not 2.
    x = np.linspace(1.0, 2 * T + 1.0, T)
    assert x[1] - x[0] == pytest.approx(2 * T / (T - 1))
    ref = 1 - np.exp(-bmin / T - x * (bmax - bmin) / (2 * T * T))
    np.testing.assert_allclose(b, ref, rtol=1e-12)
    # Hand values: beta_0 = 1 - exp(-0.1/500 - 9.9/(2*500^2)).
    assert b[0] == pytest.approx(1 - math.exp(-0.1 / 500 - 9.9 / 500_000), rel=1e-12)
    assert b[0] == pytest.approx(2.2e-4, rel=0.01)
    assert b[-1] == pytest.approx(1 - math.exp(-0.1 / 500 - 1001 * 9.9 / 500_000), rel=1e-12)
    assert b[-1] == pytest.approx(0.0198, rel=0.01)
    assert _np_abar(b)[-1] == pytest.approx(0.0064, rel=0.01)


def test_sqrt_schedule_hand_formula() -> None:
    T = 50

    def abar(u: float) -> float:
        return 1 - math.sqrt(u + 1e-4)

    b = beta_schedule("sqrt", T).numpy()
    for i in (0, 1, T // 2, T - 2, T - 1):
        assert b[i] == pytest.approx(min(1 - abar((i + 1) / T) / abar(i / T), 0.999), rel=1e-12)
    assert b[-1] == pytest.approx(0.999)  # abar(1) < 0, so the last beta is clipped
    assert b.max() <= 0.999


def test_unknown_schedule_and_bad_T() -> None:
    with pytest.raises(ValueError):
        beta_schedule("quadratic", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        beta_schedule("linear", 0)


@pytest.mark.parametrize("name", ["linear", "cosine", "exp", "sqrt"])
def test_alphas_cumprod_monotone(name: str) -> None:
    d = GaussianDiffusion.from_schedule(name, 300, dtype=torch.float64)  # type: ignore[arg-type]
    abar = d.alphas_cumprod
    assert bool((abar[1:] < abar[:-1]).all())
    assert 0 < abar[-1].item() < abar[0].item() < 1
    assert d.alphas_cumprod_prev[0].item() == 1.0
    assert torch.equal(d.alphas_cumprod_prev[1:], abar[:-1])


# ------------------------------------------------------------------------------------------------
# GaussianDiffusion buffers, posterior, q_sample, loss
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "cosine", "exp"])
def test_posterior_coefficients(name: str) -> None:
    T = 200
    d = GaussianDiffusion.from_schedule(name, T, dtype=torch.float64)  # type: ignore[arg-type]
    b = beta_schedule(name, T).numpy()  # type: ignore[arg-type]
    a = 1 - b
    ab = np.cumprod(a)
    abp = np.concatenate([[1.0], ab[:-1]])
    np.testing.assert_allclose(d.posterior_mean_coef1.numpy(), b * np.sqrt(abp) / (1 - ab), rtol=1e-10)
    np.testing.assert_allclose(d.posterior_mean_coef2.numpy(), (1 - abp) * np.sqrt(a) / (1 - ab), rtol=1e-10)
    np.testing.assert_allclose(d.posterior_variance.numpy(), b * (1 - abp) / (1 - ab), rtol=1e-10)
    np.testing.assert_allclose(d.posterior_std.numpy() ** 2, d.posterior_variance.numpy(), rtol=1e-10)

    c1, c2, var = d.posterior_mean_coef1, d.posterior_mean_coef2, d.posterior_variance
    # Last reverse step returns x0_hat: c1_0 = 1, c2_0 = 0, sigma_0 = 0.
    assert c1[0].item() == pytest.approx(1.0) and c2[0].item() == 0.0 and var[0].item() == 0.0
    # Noise-free consistency: x_t = sqrt(abar_t) x0 => posterior mean = sqrt(abar_{t-1}) x0,
    # i.e. c1 + c2 sqrt(abar_t) = sqrt(abar_{t-1}).
    torch.testing.assert_close(c1 + c2 * d.sqrt_alphas_cumprod, d.alphas_cumprod_prev.sqrt())
    # Marginal consistency: x_t ~ q(x_t|x0), x_{t-1} ~ posterior => Var = 1 - abar_{t-1}.
    torch.testing.assert_close(c2**2 * (1 - d.alphas_cumprod) + var, 1 - d.alphas_cumprod_prev)

    # p_mean with x0_hat = x0 and noise-free x_t, per-row t and int t.
    x0 = torch.randn(5, 3, generator=_gen(0), dtype=torch.float64)
    t = torch.tensor([0, 1, 50, 150, T - 1])
    x_t = d.q_sample(x0, t, torch.zeros_like(x0))
    expected = torch.from_numpy(np.sqrt(abp[t.numpy()]))[:, None] * x0
    torch.testing.assert_close(d.p_mean(x0, x_t, t), expected)
    x_t7 = d.q_sample(x0, 7, torch.zeros_like(x0))
    torch.testing.assert_close(d.p_mean(x0, x_t7, 7), math.sqrt(abp[7]) * x0)


def test_buffers_follow_to_and_are_not_checkpointed() -> None:
    d = GaussianDiffusion.from_schedule("exp", 20)
    assert d.betas.dtype == torch.float32 and d.num_timesteps == 20
    assert d.state_dict() == {}  # a pure function of the schedule
    d64 = d.to(torch.float64)
    assert d64.posterior_mean_coef1.dtype == torch.float64
    assert d64.alphas_cumprod_f64.dtype == torch.float64
    with pytest.raises(ValueError):
        GaussianDiffusion(torch.tensor([0.0, 0.1]))


def test_q_sample_statistics() -> None:
    d = GaussianDiffusion.from_schedule("linear", 100, dtype=torch.float64)
    n, t = 200_000, 60
    x0 = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64).expand(n, 3)
    noise = torch.randn(n, 3, generator=_gen(1), dtype=torch.float64)
    xt = d.q_sample(x0, torch.full((n,), t), noise)
    ab = float(np.cumprod(1 - np.linspace(1e-4, 0.02, 100))[t])
    var = 1 - ab
    # Sample mean: SE = sqrt(var/n); sample variance: SE ~ var sqrt(2/(n-1)). 5 SE bounds.
    np.testing.assert_allclose(xt.mean(0).numpy(), math.sqrt(ab) * x0[0].numpy(), atol=5 * math.sqrt(var / n))
    np.testing.assert_allclose(xt.var(0).numpy(), var, atol=5 * var * math.sqrt(2 / (n - 1)))


def test_training_loss() -> None:
    d = GaussianDiffusion.from_schedule("exp", 50)
    x0 = torch.randn(8, 4, generator=_gen(2), requires_grad=True)
    cond = torch.zeros(8, 4)

    # An oracle that returns x0 exactly (smuggled in through cond) has zero loss.
    assert d.training_loss(lambda x, c, t: c, x0, x0.detach()).item() == 0.0
    # A zero predictor gives mean(x0^2): mean over batch and dims.
    loss = d.training_loss(lambda x, c, t: torch.zeros_like(x), x0, cond)
    torch.testing.assert_close(loss, (x0**2).mean())
    loss.backward()
    assert x0.grad is not None  # no stop-gradient on the target (as in the DreamRec reference)

    # Seeded t and noise are reproducible; the denoiser sees x_t = q_sample(x0, t, noise).
    seen: list[tuple[Tensor, Tensor]] = []

    def spy(x: Tensor, c: Tensor, t: Tensor) -> Tensor:
        seen.append((x, t))
        return x

    l1 = d.training_loss(spy, x0.detach(), cond, generator=_gen(3))
    l2 = d.training_loss(spy, x0.detach(), cond, generator=_gen(3))
    assert l1.item() == l2.item()
    assert torch.equal(seen[0][0], seen[1][0]) and torch.equal(seen[0][1], seen[1][1])
    t = seen[0][1]
    assert t.shape == (8,) and t.dtype == torch.long and 0 <= t.min() and t.max() < 50
    noise = torch.randn(8, 4)
    tt = torch.arange(8)
    d.training_loss(spy, x0.detach(), cond, t=tt, noise=noise)
    torch.testing.assert_close(seen[-1][0], d.q_sample(x0.detach(), tt, noise))


# ------------------------------------------------------------------------------------------------
# Time embeddings and CFG helpers
# ------------------------------------------------------------------------------------------------


def test_sinusoidal_time_embedding_hand_formula() -> None:
    dim, half = 8, 4
    t = torch.tensor([0, 1, 37, 499])
    emb = sinusoidal_time_embedding(t, dim)
    assert emb.shape == (4, dim) and emb.dtype == torch.float32
    for r, tv in enumerate(t.tolist()):
        for k in range(half):
            f = math.exp(-k * math.log(10000) / (half - 1))
            assert emb[r, k].item() == pytest.approx(math.sin(tv * f), abs=1e-4)
            assert emb[r, half + k].item() == pytest.approx(math.cos(tv * f), abs=1e-4)
    with pytest.raises(ValueError):
        sinusoidal_time_embedding(t, 7)


def test_precompute_time_table_matches_on_the_fly() -> None:
    torch.manual_seed(0)
    d = 16
    mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
    table = precompute_time_table(mlp, 100, d, "cpu")
    assert table.shape == (100, d) and not table.requires_grad
    t = torch.tensor([0, 5, 99, 42])
    torch.testing.assert_close(table[t], mlp(sinusoidal_time_embedding(t, d)).detach())


def test_cfg_combine_and_batched_wrapper() -> None:
    c, u = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(cfg_combine(c, u, 2.0), 3 * c - 2 * u)
    torch.testing.assert_close(cfg_combine(c, u, 0.0), c)

    torch.manual_seed(1)
    net = nn.Linear(3 + 5 + 1, 3)

    def denoiser(x: Tensor, h: Tensor, t: Tensor) -> Tensor:
        return net(torch.cat([x, h, t[:, None].float()], dim=-1))

    h, null = torch.randn(4, 5), torch.randn(5)
    x, t = torch.randn(4, 3), torch.full((4,), 7)
    g1 = classifier_free_x0(denoiser, h, null, 2.0, batched=True)(x, t)
    g2 = classifier_free_x0(denoiser, h, null, 2.0, batched=False)(x, t)
    expected = cfg_combine(denoiser(x, h, t), denoiser(x, null.expand(4, 5), t), 2.0)
    torch.testing.assert_close(g1, expected)
    torch.testing.assert_close(g2, expected)


# ------------------------------------------------------------------------------------------------
# Fused guided step (generic test double for DreamRec's mlp1)
# ------------------------------------------------------------------------------------------------


class _LinearX0Double(nn.Module):
    """``x0_hat = W_x x + W_h h + W_t temb(t) + b`` with ``temb = MLP(sinusoid(t))`` (mlp1 shape)."""

    def __init__(self, d: int, dtype: torch.dtype) -> None:
        super().__init__()
        g = _gen(10)
        scale = 0.3 / math.sqrt(d)  # keep the affine chain well-conditioned
        self.d = d
        self.W_x = nn.Parameter(torch.randn(d, d, generator=g, dtype=dtype) * scale)
        self.W_h = nn.Parameter(torch.randn(d, d, generator=g, dtype=dtype) * scale)
        self.W_t = nn.Parameter(torch.randn(d, d, generator=g, dtype=dtype) * scale)
        self.b = nn.Parameter(torch.randn(d, generator=g, dtype=dtype) * 0.1)
        self.null = nn.Parameter(torch.randn(d, generator=g, dtype=dtype))
        self.time_mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)).to(dtype)

    def forward(self, x: Tensor, h: Tensor, t: Tensor) -> Tensor:
        """Naive path: sinusoid + time MLP recomputed at every call."""
        temb = self.time_mlp(sinusoidal_time_embedding(t, self.d).to(x.dtype))
        return x @ self.W_x.T + h @ self.W_h.T + temb @ self.W_t.T + self.b

    def fused_guided_x0(self, h: Tensor, w: float, table: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        """Fused path: one matmul on x per step; time table and guided condition precomputed."""
        hw = ((1 + w) * h - w * self.null) @ self.W_h.T + self.b  # (B, d), once per batch
        tw = table @ self.W_t.T  # (T, d), once per evaluation

        def guided_x0(x: Tensor, t: Tensor) -> Tensor:
            return x @ self.W_x.T + tw[t] + hw

        return guided_x0


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_fused_guided_ddpm_equals_unfused(dtype: torch.dtype, tol: float) -> None:
    T, B, d, w = 60, 32, 8, 2.0
    diff = GaussianDiffusion.from_schedule("exp", T, dtype=dtype)
    model = _LinearX0Double(d, dtype).eval()
    h = torch.randn(B, d, generator=_gen(11), dtype=dtype)

    with torch.no_grad():
        null = model.null.expand(B, d)

        def unfused(x: Tensor, t: Tensor) -> Tensor:
            return cfg_combine(model(x, h, t), model(x, null, t), w)

        table = precompute_time_table(model.time_mlp, T, d, "cpu")
        fused = model.fused_guided_x0(h, w, table)

        out_naive = ddpm_sample(diff, unfused, (B, d), _gen(123))
        out_fused = ddpm_sample(diff, fused, (B, d), _gen(123))
    assert out_fused.dtype == dtype
    torch.testing.assert_close(out_fused, out_naive, rtol=tol, atol=tol)
    # Same for the wrapper-based paths (2B batch vs two calls).
    out_b = ddpm_sample(diff, classifier_free_x0(model, h, model.null, w), (B, d), _gen(123))
    torch.testing.assert_close(out_b, out_naive, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------
# Samplers on a toy problem with an exact x0-predictor
# ------------------------------------------------------------------------------------------------

# Data x0 ~ N(MU, SIGMA) in 2-D. Then x_t ~ N(sqrt(ab) MU, ab SIGMA + (1-ab) I) and
# E[x0 | x_t] = MU + K_t (x_t - sqrt(ab_t) MU), K_t = sqrt(ab_t) SIGMA (ab_t SIGMA + (1-ab_t) I)^-1.
MU = np.array([1.0, -2.0])
SIGMA = np.array([[1.0, 0.6], [0.6, 0.5]])
TOY_T = 100


def _toy_gains(abar: np.ndarray) -> np.ndarray:
    eye = np.eye(2)
    return np.stack([math.sqrt(a) * SIGMA @ np.linalg.inv(a * SIGMA + (1 - a) * eye) for a in abar])


def _toy_predictor(abar: np.ndarray) -> Callable[[Tensor, Tensor], Tensor]:
    K = torch.from_numpy(_toy_gains(abar))  # (T, 2, 2)
    mu = torch.from_numpy(MU)  # (2,)
    sab = torch.from_numpy(np.sqrt(abar))  # (T,)

    def x0_star(x: Tensor, t: Tensor) -> Tensor:
        r = x - sab[t, None] * mu  # (B, 2)
        return mu + torch.einsum("bij,bj->bi", K[t], r)

    return x0_star


def _propagate(steps: list[tuple[np.ndarray, np.ndarray, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean/cov of x' = A x + c + s z, applied in order, starting from N(0, I)."""
    m, C = np.zeros(2), np.eye(2)
    for A, c, s in steps:
        m = A @ m + c
        C = A @ C @ A.T + s**2 * np.eye(2)
    return m, C


def _toy_schedule() -> tuple[np.ndarray, np.ndarray]:
    s = 0.008
    u = np.arange(TOY_T + 1)
    f = np.cos(((u / TOY_T) + s) / (1 + s) * np.pi / 2) ** 2
    f = f / f[0]
    betas = np.clip(1 - f[1:] / f[:-1], 1e-4, 0.9999)
    return betas, np.cumprod(1 - betas)


def _ddpm_exact_moments() -> tuple[np.ndarray, np.ndarray]:
    betas, ab = _toy_schedule()
    abp = np.concatenate([[1.0], ab[:-1]])
    K = _toy_gains(ab)
    steps = []
    for i in range(TOY_T - 1, -1, -1):
        c1 = betas[i] * math.sqrt(abp[i]) / (1 - ab[i])
        c2 = (1 - abp[i]) * math.sqrt(1 - betas[i]) / (1 - ab[i])
        var = betas[i] * (1 - abp[i]) / (1 - ab[i])
        A = c1 * K[i] + c2 * np.eye(2)
        c = c1 * (MU - K[i] @ (math.sqrt(ab[i]) * MU))
        steps.append((A, c, math.sqrt(var) if i > 0 else 0.0))
    return _propagate(steps)


def _ddim_eta0_exact_moments(taus: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic DDIM in the epsilon form, written out independently."""
    _, ab = _toy_schedule()
    K = _toy_gains(ab)
    steps = []
    for k in range(len(taus) - 1, -1, -1):
        t = taus[k]
        abs_ = ab[taus[k - 1]] if k > 0 else 1.0
        # x0_hat = MU + K (x - sqrt(ab_t) MU) = P x + q;  eps_hat = (x - sqrt(ab_t) x0_hat)/sqrt(1-ab_t)
        P, q = K[t], MU - K[t] @ (math.sqrt(ab[t]) * MU)
        Pe = (np.eye(2) - math.sqrt(ab[t]) * P) / math.sqrt(1 - ab[t])
        qe = -math.sqrt(ab[t]) * q / math.sqrt(1 - ab[t])
        A = math.sqrt(abs_) * P + math.sqrt(1 - abs_) * Pe
        c = math.sqrt(abs_) * q + math.sqrt(1 - abs_) * qe
        steps.append((A, c, 0.0))
    return _propagate(steps)


def _assert_moments(x: Tensor, m: np.ndarray, C: np.ndarray, n_se: float = 5.0) -> None:
    """Sample mean/cov vs exact, within n_se standard errors of the estimators."""
    xs = x.numpy()
    n = xs.shape[0]
    se_mean = np.sqrt(np.diag(C) / n)
    np.testing.assert_array_less(np.abs(xs.mean(0) - m), n_se * se_mean)
    se_cov = np.sqrt((np.outer(np.diag(C), np.diag(C)) + C**2) / n)  # Gaussian: Var(S_jk)
    np.testing.assert_array_less(np.abs(np.cov(xs.T) - C), n_se * se_cov)


@pytest.fixture(scope="module")
def toy() -> tuple[GaussianDiffusion, Callable[[Tensor, Tensor], Tensor]]:
    diff = GaussianDiffusion.from_schedule("cosine", TOY_T, dtype=torch.float64)
    return diff, _toy_predictor(diff.alphas_cumprod_f64.numpy())


def test_toy_exact_moments_are_close_to_data(toy) -> None:
    # Sanity of the toy itself: the exact-predictor DDPM lands near the data distribution.
    m, C = _ddpm_exact_moments()
    np.testing.assert_allclose(m, MU, atol=0.02)
    np.testing.assert_allclose(C, SIGMA, atol=0.1)


def test_ddpm_and_ddim_eta1_full_match_in_distribution(toy) -> None:
    diff, x0_star = toy
    n = 20_000
    m, C = _ddpm_exact_moments()
    x_ddpm = ddpm_sample(diff, x0_star, (n, 2), _gen(100))
    x_ddim = ddim_sample(diff, x0_star, (n, 2), _gen(200), num_steps=TOY_T, eta=1.0)
    _assert_moments(x_ddpm, m, C)
    _assert_moments(x_ddim, m, C)
    # Stronger: the two updates are algebraically identical and draw noise in the same order,
    # so with the same generator the samples coincide up to rounding.
    x_ddim_same = ddim_sample(diff, x0_star, (n, 2), _gen(100), num_steps=TOY_T, eta=1.0)
    torch.testing.assert_close(x_ddim_same, x_ddpm, rtol=1e-9, atol=1e-9)


def test_ddim_eta0_strided_exact_moments_and_determinism(toy) -> None:
    diff, x0_star = toy
    n, S = 20_000, 10
    taus = ddim_timesteps(TOY_T, S)
    assert taus.tolist()[0] == 0 and taus.tolist()[-1] == TOY_T - 1
    assert bool((taus[1:] > taus[:-1]).all())
    m, C = _ddim_eta0_exact_moments(taus.tolist())
    x1 = ddim_sample(diff, x0_star, (n, 2), _gen(5), num_steps=S, eta=0.0)
    x2 = ddim_sample(diff, x0_star, (n, 2), _gen(5), num_steps=S, eta=0.0)
    assert torch.equal(x1, x2)
    _assert_moments(x1, m, C)
    # eta = 0 consumes only the start noise (one (B, D) draw) and is the default.
    g = _gen(5)
    x3 = ddim_sample(diff, x0_star, (n, 2), g, num_steps=S)
    assert torch.equal(x3, x1)
    g_ref = _gen(5)
    torch.randn(n, 2, generator=g_ref, dtype=torch.float64)
    assert torch.equal(g.get_state(), g_ref.get_state())


def test_ddim_timesteps_edge_cases() -> None:
    assert ddim_timesteps(50, 50).tolist() == list(range(50))
    assert ddim_timesteps(50, 1).tolist() == [49]
    assert len(set(ddim_timesteps(500, 499).tolist())) == 499
    with pytest.raises(ValueError):
        ddim_timesteps(10, 11)
    with pytest.raises(ValueError):
        ddim_timesteps(10, 0)


def test_seeded_sampling_reproducible_and_noise_order(toy) -> None:
    diff, x0_star = toy
    a = ddpm_sample(diff, x0_star, (64, 2), _gen(7))
    b = ddpm_sample(diff, x0_star, (64, 2), _gen(7))
    c = ddpm_sample(diff, x0_star, (64, 2), _gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)

    # Documented draw order: start noise, then one (B, D) draw per step i = T-1 .. 1.
    seen: list[Tensor] = []

    def spy(x: Tensor, t: Tensor) -> Tensor:
        seen.append(t.clone())
        return torch.zeros_like(x)  # x0_hat = 0 makes the chain a function of the noise only

    B, T = 3, diff.num_timesteps
    g_sampler = _gen(9)
    out = ddpm_sample(diff, spy, (B, 2), g_sampler)
    assert [int(s[0]) for s in seen] == list(range(T - 1, -1, -1))
    assert all(s.shape == (B,) and s.dtype == torch.long for s in seen)
    g = _gen(9)
    x = torch.randn(B, 2, generator=g, dtype=torch.float64)
    c2, sig = diff.posterior_mean_coef2, diff.posterior_std
    for i in range(T - 1, -1, -1):
        x = c2[i] * x + (sig[i] * torch.randn(B, 2, generator=g, dtype=torch.float64) if i > 0 else 0)
    torch.testing.assert_close(out, x)
    # The sampler advanced its generator by exactly T draws of shape (B, 2), like the replay.
    assert torch.equal(g_sampler.get_state(), g.get_state())
