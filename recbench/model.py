"""`SeqRecModel`: the one LightningModule base every model extends.

A model implements two things (RecBole's small contract):

- ``loss(batch) -> Tensor`` (or its own ``training_step``), and
- ``recommend(history (B, L), k) -> (B, k)``: distinct item ids best first, 0 where it has fewer than
  ``k`` valid items, never the padding id as a real item.

Validation, test and predict steps live here only, so every model is evaluated by the same code:
full ranking, targets ranked by :class:`~recbench.metrics.RankingMetrics`, model selection on
``val/ndcg@10``.

Two protocols from one scoring pass (test only): the primary metrics keep history items in the
ranking (repeat purchases exist; TIGER and genrec evaluate so), and the ``…_excl`` metrics drop them
(RecBole's and RecTools/eSASRec's protocol). The model is asked once for ``K + L`` items (L the
history width); the kept list is its first K, the excluded list the first K that
are not in the user's history. A model that returns fewer items than asked (a beam narrower than
K + L) may leave an excluded list short although enough items exist; the share of such cases is
logged as ``test/excluded_short_rate`` and marks the excluded metrics approximate. Validation
computes only the kept metrics (model selection uses ``val/ndcg@10``).

Evaluation scores are computed in float32 even when training runs under bf16 autocast.

The base also measures what the leaderboard reports besides quality: ``train/epoch_seconds`` and
``test/users_per_second``, and it keeps per-case test metrics for paired significance tests.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import ClassVar, Literal

import lightning.pytorch as pl
import torch

from recbench.batch import CASE, HISTORY, PAD_ID, TARGET, USER, Batch
from recbench.metric_names import EXCLUDED_SUFFIX, ID_LEVEL_PREFIX
from recbench.metrics import DEFAULT_KS, DecodeStats, RankingMetrics, case_metric_values, metric_names
from recbench.schedules import RateSchedule, WarmupSchedule, scheduler_config

SELECTION_METRIC = "val/ndcg@10"


def float32_scores(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Evaluation scores in float32: switch off any autocast a bf16 training precision installed.

    The ``meta`` device (shape-only tensors, used to prove that steps read nothing back from the
    device) has no autocast, hence nothing to switch off.
    """
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def _distinct_count(history: torch.Tensor) -> torch.Tensor:
    """Number of distinct real items per row of a (B, L) history."""
    ordered = torch.sort(history, dim=1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    return (first & (ordered != PAD_ID)).sum(dim=1)


class SeqRecModel(pl.LightningModule):
    """Base class. Subclasses call ``super().__init__(num_items, max_len, ...)`` first.

    Args:
        num_items: N, the number of real items (ids 1..N). Linked from the datamodule.
        max_len: history length the data provides. Linked from the datamodule.
        lr: learning rate of the default AdamW optimiser.
        weight_decay: AdamW weight decay.
        ks: cut-offs for Recall/NDCG/MRR.
        decay_epochs: None (a constant rate) or the epochs over which the default optimiser's rate
            follows a cosine to 0 (:mod:`recbench.schedules`, no warm-up); the fit then trains exactly
            those epochs and is ``complete`` (:attr:`max_useful_epochs`). Models with a schedule of
            their own (warm-up, another kind) state it with :meth:`use_rate_schedule`.
    """

    #: Which training view the model consumes: whole sequences or (history, target) pairs.
    training_view: ClassVar[Literal["sequence", "pairs"]] = "pairs"
    #: Epochs after which training cannot change the model (e.g. 1 for counting baselines, or the end
    #: of a learning-rate schedule that decays to 0: :func:`~recbench.schedules.schedule_end_epoch`);
    #: a class default that a model may set per instance. The runner trains such a fit to this epoch
    #: without early stopping and stores it as ``complete``.
    max_useful_epochs: int | None = None

    def __init__(
        self,
        num_items: int,
        max_len: int = 50,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        ks: Sequence[int] = DEFAULT_KS,
        decay_epochs: int | None = None,
    ) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items = num_items
        self.max_len = max_len
        self.lr = lr
        self.weight_decay = weight_decay
        self.use_rate_schedule(RateSchedule("constant" if decay_epochs is None else "cosine", 0, decay_epochs))
        self.ks = tuple(sorted(set(ks)))
        if 10 not in self.ks:
            raise ValueError(f"ks must include 10: model selection uses {SELECTION_METRIC}; got {list(ks)}")
        self.val_metrics = RankingMetrics(self.ks)
        self.test_metrics = RankingMetrics(self.ks)
        self.test_metrics_excluded = RankingMetrics(self.ks)
        #: The same lists scored at ID level (see :meth:`shared_id_keys`); used only by models with shared IDs.
        self.test_metrics_id = RankingMetrics(self.ks)
        self._test_id_keys: torch.Tensor | None = None
        #: Training batch size of the model's recipe (rows; for a sequence-view model, rows' worth of
        #: targets, see :mod:`recbench.data`), or None for the datamodule's ``batch_size``. A model
        #: whose recipe fixes its batch (an lr tuned for it, a step count) sets it from an init argument;
        #: the datamodule applies it under a Trainer and the row records it.
        self.training_batch_size: int | None = None
        #: Test cases whose history-excluded list came out shorter than K although enough items exist.
        self.excluded_short = DecodeStats()
        #: Generative models count invalid decoded IDs here from ``recommend``; logged per stage.
        self.decode_stats = DecodeStats()
        #: After a test epoch: case index, user and metric values (in ``metric_names(ks)`` order) per
        #: case, sorted by case index, gathered from every process.
        self.test_cases: torch.Tensor | None = None
        self.test_case_users: torch.Tensor | None = None
        self.test_case_values: torch.Tensor | None = None
        self._test_rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._clock: dict[str, float] = {}

    # ------------------------------------------------------------------ model contract
    def loss(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement loss(batch) or training_step")

    def recommend(self, history: torch.Tensor, k: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement recommend(history, k)")

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        # The logger reads the step value every `log_every_n_steps`; the progress bar shows the epoch
        # mean, because a per-step bar value is a device read-back (`.item()`) after every step.
        batch_size = len(batch[USER])
        self.log("train/loss", loss, batch_size=batch_size)
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch_size)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, object] | None:
        parameters = [p for p in self.parameters() if p.requires_grad]
        if not parameters:
            return None
        return self.scheduled(self.adamw(parameters))

    def use_rate_schedule(self, schedule: RateSchedule) -> None:
        """State the model's learning-rate recipe (validated by :class:`~recbench.schedules.RateSchedule`);
        a rate that anneals to 0 at an epoch ends the model's useful epochs there."""
        self.rate_schedule = schedule
        #: The multiplier :meth:`scheduled` sized for the fit (None before, or for a constant rate).
        self.sized_rate_schedule: WarmupSchedule | None = None
        if schedule.end_epoch is not None:
            self.max_useful_epochs = schedule.end_epoch

    def scheduled(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer | dict[str, object]:
        """``optimizer`` under :attr:`rate_schedule`, sized for this trainer's fit, as
        ``configure_optimizers`` returns it."""
        self.sized_rate_schedule = self.rate_schedule.sized(self.trainer)
        if self.sized_rate_schedule is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler_config(optimizer, self.sized_rate_schedule)}

    def adamw(self, parameters: Sequence[torch.nn.Parameter] | None = None) -> torch.optim.AdamW:
        """AdamW at the model's ``lr``/``weight_decay``; the fused kernel on CUDA and CPU (one kernel
        for every parameter instead of about ten small ops per tensor; same update up to float
        rounding). Other devices get the default implementation."""
        if parameters is None:
            parameters = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            parameters, lr=self.lr, weight_decay=self.weight_decay, fused=self.device.type in ("cuda", "cpu")
        )

    def clip_gradients(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, which also works for the fused AdamW of :meth:`adamw` under bf16.

        Lightning refuses to clip for an optimiser that unscales gradients inside its step (fused
        AdamW) under any mixed precision, since a gradient scaler would leave them scaled. bf16 and
        fp32 have no scaler, so the gradients are the true ones and are clipped here, as Lightning
        clips them for an unfused optimiser. With a scaler (fp16) Lightning's error stands.
        """
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if not gradient_clip_val or scaler is not None or not getattr(optimizer, "_step_supports_amp_scaling", False):
            super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(parameters, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(parameters, gradient_clip_val)

    def on_train_epoch_start(self) -> None:
        self._clock["train"] = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        self.log("train/epoch_seconds", time.perf_counter() - self._clock["train"], sync_dist=True)

    # ------------------------------------------------------------------ evaluation (shared, final)
    def ranked_items(self, history: torch.Tensor, k: int) -> torch.Tensor:
        """``recommend`` in float32, with its output checked: (B, k) item ids, best first."""
        with float32_scores(history.device):
            ranked = self.recommend(history, k)
        if ranked.shape != (history.shape[0], k) or ranked.dtype != torch.long:
            raise RuntimeError(
                f"{type(self).__name__}.recommend must return a LongTensor of shape {(history.shape[0], k)}, "
                f"got {ranked.dtype} {tuple(ranked.shape)}"
            )
        return ranked

    def ranked_items_both(self, history: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One ``recommend`` call, two protocols: ``(kept (B, k), excluded (B, k), short (B,))``.

        ``kept`` is the model's top k; ``excluded`` the top k of the same list after dropping items of
        the history (stable: the model's order is kept); ``short`` marks rows whose excluded list has
        fewer than k items although the catalogue has k items outside the history, i.e. the model
        returned too few candidates for an exact excluded ranking.
        """
        # K + L rather than K + (longest real history): L is static, so no host-device sync.
        candidates = self.ranked_items(history, k + history.shape[1])  # (B, k + L)
        kept = candidates[:, :k]
        in_history = (candidates.unsqueeze(2) == history.unsqueeze(1)).any(dim=2) & (candidates != PAD_ID)
        # Stable compaction: items outside the history first, in the model's order.
        order = torch.sort(in_history.to(torch.int8), dim=1, stable=True).indices
        excluded = torch.where(in_history, torch.zeros_like(candidates), candidates).gather(1, order)[:, :k]
        distinct_history = _distinct_count(history)
        possible = torch.clamp(self.num_items - distinct_history, max=k)
        short = (excluded != PAD_ID).sum(dim=1) < possible
        return kept, excluded, short

    def _evaluate(self, batch: Batch, metrics: RankingMetrics) -> torch.Tensor:
        ranked = self.ranked_items(batch[HISTORY], max(self.ks))
        metrics.update(ranked, batch[TARGET])
        return ranked

    def on_validation_epoch_start(self) -> None:
        self.decode_stats.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        self._log_decode_stats("val")
        for name, value in values.items():
            self.log(f"val/{name}", value.float(), prog_bar=f"val/{name}" == SELECTION_METRIC)

    def on_test_epoch_start(self) -> None:
        self._test_rows = []
        self.decode_stats.reset()
        self._test_id_keys = self.shared_id_keys()  # once per test: finding them reads the device
        self._clock["test"] = time.perf_counter()

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        kept, excluded, short = self.ranked_items_both(batch[HISTORY], max(self.ks))
        target = batch[TARGET]
        self.test_metrics.update(kept, target)
        self.test_metrics_excluded.update(excluded, target)
        self.excluded_short.update(short.sum(), short.numel())
        keys = self._test_id_keys
        if keys is not None:  # an item sharing the target's ID counts as a hit (reference evaluators)
            self.test_metrics_id.update(keys[kept], keys[target])
        values = torch.cat(
            [case_metric_values(kept, target, self.ks), case_metric_values(excluded, target, self.ks)], dim=1
        )
        self._test_rows.append((batch[CASE].cpu(), batch[USER].cpu(), values.cpu()))

    def on_test_epoch_end(self) -> None:
        seconds = time.perf_counter() - self._clock["test"]
        local_cases = sum(len(cases) for cases, _, _ in self._test_rows)
        values = self.test_metrics.compute()
        excluded = self.test_metrics_excluded.compute()
        short, cases_counted = self.excluded_short.compute()
        self.test_metrics.reset()
        self.test_metrics_excluded.reset()
        self.excluded_short.reset()
        self._log_decode_stats("test")
        self.log_dict({f"test/{name}": value.float() for name, value in values.items()})
        self.log_dict({f"test/{name}{EXCLUDED_SUFFIX}": value.float() for name, value in excluded.items()})
        self.log("test/excluded_short_rate", (short / cases_counted.clamp(min=1)).float())
        if self.test_metrics_id.update_count:
            id_level = self.test_metrics_id.compute()
            self.log_dict({f"test/{ID_LEVEL_PREFIX}{name}": value.float() for name, value in id_level.items()})
        self.test_metrics_id.reset()
        # Each rank timed its own share in parallel: throughput adds up across ranks.
        self.log("test/users_per_second", local_cases / max(seconds, 1e-9), reduce_fx="sum", sync_dist=True)
        width = len(self.case_value_names)
        cases = torch.cat([c for c, _, _ in self._test_rows]) if self._test_rows else torch.zeros(0, dtype=torch.long)
        users = torch.cat([u for _, u, _ in self._test_rows]) if self._test_rows else torch.zeros(0, dtype=torch.long)
        rows = torch.cat([v for _, _, v in self._test_rows]) if self._test_rows else torch.zeros(0, width)
        if self.trainer.world_size > 1:
            gathered: list[tuple[torch.Tensor, ...] | None] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, (cases, users, rows))
            cases, users, rows = (torch.cat([g[i] for g in gathered if g is not None]) for i in range(3))
        order = torch.argsort(cases)
        self.test_cases, self.test_case_users, self.test_case_values = cases[order], users[order], rows[order]
        self._test_rows = []

    @property
    def case_value_names(self) -> list[str]:
        """Column names of :attr:`test_case_values`: kept metrics, then the ``…_excl`` ones."""
        names = metric_names(self.ks)
        return [*names, *(f"{name}{EXCLUDED_SUFFIX}" for name in names)]

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return {USER: batch[USER], "items": self.ranked_items(batch[HISTORY], max(self.ks))}

    def run_notes(self) -> dict[str, object]:
        """Settings a result row must record beyond the hyper-parameters (e.g. sampler, index kind)."""
        return {}

    def shared_id_keys(self) -> torch.Tensor | None:
        """``(N + 1,)`` LongTensor giving each item its ID's key (>= 1; 0 at PAD), for models whose
        items can share an ID (a semantic ID without a collision digit); None when every item has
        its own ID. With keys, the test also reports ``id_…`` metrics: the same ranked item lists,
        where any item sharing the target's ID counts as a hit (the ID-level view of the
        generative papers' evaluators), so the gap to the item-level metrics shows that inflation."""
        return None

    def item_id_stats(self) -> dict[str, float]:
        """Static facts of the model's item IDs for result rows (e.g. ``collision_rate``); none here."""
        return {}

    def _log_decode_stats(self, stage: str) -> None:
        # Models that decode IDs update on every recommend call, so every rank agrees on this test.
        if self.decode_stats.update_count == 0:
            return
        invalid, candidates = self.decode_stats.compute()  # synced sums
        self.decode_stats.reset()
        if candidates > 0:
            self.log(f"{stage}/invalid_id_rate", (invalid / candidates).float())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
