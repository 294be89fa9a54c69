"""The one learning-rate schedule helper: warm-up, cosine and inverse-sqrt, sized from allowed steps."""

import pytest
import torch

from recbench.schedules import (
    RateSchedule,
    WarmupSchedule,
    schedule_end_epoch,
    scheduler_config,
    sized_schedule,
)


def test_warmup_then_cosine_reaches_zero_at_the_allowed_steps() -> None:
    cosine = sized_schedule("cosine", warmup_steps=10, allowed_steps=110)
    assert cosine(0) == pytest.approx(0.1)
    assert cosine(9) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.5)
    assert cosine(110) == pytest.approx(0.0)
    assert cosine(500) == pytest.approx(0.0)
    assert sized_schedule("cosine", 10, float("inf"))(500) == 1.0


def test_inverse_sqrt_is_t5s_constant_then_decay() -> None:
    inverse = sized_schedule("inverse_sqrt", warmup_steps=4, allowed_steps=1000)
    assert [round(inverse(s), 4) for s in range(6)] == [1.0, 1.0, 1.0, 1.0, round((4 / 5) ** 0.5, 4),
                                                        round((4 / 6) ** 0.5, 4)]
    assert sized_schedule("inverse_sqrt", 0, 1000)(3) == pytest.approx(0.5)
    assert sized_schedule("constant", 3, 1000)(0) == pytest.approx(1 / 3)
    assert sized_schedule("constant", 3, 1000)(7) == 1.0


def test_warmup_never_outlasts_half_the_allowed_steps() -> None:
    # A 10k-step GPU warm-up under a 1,000-step cap would still be ramping when the fit ends.
    short = sized_schedule("cosine", warmup_steps=10_000, allowed_steps=1_000)
    assert short == WarmupSchedule("cosine", 500, 1_000)
    assert short(499) == pytest.approx(1.0) and short(1_000) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        sized_schedule("linear", 1, 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="warmup_steps"):
        sized_schedule("cosine", -1, 10)
    with pytest.raises(ValueError, match="allowed_steps"):
        sized_schedule("cosine", 1, 0.5)


def test_scheduler_steps_the_optimiser_learning_rate() -> None:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    config = scheduler_config(optimizer, sized_schedule("cosine", 2, 10))
    assert config["interval"] == "step"
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        config["scheduler"].step()
    assert rates == pytest.approx([0.5, 1.0, 1.0, 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 8)).item())])


def test_fit_steps_is_the_cap_or_the_first_decay_epochs() -> None:
    from types import SimpleNamespace

    from recbench.schedules import fit_steps

    trainer = SimpleNamespace(estimated_stepping_batches=1000, num_training_batches=41, accumulate_grad_batches=2)
    assert fit_steps(trainer) == 1000  # type: ignore[arg-type]
    assert fit_steps(trainer, decay_epochs=10) == 10 * 21  # type: ignore[arg-type]  # ceil(41 / 2) steps per epoch
    assert fit_steps(trainer, decay_epochs=100) == 1000  # type: ignore[arg-type]  # never past the cap
    with pytest.raises(ValueError, match="decay_epochs"):
        fit_steps(trainer, decay_epochs=0)  # type: ignore[arg-type]


def test_a_rate_schedule_is_one_recipe_sized_for_the_fit() -> None:
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="warmup_steps"):
        RateSchedule("cosine", -1)
    with pytest.raises(ValueError, match="need a cosine"):
        RateSchedule("constant", 0, decay_epochs=3)
    with pytest.raises(ValueError, match="need a cosine"):
        RateSchedule("inverse_sqrt", 10, decay_steps=3)
    with pytest.raises(ValueError, match="excludes decay_steps"):
        RateSchedule("cosine", 0, 3, 100)
    with pytest.raises(ValueError, match="decay_steps"):
        RateSchedule("cosine", 0, None, 0)
    with pytest.raises(ValueError, match="unknown schedule"):
        RateSchedule("linear")  # type: ignore[arg-type]
    trainer = SimpleNamespace(estimated_stepping_batches=1000, num_training_batches=41, accumulate_grad_batches=2)
    assert RateSchedule().sized(trainer) is None  # type: ignore[arg-type]  # a constant rate: no scheduler at all
    assert RateSchedule("constant", 10).sized(trainer) == WarmupSchedule("constant", 10, 1000)  # type: ignore[arg-type]
    assert RateSchedule("inverse_sqrt").sized(trainer) == WarmupSchedule("inverse_sqrt", 0, 1000)  # type: ignore[arg-type]
    # 10 epochs of ceil(41 / 2) steps; a warm-up longer than half the allowed steps is capped
    assert RateSchedule("cosine", 10, decay_epochs=10).sized(trainer) == WarmupSchedule("cosine", 10, 210)  # type: ignore[arg-type]
    assert RateSchedule("cosine", 500, decay_steps=300).sized(trainer) == WarmupSchedule("cosine", 150, 300)  # type: ignore[arg-type]
    assert RateSchedule("cosine", 0, 7).end_epoch == 7
    assert RateSchedule("cosine").end_epoch is None and RateSchedule("constant").end_epoch is None


