"""DreamRec (baselines/dreamrec.py) and the keyed evaluation noise it uses. Fast, CPU only.

The schedules, q_sample, the generic fused-vs-unfused CFG check and DDIM-vs-DDPM live in
tests/test_diffusion.py; here: the model's encoder, CFG dropout, its own fused sampling paths,
retrieval scope, seeded evaluation, and learning.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning.pytorch as pl
import pytest
import torch
from conftest import fit_and_test, quiet_trainer

from baselines.dreamrec import DreamRec
from benchmark.registry import instantiate_model
from datamodules.synthetic import SyntheticDataModule
from recbench.batch import PAD_ID
from recbench.diffusion import KeyedNoise, sequence_keys


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    # Sampling chains are many tiny sequential ops; on a shared 2-core machine extra intra-op
    # threads only add contention. Restored afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(num_items: int = 40, max_len: int = 8, **kwargs: object) -> DreamRec:
    torch.manual_seed(0)
    options: dict[str, object] = dict(hidden_size=16, timesteps=30, retrieval_backend="torch")
    options.update(kwargs)
    return DreamRec(num_items=num_items, max_len=max_len, **options).eval()  # type: ignore[arg-type]


def _histories(num_items: int, rows: int, length: int, seed: int = 1) -> torch.Tensor:
    """Left-padded random histories with 1..length real items."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, num_items + 1, (rows, length), generator=g)
    real = torch.randint(1, length + 1, (rows,), generator=g)
    keep = torch.arange(length).unsqueeze(0) >= (length - real).unsqueeze(1)
    return torch.where(keep, items, torch.zeros_like(items))


# ------------------------------------------------------------------------------------------------
# Encoder
# ------------------------------------------------------------------------------------------------


def test_encoder_pools_the_last_real_position_and_ignores_padding() -> None:
    model = _model(max_len=8)
    short = torch.tensor([[0, 5, 6, 7], [0, 0, 0, 9]])  # (2, 4)
    long = torch.nn.functional.pad(short, (4, 0))  # (2, 8): more left padding, same histories
    h = model.condition(short)
    assert h.shape == (2, 16)
    # Positions count from the oldest real item, so the amount of left padding is irrelevant.
    assert torch.allclose(model.condition(long), h, atol=1e-6)
    # Whatever the padding row holds, nothing changes: padding rows are zeroed and masked as keys.
    with torch.no_grad():
        model.item_embedding.weight[PAD_ID].normal_().mul_(10)
    assert torch.allclose(model.condition(short), h, atol=1e-6)
    # The pooled row is the newest item's: changing it changes h, changing an older one too (attention).
    assert not torch.allclose(model.condition(torch.tensor([[0, 5, 6, 8]])), h[:1])
    assert not torch.allclose(model.condition(torch.tensor([[0, 4, 6, 7]])), h[:1])
    # Computing only the pooled row equals the full computation's row L - 1 (exact shortcut).
    valid = long != PAD_ID
    items = model.item_embedding(long)
    full = model.encoder(items, valid, last_only=False)  # (2, 8, d)
    assert torch.allclose(full[:, -1], model.encoder(items, valid, last_only=True)[:, -1], atol=1e-5)
    # Outputs at padding positions are LN3(0) = LN3's bias, as in the reference.
    assert torch.allclose(full[1, 0], model.encoder.output_norm.bias, atol=1e-6)


