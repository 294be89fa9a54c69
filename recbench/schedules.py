"""Learning-rate schedules sized from the optimiser steps a fit is allowed: the one helper every model uses.

A profile ends a fit by early stopping under an epoch or step cap, so the only step count known in
advance is the cap: ``trainer.estimated_stepping_batches`` (max_epochs x batches per epoch, or
max_steps, after ``limit_train_batches`` and gradient accumulation). Cosine decay reaches its floor
exactly there, and a warm-up never takes more than half of it (a warm-up written for a long GPU
recipe would otherwise still be ramping when a short profile's cap arrives).

Kinds, as a multiplier of the base learning rate after ``step`` optimiser steps (0-based):

- ``constant``: linear warm-up ``(step + 1) / warmup``, then 1.
- ``cosine``: the same warm-up, then ``0.5 (1 + cos(pi p))`` with ``p = (step - warmup) / (total - warmup)``
  clipped to [0, 1] (the reference DiffGRM schedule).
- ``inverse_sqrt``: T5's ``sqrt(warmup / max(step + 1, warmup))``: constant for ``warmup`` steps, then
  ``1 / sqrt(step)`` decay; with no warm-up, ``1 / sqrt(step + 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import lightning.pytorch as pl
import torch

ScheduleKind = Literal["constant", "cosine", "inverse_sqrt"]


@dataclass(frozen=True)
class WarmupSchedule:
    """A picklable ``LambdaLR`` multiplier (checkpoints store the scheduler).

    Args:
        kind: ``constant``, ``cosine`` or ``inverse_sqrt`` (see the module docstring).
        warmup_steps: warm-up length in optimiser steps (already capped by :func:`sized_schedule`).
        total_steps: the step at which cosine decay reaches 0; None = no cap, no decay.
    """

    kind: ScheduleKind
    warmup_steps: int
    total_steps: int | None

    def __call__(self, step: int) -> float:
        done = step + 1
        if self.kind == "inverse_sqrt":
            if self.warmup_steps:
                return math.sqrt(self.warmup_steps / max(done, self.warmup_steps))
            return 1.0 / math.sqrt(done)
        if step < self.warmup_steps:
            return done / self.warmup_steps
        if self.kind == "cosine" and self.total_steps is not None:
            progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0


def _check_kind_and_warmup(kind: ScheduleKind, warmup_steps: int) -> None:
    if kind not in ("constant", "cosine", "inverse_sqrt"):
        raise ValueError(f"unknown schedule {kind!r}: expected constant, cosine or inverse_sqrt")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")


def _check_decay_epochs(decay_epochs: int | None) -> None:
    if decay_epochs is not None and decay_epochs < 1:
        raise ValueError(f"decay_epochs must be >= 1 or None, got {decay_epochs}")


def schedule_end_epoch(kind: ScheduleKind, decay_epochs: int | None) -> int | None:
    """Epochs after which the learning rate stays 0: a ``cosine`` decaying over its first
    ``decay_epochs`` epochs (:func:`fit_steps`). Every later step is a no-op (AdamW's step and its
    decoupled weight decay both scale with the rate), so the model cannot change any more and the
    fit is complete there, wherever validation noise would have put an early stop. None for other
    schedules (a cosine sized for the cap ends with the cap)."""
    _check_decay_epochs(decay_epochs)
    return decay_epochs if kind == "cosine" else None


def sized_schedule(kind: ScheduleKind, warmup_steps: int, allowed_steps: float) -> WarmupSchedule:
    """The schedule for a fit allowed ``allowed_steps`` optimiser steps (its cap; ``inf`` = uncapped).

    The warm-up is capped at half the allowed steps; cosine decays over the rest.
    """
    _check_kind_and_warmup(kind, warmup_steps)
    if not allowed_steps >= 1:
        raise ValueError(f"allowed_steps must be >= 1, got {allowed_steps}")
    if not math.isfinite(allowed_steps):
        return WarmupSchedule(kind, warmup_steps, None)
    total = int(allowed_steps)
    return WarmupSchedule(kind, min(warmup_steps, total // 2), total)


def fit_steps(trainer: pl.Trainer, decay_epochs: int | None = None) -> float:
    """The optimiser steps a schedule is sized for: the fit's cap (``estimated_stepping_batches``),
    or the steps of its first ``decay_epochs`` epochs when that comes sooner (a cosine that reaches
    its floor near where early stopping ends a fit, instead of at an epoch cap it never meets)."""
    _check_decay_epochs(decay_epochs)
    cap = float(trainer.estimated_stepping_batches)  # loads the training batches, so their count is known
    if decay_epochs is None:
        return cap
    per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
    return min(cap, float(decay_epochs * per_epoch))


@dataclass(frozen=True)
class RateSchedule:
    """A model's learning-rate recipe, before the fit's size is known: what its init arguments say.

    Every model states its schedule as one of these (:meth:`recbench.model.SeqRecModel.use_rate_schedule`)
    and the base class sizes it for the fit and hands it to Lightning, so the rules live here once.

    Args:
        kind: ``constant``, ``cosine`` or ``inverse_sqrt`` (see the module docstring).
        warmup_steps: warm-up length (constant, cosine) or constant phase (inverse_sqrt) in optimiser steps.
        decay_epochs: a cosine reaches 0 after this many epochs' steps (:func:`fit_steps`), where the fit
            is complete (:attr:`end_epoch`); None: at the fit's cap.
        decay_steps: or a cosine reaches 0 at this optimiser step; at most one of the two.
    """

    kind: ScheduleKind = "constant"
    warmup_steps: int = 0
    decay_epochs: int | None = None
    decay_steps: int | None = None

    def __post_init__(self) -> None:
        _check_kind_and_warmup(self.kind, self.warmup_steps)
        _check_decay_epochs(self.decay_epochs)
        if self.decay_epochs is not None and self.decay_steps is not None:
            raise ValueError(f"decay_epochs (got {self.decay_epochs}) excludes decay_steps (got {self.decay_steps})")
        if self.kind != "cosine" and (self.decay_epochs is not None or self.decay_steps is not None):
            raise ValueError(
                f"decay_epochs (got {self.decay_epochs}) and decay_steps (got {self.decay_steps}) need a cosine "
                f"schedule, got {self.kind!r}: a constant or inverse-sqrt rate has nothing to decay to"
            )
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ValueError(f"decay_steps must be >= 1 or None, got {self.decay_steps}")

    @property
    def end_epoch(self) -> int | None:
        """The epochs after which the rate stays 0 (:func:`schedule_end_epoch`), or None."""
        return schedule_end_epoch(self.kind, self.decay_epochs)

    def sized(self, trainer: pl.Trainer) -> WarmupSchedule | None:
        """The multiplier for this trainer's fit; None for a constant rate without warm-up (no scheduler)."""
        if self.kind == "constant" and self.warmup_steps == 0:
            return None
        allowed = float(self.decay_steps) if self.decay_steps is not None else fit_steps(trainer, self.decay_epochs)
        return sized_schedule(self.kind, self.warmup_steps, allowed)


def scheduler_config(optimizer: torch.optim.Optimizer, schedule: WarmupSchedule) -> dict[str, object]:
    """Lightning's ``lr_scheduler`` entry: the multiplier applied after every optimiser step."""
    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), "interval": "step"}