def _tiger_decaying_over_two_epochs(num_items: int):  # type: ignore[no-untyped-def]
    from baselines.tiger import TIGER

    with pytest.raises(ValueError, match="decay_epochs"):
        TIGER(num_items=5, decay_epochs=10)  # a constant schedule has nothing to decay
    return TIGER(num_items=num_items, architecture="causal", encoder_input="item", history_items=50,
                 hidden_size=16, num_heads=2, ffn_size=32, encoder_layers=1, decoder_layers=1, codebook_size=16,
                 embedding_source="collaborative", lr=1e-2, lr_schedule="cosine", warmup_steps=1, decay_epochs=2)


def _diffgrm_decaying_over_two_epochs(num_items: int):  # type: ignore[no-untyped-def]
    from baselines.diffgrm import DiffGRM

    with pytest.raises(ValueError, match="decay_epochs"):
        DiffGRM(num_items=5, decay_epochs=10, decay_steps=100)  # two caps for one cosine
    with pytest.raises(ValueError, match="decay_epochs"):
        DiffGRM(num_items=5, decay_epochs=0)
    return DiffGRM(num_items=num_items, max_len=50, n_digits=2, codebook_size=4, hidden_size=16, encoder_layers=1,
                   decoder_layers=1, num_heads=2, inner_size=32, embedding_source="collaborative", collaborative_dim=8,
                   pca_dim=8, val_beam=20, test_beam=20, lr=1e-2, warmup_steps=1, decay_epochs=2)


def test_diffgrm_states_its_schedule_kind_as_tiger_does() -> None:
    from baselines.diffgrm import DiffGRM

    assert DiffGRM(num_items=5).rate_schedule == RateSchedule("cosine", 10_000)  # the reference's recipe
    assert DiffGRM(num_items=5, lr_schedule="constant", warmup_steps=100).rate_schedule == RateSchedule("constant", 100)
    with pytest.raises(ValueError, match="need a cosine"):
        DiffGRM(num_items=5, lr_schedule="constant", decay_epochs=10)


def _dreamrec_decaying_over_two_epochs(num_items: int):  # type: ignore[no-untyped-def]
    from baselines.dreamrec import DreamRec

    with pytest.raises(ValueError, match="decay_epochs"):
        DreamRec(num_items=5, decay_epochs=0)
    return DreamRec(num_items=num_items, hidden_size=16, timesteps=10, lr=1e-2, decay_epochs=2)  # the base class's cosine


@pytest.mark.parametrize(
    "build",
    [_tiger_decaying_over_two_epochs, _diffgrm_decaying_over_two_epochs, _dreamrec_decaying_over_two_epochs],
    ids=["tiger", "diffgrm", "dreamrec"],
)
def test_a_cosine_decays_over_its_decay_epochs(tiny_data, build) -> None:  # type: ignore[no-untyped-def]
    import lightning.pytorch as pl

    from tests.conftest import quiet_trainer

    class Rates(pl.Callback):
        def __init__(self) -> None:
            self.rates: list[tuple[int, float]] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            self.rates.append((trainer.current_epoch, trainer.optimizers[0].param_groups[0]["lr"]))

    model = build(tiny_data.num_items)
    rates = Rates()
    quiet_trainer(max_epochs=3, limit_train_batches=3, limit_val_batches=0, callbacks=[rates]).fit(model, datamodule=tiny_data)
    by_epoch = {epoch: [rate for e, rate in rates.rates if e == epoch] for epoch in range(3)}
    assert max(by_epoch[0]) == pytest.approx(1e-2)
    assert 0 < by_epoch[1][-1] < 1e-3  # the last step of epoch 2 is one step short of the floor
    assert by_epoch[2] == [0.0] * len(by_epoch[2])  # past decay_epochs: at the floor, not at the cap


def test_a_rate_annealed_to_zero_ends_the_useful_epochs_of_the_models_that_decay() -> None:
    from baselines.tiger import TIGER
    from recbench.model import SeqRecModel

    assert schedule_end_epoch("cosine", 30) == 30
    assert schedule_end_epoch("cosine", None) is None  # sized for the cap: the cap ends it
    assert schedule_end_epoch("constant", None) is None and schedule_end_epoch("inverse_sqrt", None) is None
    with pytest.raises(ValueError, match="decay_epochs"):
        schedule_end_epoch("cosine", 0)
    assert _tiger_decaying_over_two_epochs(20).max_useful_epochs == 2
    assert _diffgrm_decaying_over_two_epochs(20).max_useful_epochs == 2
    assert _dreamrec_decaying_over_two_epochs(20).max_useful_epochs == 2
    assert TIGER(num_items=20, hidden_size=16, num_heads=2, ffn_size=32).max_useful_epochs is None
    assert SeqRecModel.max_useful_epochs is None  # per instance: the class default is untouched

