"""The one learning-rate schedule helper: warm-up, cosine and inverse-sqrt, sized from allowed steps."""

import pytest
import torch

from recbench.schedules import WarmupSchedule, scheduler_config, sized_schedule


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
