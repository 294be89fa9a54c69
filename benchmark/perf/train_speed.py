"""Training and test speed of every model config on the current device, with time to quality.

    python -m benchmark.perf.train_speed --dataset beauty [--models sasrec dreamrec ...]
        [--profile quick] [--epochs 3] [--max-train-batches N] [--max-test-users N]
        [--seed 1] [--device auto|cpu|cuda] [--out results/perf]

For every model config (default: every base config, as ``recbench bench``; the profile's variant
where it has one) it fits ``--epochs`` epochs through a Lightning Trainer set up as the runner's
(the profile's validation subset and precision: bf16-mixed on GPU, 32-true on CPU), and measures:

- **seconds per epoch**: training time only (validation excluded), the mean over the epochs run.
  With ``--max-train-batches N`` each epoch runs its first N batches and the time is extrapolated
  to the full epoch (``batches per epoch / N``); the report marks it;
- **optimiser steps per second** over the same time;
- **padding share**: padded item slots / all item slots of the grid each training batch feeds the
  encoder, over every batch run (counted on the device, no host read inside a step): the batch's ``history`` (pairs) or ``sequence[:, :-1]``
  (sequence view), cut to the model's ``history_items`` where it has one (TIGER), after the
  shared :func:`~recbench.batch.trim_left_padding`. A model that packs its real tokens (TIGER's
  projections, DiffGRM's encoder) computes less than this on padding; the share is the grid's;
- **peak memory** of the fit (the runner's :class:`~benchmark.run.PeakMemory`: the CUDA allocator
  peak, or the CPU resident-set high-water mark, which includes the process's baseline);
- **test users per second** at the profile's beam: ``trainer.test`` (the shared evaluation:
  ``recommend`` at the model's test beam, metrics, both protocols) over the first
  ``--max-test-users`` test cases (all by default), wall time, first batch included;
- **time to quality**: validation NDCG@10 after each epoch against the cumulative training seconds.

Writes ``<out>/train_speed_<dataset>_<cpu|cuda>.json`` and ``.md`` atomically (the device name
and the date are in both). Timings are only meaningful on an otherwise idle machine.

It replaces ``sasrec_speed.py`` (the same two figures for one model; its stored figures in
``results/perf/`` stay). ``tiger_speed.py`` and ``diffgrm_speed.py`` stay: they sweep beam widths
and time trained checkpoints, which this script does not.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from benchmark.perf.common import environment, write_report
from benchmark.registry import instantiate_data, instantiate_model
from benchmark.run import PeakMemory, default_models, load_profile, model_config_for
from recbench.batch import HISTORY, PAD_ID, SEQUENCE, Batch
from recbench.model import SELECTION_METRIC, SeqRecModel


def encoder_grid(model: SeqRecModel, batch: Batch) -> torch.Tensor:
    """The item grid ``(B, L)`` a training batch feeds the model's encoder, before the shared trim."""
    grid = batch[SEQUENCE][:, :-1] if SEQUENCE in batch else batch[HISTORY]  # (B, L)
    history_items = getattr(model, "history_items", None)
    if isinstance(history_items, int):
        grid = grid[:, -history_items:]
    return grid