def test_encoder_rejects_histories_longer_than_max_len() -> None:
    with pytest.raises(ValueError, match="max_len"):
        _model(max_len=4).condition(torch.ones(1, 5, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# Classifier-free guidance dropout
# ------------------------------------------------------------------------------------------------


def test_cfg_dropout_replaces_h_by_null_at_rate_p_in_training_only() -> None:
    model = _model(uncond_prob=0.1).train()
    torch.manual_seed(3)
    h = torch.randn(20_000, 16)
    out = model.cfg_dropout(h)
    dropped = (out == model.null_condition.detach()).all(dim=1)
    kept = (out == h).all(dim=1)
    assert bool((dropped ^ kept).all()), "each row is either h or the null vector"
    assert abs(dropped.float().mean().item() - 0.1) < 0.012  # 5 sigma at n = 20,000
    model.eval()
    assert torch.equal(model.cfg_dropout(h), h)


def test_training_loss_uses_cfg_dropout_and_reaches_every_part() -> None:
    model = _model(uncond_prob=0.5).train()
    calls: list[int] = []
    original = model.cfg_dropout

    def counting(h: torch.Tensor) -> torch.Tensor:
        calls.append(h.shape[0])
        return original(h)

    model.cfg_dropout = counting  # type: ignore[method-assign]
    history = _histories(40, 64, 8)
    loss = model.loss({"history": history, "target": torch.randint(1, 41, (64,)), "user": torch.arange(64)})
    loss.backward()
    assert calls == [64]
    for name in ("item_embedding.weight", "null_condition", "encoder.query.weight", "time_mlp.0.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and bool(grad.abs().sum() > 0), name


@pytest.mark.parametrize("stop", [True, False])
def test_stop_target_gradient_controls_the_gradient_through_x0(stop: bool) -> None:
    model = _model(stop_target_gradient=stop).train()
    # Histories of padding only: padded rows are zeroed, so the item table gets no gradient through
    # the encoder and whatever reaches the target rows comes through x0.
    history = torch.zeros(32, 8, dtype=torch.long)
    target = torch.arange(1, 33)
    model.loss({"history": history, "target": target, "user": target}).backward()
    grad = model.item_embedding.weight.grad
    reached = grad is not None and bool(grad[target].abs().sum() > 0)
    assert reached is (not stop)


def _windows_and_pairs(num_items: int, users: int, max_len: int, seed: int = 5) -> tuple[dict, dict]:
    """The same user sequences (1..max_len + 1 items) as one batch of windows and as the batch of
    all their (history, target) pairs, targets in row-major order."""
    g = torch.Generator().manual_seed(seed)
    sequence = torch.zeros(users, max_len + 1, dtype=torch.long)
    for row in range(users):
        length = int(torch.randint(2, max_len + 2, (1,), generator=g))
        sequence[row, -length:] = torch.randint(1, num_items + 1, (length,), generator=g)
    histories, targets = [], []
    for row in range(users):  # row-major: the order in which the sequence view takes its targets
        for j in range(max_len):
            if sequence[row, j] != PAD_ID:  # input j is real: target j + 1 with history up to j
                history = sequence[row, : j + 1]
                histories.append(torch.nn.functional.pad(history, (max_len - len(history), 0)))
                targets.append(sequence[row, j + 1])
    user = torch.arange(users)
    pairs = {"history": torch.stack(histories), "target": torch.stack(targets), "user": torch.zeros(len(targets))}
    return {"sequence": sequence, "user": user}, pairs


@pytest.mark.parametrize("denoiser", ["mlp1", "mlp2"])
def test_sequence_view_loss_is_the_mean_of_the_pair_losses(denoiser: str) -> None:
    # Encoder dropout off (its masks are drawn per window in one view, per pair in the other); CFG
    # dropout on and large, so a per-target mismatch in the drop draws would show.
    model = _model(max_len=8, dropout=0.0, uncond_prob=0.4, denoiser=denoiser).train()
    windows, pairs = _windows_and_pairs(40, users=12, max_len=8)
    assert model.training_view == "sequence"  # the default; the datamodule's "auto" follows it
    torch.manual_seed(123)
    sequence_loss = model.loss(windows)
    torch.manual_seed(123)
    pair_loss = model.loss(pairs)
    difference = abs(sequence_loss.item() - pair_loss.item())
    print(f"{denoiser}: sequence-view loss {sequence_loss.item():.6f}, pair mean {pair_loss.item():.6f}, |diff| {difference:.2e}")
    assert difference < 1e-5
    torch.manual_seed(124)
    assert abs(model.loss(pairs).item() - pair_loss.item()) > 1e-3  # the noise matters: the check can fail
    assert _model(training_view="pairs").training_view == "pairs"
    assert _model(item_scope="all").run_notes()["training_view"].startswith("sequence")


# ------------------------------------------------------------------------------------------------
# Sampling: fused == naive, DDIM, keyed noise
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("denoiser", ["mlp1", "mlp2"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_fused_sampling_equals_the_naive_loop(denoiser: str, sampler: str) -> None:
    model = _model(denoiser=denoiser, guidance_weight=2.0, ddim_steps=7, ddim_eta=0.5)
    with torch.no_grad():  # a non-trivial null vector and time MLP
        model.null_condition.mul_(3)
        model.time_mlp[2].bias.normal_()
    history = _histories(40, 50, 8)
    fused = model.generate(history, path="fused", sampler=sampler)  # type: ignore[arg-type]
    naive = model.generate(history, path="naive", sampler=sampler)  # type: ignore[arg-type]
    assert fused.shape == (50, 16)
    assert torch.allclose(fused, naive, atol=1e-4, rtol=1e-4), (fused - naive).abs().max()


def test_ddim_with_all_steps_and_eta_one_is_ddpm_and_is_labelled() -> None:
    model = _model()
    history = _histories(40, 20, 8)
    ddpm = model.generate(history)
    ddim = model.generate(history, sampler="ddim", ddim_steps=30, ddim_eta=1.0)
    assert torch.allclose(ddim, ddpm, atol=1e-4)
    assert model.sampler_description().startswith("ddpm exact: all T=30 steps")
    approx = _model(sampler="ddim", ddim_steps=10)
    assert "APPROXIMATE" in approx.sampler_description() and not approx.sampling_is_exact
    assert _model(sampler="ddim", ddim_steps=30, ddim_eta=1.0).sampling_is_exact


def test_keyed_noise_is_standard_normal_and_independent_of_the_batch() -> None:
    keys = torch.arange(4000)
    noise = KeyedNoise(keys, seed=7)
    first, second = noise.next((4000, 64)), noise.next((4000, 64))
    for z in (first, second):
        assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
        assert abs((z**4).mean().item() - 3) < 0.1  # normal kurtosis
    assert abs(torch.corrcoef(torch.stack([first.flatten(), second.flatten()]))[0, 1].item()) < 0.01
    # Row r depends on its key only: any subset, in any order, gets the same numbers.
    subset = torch.tensor([3999, 5, 17])
    again = KeyedNoise(keys[subset], seed=7)
    assert torch.equal(again.next((3, 64)), first[subset])
    assert torch.equal(again.next((3, 64)), second[subset])
    assert not torch.equal(KeyedNoise(keys, seed=8).next((4000, 64)), first)
    # History keys ignore left padding and see order.
    a, b = torch.tensor([[0, 0, 3, 4]]), torch.tensor([[0, 3, 4]])
    assert torch.equal(sequence_keys(a), sequence_keys(b))
    assert not torch.equal(sequence_keys(a), sequence_keys(torch.tensor([[0, 0, 4, 3]])))


def test_seeded_evaluation_is_reproducible_and_does_not_depend_on_batch_size() -> None:
    model = _model(item_scope="all")
    history = _histories(40, 60, 8)
    whole = model.recommend(history, 10)
    assert torch.equal(model.recommend(history, 10), whole)
    pieces = torch.cat([model.recommend(chunk, 10) for chunk in history.split(7)])
    assert torch.equal(pieces, whole)
    other_seed = _model(item_scope="all", eval_seed=1)
    assert not torch.allclose(other_seed.generate(history), model.generate(history))


# ------------------------------------------------------------------------------------------------
# Retrieval
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_recommend_never_returns_pad_and_respects_item_scope(backend: str) -> None:
    n = 40
    trained = torch.zeros(n + 1, dtype=torch.bool)
    trained[1:21] = True
    history = _histories(n, 16, 8)
    scoped = _model(n, item_scope="trained", retrieval_backend=backend)
    with pytest.raises(RuntimeError, match="training items"):
        scoped.recommend(history, 5)
    scoped.set_train_items(trained)
    with torch.no_grad():  # PAD and the untrained items would win every search if allowed
        scoped.item_embedding.weight[PAD_ID] = 50 * scoped.null_condition
        scoped.item_embedding.weight[21:] *= 20
    scoped.clear_sampling_cache()
    ranked = scoped.recommend(history, 30)  # more than the 20 allowed items
    assert bool(trained[ranked[:, :20]].all()), "only training items, best first"
    assert bool((ranked[:, 20:] == PAD_ID).all()), "0 only where no allowed item is left"
    assert all(len(set(row[:20].tolist())) == 20 for row in ranked)

    everything = _model(n, item_scope="all", retrieval_backend=backend)
    everything.load_state_dict(scoped.state_dict())
    ranked_all = everything.recommend(history, n)
    assert not bool((ranked_all == PAD_ID).any())
    assert bool((~trained[ranked_all[:, :5]]).any()), "the reference scope returns untrained items"


def test_fit_takes_the_training_items_from_the_datamodule_and_checkpoints_keep_them(tiny_data) -> None:
    pl.seed_everything(0)
    model = instantiate_model("dreamrec", tiny_data.num_items, tiny_data.max_len, timesteps=20)
    quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(model, datamodule=tiny_data)
    assert torch.equal(model.train_items, tiny_data.train_item_mask())
    restored = instantiate_model("dreamrec", tiny_data.num_items, tiny_data.max_len, timesteps=20)
    restored.load_state_dict(model.state_dict())
    history = next(iter(tiny_data.test_dataloader()))["history"]
    assert torch.equal(restored.eval().recommend(history, 20), model.eval().recommend(history, 20))


def test_popularity_prior_moves_the_most_trained_items_up_and_needs_the_counts() -> None:
    n = 40
    counts = torch.zeros(n + 1, dtype=torch.long)
    counts[1:] = torch.arange(n, 0, -1) ** 2  # item 1 the most trained
    history = _histories(n, 16, 8)
    plain = _model(n, item_scope="all")
    prior = _model(n, item_scope="all", popularity_prior=1000.0)
    prior.load_state_dict(plain.state_dict())
    with pytest.raises(RuntimeError, match="training counts"):
        prior.recommend(history, 5)
    prior.set_train_items(counts > 0, counts)
    assert torch.equal(prior.recommend(history, 5), torch.arange(1, 6).expand(16, 5))  # the prior dominates
    assert not torch.equal(plain.recommend(history, 5), prior.recommend(history, 5))
    assert "popularity_prior=1000" in prior.retrieval_description()
    old = {k: v for k, v in prior.state_dict().items() if k != "log_train_counts"}  # before the option
    checkpoint = {"state_dict": old}
    prior.on_load_checkpoint(checkpoint)
    assert not bool(checkpoint["state_dict"]["log_train_counts"].any())


# ------------------------------------------------------------------------------------------------
# Learning
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["dreamrec", "dreamrec_rank"])
def test_short_fit_beats_popularity(config: str) -> None:
    data = SyntheticDataModule(scale=0.02, max_len=20, batch_size=128, eval_batch_size=512)
    data.setup()
    pl.seed_everything(0)
    popularity = fit_and_test(instantiate_model("popularity", data.num_items, data.max_len), data, 1)
    pl.seed_everything(0)
    dreamrec = fit_and_test(
        instantiate_model(config, data.num_items, data.max_len, timesteps=50), data, 6
    )
    assert dreamrec["test/ndcg@10"] > 1.5 * popularity["test/ndcg@10"], (dreamrec, popularity)
    assert dreamrec["test/recall@10"] > popularity["test/recall@10"]


def test_test_metrics_do_not_depend_on_the_evaluation_batch_size() -> None:
    data = SyntheticDataModule(scale=0.02, batch_size=128, eval_batch_size=512)
    data.setup()
    pl.seed_everything(0)
    model = instantiate_model("dreamrec", data.num_items, data.max_len, timesteps=20)
    quiet_trainer(max_epochs=1, limit_val_batches=0).fit(model, datamodule=data)
    (large,) = quiet_trainer().test(model, datamodule=data, verbose=False)
    data.eval_batch_size = 37
    (small,) = quiet_trainer().test(model, datamodule=data, verbose=False)
    large.pop("test/users_per_second")
    small.pop("test/users_per_second")
    assert large == small


def test_target_norm_fixes_the_targets_norm_and_ranks_items_by_cosine() -> None:
    model = _model(40, target_norm=3.0, stop_target_gradient=False, item_scope="all").train()
    with torch.no_grad():
        model.item_embedding.weight[1:21] *= 0.01  # short rows: a dot-product search would never pick them
    targets = model.target_vectors(model.item_embedding.weight[1:])
    assert torch.allclose(targets.norm(dim=1), torch.full((40,), 3.0), atol=1e-5)
    history, target = _histories(40, 16, 8), torch.arange(1, 17)
    model.loss({"history": history, "target": target, "user": target}).backward()
    assert bool(model.item_embedding.weight.grad[target].abs().sum() > 0), "trainable targets get a gradient"
    model.eval()
    x0 = model.generate(history)
    ranked = model.recommend(history, 5)
    keys = torch.nn.functional.normalize(model.item_embedding.weight[1:].detach(), dim=1)
    assert torch.equal(ranked, (x0 @ keys.T).topk(5, dim=1).indices + 1), "cosine ranking over the normalised rows"
    with pytest.raises(ValueError, match="target_norm"):
        _model(target_norm=0.0)


def test_ranking_weight_adds_the_cross_entropy_of_the_retrieval_scores_and_trains_the_table() -> None:
    trained = torch.zeros(41, dtype=torch.bool)
    trained[1:31] = True  # items 31-40 never trained: never a class of the softmax
    plain = _model(40, dropout=0.0).train()
    ranked = _model(40, dropout=0.0, ranking_weight=0.5).train()
    for model in (plain, ranked):
        model.set_train_items(trained)
    windows, _ = _windows_and_pairs(30, users=12, max_len=8)
    captured: list[torch.Tensor] = []
    denoise = ranked.denoise
    ranked.denoise = lambda *args: captured.append(denoise(*args)) or captured[-1]  # type: ignore[method-assign]
    torch.manual_seed(7)
    mse = plain.loss(windows)
    torch.manual_seed(7)
    total = ranked.loss(windows)
    sequence = windows["sequence"]
    target = sequence[:, 1:][sequence[:, :-1] != PAD_ID]  # (M,): row-major, as the loss takes them
    (x0_hat,) = captured  # (M, d)
    scores = x0_hat @ ranked.item_embedding.weight.T  # (M, 41)
    scores[:, ~trained] = float("-inf")
    expected_ce = torch.nn.functional.cross_entropy(scores, target)
    print(f"mse {mse.item():.5f}, total {total.item():.5f}, ce {expected_ce.item():.5f}")
    assert torch.allclose(total, mse + 0.5 * expected_ce, atol=1e-5), "MSE + lambda * CE over trained items"
    # Padding-only histories: the encoder gives the table no gradient, the detached MSE target none;
    # only the ranking term reaches the target rows, and every trained row (the softmax's classes).
    for model, reaches in ((plain, False), (ranked, True)):
        model.zero_grad()
        history, target = torch.zeros(8, 8, dtype=torch.long), torch.arange(1, 9)
        model.loss({"history": history, "target": target, "user": target}).backward()
        grad = model.item_embedding.weight.grad
        reached = grad is not None and bool(grad[1:31].abs().sum(dim=1).gt(0).all())
        assert reached is reaches
        assert grad is None or bool(grad[31:].abs().sum() == 0), "untrained items are not classes"
    # The GPU grid path weighs padded rows 0; their target may be PAD: finite, and weighted out.
    assert torch.isfinite(ranked.ranking_loss(x0_hat[:2], torch.tensor([PAD_ID, 3]), torch.tensor([0.0, 1.0])))
    with pytest.raises(ValueError, match="ranking_weight"):
        _model(ranking_weight=-1.0)