def trimmed_padding(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(padded slots, all slots)`` of ``trim_left_padding(grid)`` as device scalars.

    The same count as :func:`~recbench.batch.padding_slots` of the trimmed grid (for a grid with a
    real item, as every training grid has), without reading anything back to the host: the probe
    must not add a synchronisation to the training step it times.
    """
    real = grid != PAD_ID  # (B, L)
    lead = real.any(dim=0).to(torch.int8).argmax()  # leading all-padding columns
    rows, width = grid.shape
    slots = (width - lead) * rows
    return slots - real.sum(), slots


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SpeedProbe(Callback):
    """Training seconds (validation excluded), optimiser steps, padding slots and validation NDCG@10
    per epoch."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.epochs: list[dict[str, float]] = []
        self.padded = self.slots = torch.zeros((), dtype=torch.long, device=device)
        self._epoch_start = self._val_start = self._val_seconds = 0.0
        self._steps_start = self._batches = 0
        self._ndcg = float("nan")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync(self.device)
        self._epoch_start, self._val_seconds = time.perf_counter(), 0.0
        self._steps_start, self._batches = trainer.global_step, 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        padded, slots = trimmed_padding(encoder_grid(pl_module, batch))  # type: ignore[arg-type]
        self.padded, self.slots, self._batches = self.padded + padded, self.slots + slots, self._batches + 1

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync(self.device)
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_seconds += time.perf_counter() - self._val_start
        self._ndcg = float(trainer.callback_metrics.get(SELECTION_METRIC, float("nan")))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync(self.device)
        seconds = time.perf_counter() - self._epoch_start - self._val_seconds
        self.epochs.append(
            {
                "train_seconds": seconds,
                "batches": self._batches,
                "steps": trainer.global_step - self._steps_start,
                "val_ndcg@10": self._ndcg,
            }
        )
        self._ndcg = float("nan")


def measure(
    name: str,
    dataset: str,
    profile_name: str,
    epochs: int,
    max_train_batches: int | None,
    max_test_users: int | None,
    seed: int,
    device: torch.device,
    length_buckets: int | None = None,
) -> dict[str, object]:
    """Fit one model config for ``epochs`` epochs and time it (module docstring); ``length_buckets``
    as the datamodule option (None: the data config's own setting)."""
    profile = load_profile(profile_name)
    config = model_config_for(name, profile)
    pl.seed_everything(seed, workers=True, verbose=False)
    bucketing = {} if length_buckets is None else {"length_buckets": length_buckets}
    data = instantiate_data(dataset, val_subset=profile.val_subset, **bucketing)
    model = instantiate_model(config, data.num_items, data.max_len)
    data.train_format = model.training_view  # what "auto" resolves to under a Trainer
    if model.max_useful_epochs is not None:
        epochs = min(epochs, model.max_useful_epochs)
    probe = SpeedProbe(device)
    common: dict[str, Any] = dict(
        accelerator=device.type,
        devices=1,
        precision=profile.precision or ("bf16-mixed" if device.type == "cuda" else "32-true"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        num_sanity_val_steps=0,
        limit_train_batches=max_train_batches or 1.0,
        callbacks=[probe],
        **common,
    )
    memory = PeakMemory()
    memory.start()
    trainer.fit(model, datamodule=data)
    peak_mb = memory.peak_mb()
    full_batches = len(data.train_dataloader())  # under the fit's trainer: the model's recipe batch applies

    test_batches = math.ceil(max_test_users / data.eval_batch_size) if max_test_users else 1.0
    tester = pl.Trainer(limit_test_batches=test_batches, **common)
    _sync(device)
    started = time.perf_counter()
    tester.test(model, datamodule=data, verbose=False)
    _sync(device)
    test_seconds = time.perf_counter() - started
    test_users = data.split_counts.test_cases
    if max_test_users:
        test_users = min(test_users, int(test_batches) * data.eval_batch_size)

    curve, elapsed = [], 0.0
    for index, epoch in enumerate(probe.epochs, start=1):
        scale = full_batches / epoch["batches"] if epoch["batches"] else 1.0
        elapsed += epoch["train_seconds"] * scale
        curve.append({"epoch": index, "train_seconds": round(elapsed, 3), "val_ndcg@10": round(epoch["val_ndcg@10"], 5)})
    run_batches = sum(e["batches"] for e in probe.epochs)
    run_seconds = sum(e["train_seconds"] for e in probe.epochs)
    run_steps = sum(e["steps"] for e in probe.epochs)
    return {
        "model": config,
        "class": type(model).__name__,
        "training_view": model.training_view,
        "parameters": model.num_parameters(),
        "batch_size": data.resolved_batch_size(),
        "length_buckets": data.length_buckets,
        "batches_per_epoch": full_batches,
        "epochs": len(probe.epochs),
        "batches_timed": run_batches,
        "extrapolated": run_batches < full_batches * len(probe.epochs),
        "seconds_per_epoch": round(run_seconds / run_batches * full_batches, 3) if run_batches else 0.0,
        "steps_per_second": round(run_steps / run_seconds, 2) if run_seconds else 0.0,
        "padding_share": round(int(probe.padded) / int(probe.slots), 4) if int(probe.slots) else 0.0,
        "peak_memory_mb": round(peak_mb, 1),
        "memory_scope": memory.scope,
        "test_users": test_users,
        "test_users_per_second": round(test_users / test_seconds, 1),
        "time_to_quality": curve,
    }


def _markdown(payload: dict[str, Any]) -> str:
    rows = payload["models"]
    lines = [
        f"# Training speed on {payload['dataset']} ({payload['device']})",
        "",
        f"Profile {payload['profile']}, {payload['epochs']} epoch(s), seed {payload['seed']}, "
        f"{payload['threads']} threads, torch {payload['torch']}, {payload['date']}, commit {payload['git_commit']}.",
        "",
        "| model | view | params | s / epoch | steps / s | padding share | peak MB | test users / s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mark = " (extrapolated)" if row["extrapolated"] else ""
        lines.append(
            f"| {row['model']} | {row['training_view']} | {row['parameters']:,} | {row['seconds_per_epoch']:.1f}{mark} "
            f"| {row['steps_per_second']:.1f} | {row['padding_share']:.3f} | {row['peak_memory_mb']:.0f} "
            f"| {row['test_users_per_second']:.0f} ({row['test_users']} users) |"
        )
    lines += ["", "Time to quality: validation NDCG@10 at cumulative training seconds, per epoch.", ""]
    lines += ["| model | " + " | ".join(f"epoch {i}" for i in range(1, payload["epochs"] + 1)) + " |"]
    lines += ["|---|" + "---|" * payload["epochs"]]
    for row in rows:
        cells = [f"{p['val_ndcg@10']:.4f} @ {p['train_seconds']:.1f} s" for p in row["time_to_quality"]]
        cells += [""] * (payload["epochs"] - len(cells))
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--models", nargs="+", default=None, help="model configs (default: every base config)")
    parser.add_argument("--profile", default="quick", help="validation subset, precision and model variants")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the time-to-quality curve")
    parser.add_argument("--max-train-batches", type=int, default=None, help="time a prefix, extrapolate the epoch")
    parser.add_argument("--max-test-users", type=int, default=None, help="test on this many cases (default all)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--length-buckets", type=int, default=None, help="length-bucketed batches (default: as configured)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--out", type=Path, default=Path("results/perf"))
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.models:
        models = [row for name in args.models for row in name.split(",") if row]
    else:
        models = default_models(load_profile(args.profile))
    results = []
    for name in models:
        print(f"[train_speed] {name} on {args.dataset} ({device.type})", flush=True)
        results.append(
            measure(name, args.dataset, args.profile, args.epochs, args.max_train_batches, args.max_test_users, args.seed,
                    device, args.length_buckets)
        )
    data_name = instantiate_data(args.dataset).name
    payload: dict[str, Any] = {
        **environment(),
        "device_type": device.type,
        "dataset": data_name,
        "profile": args.profile,
        "epochs": args.epochs,
        "seed": args.seed,
        "max_train_batches": args.max_train_batches,
        "max_test_users": args.max_test_users,
        "models": results,
    }
    markdown = _markdown(payload)
    paths = write_report(args.out, f"train_speed_{data_name}_{device.type}", payload, markdown)
    print(markdown)
    print("wrote", *paths)
    return payload


if __name__ == "__main__":
    main()
