"""The benchmark runner: ``recbench bench --dataset D [--models a,b] [--seeds 1,2,3] [--profile P]``.

For every (model config, seed) it fits with early stopping on ``val/ndcg@10``, tests the best
checkpoint once, and appends one row to ``results/<dataset>.csv`` (schema :data:`ROW_COLUMNS`,
version :data:`ROW_SCHEMA_VERSION`) plus ``results/runs/<run_id>/`` with the resolved config
(``config.json``), the metrics (``metrics.json``) and per-case metric values (``cases.parquet``) for
paired significance tests.

Robustness:

- appends hold an exclusive ``fcntl`` lock on ``<csv>.lock`` and rewrite the CSV through a temporary
  file and ``os.replace``: two runners at once lose nothing and a crash never leaves a partial row;
- checkpoints live in ``<work_dir>/<run_id>/checkpoints``; rerunning the same command after a crash
  resumes from ``last.ckpt``;
- a run whose key (dataset, protocol, model, config, seed, profile, device) is already in the CSV is
  skipped unless ``--force`` (which replaces the row).

Model configs: ``<name>.yaml`` serves the smoke and quick profiles, ``<name>_paper.yaml`` the paper
profile where it exists. Trainer options pass through (``--trainer.strategy ddp
--trainer.devices 2``); the row records the world size.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import platform
import resource
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import lightning.pytorch as pl
import polars
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, Timer

from benchmark.loggers import LoggerSpec
from benchmark.registry import CONFIG_DIR, config_names, instantiate_data, instantiate_model, resolve_config
from benchmark.store import atomic_write_text, device_slug, locked, read_rows
from recbench.data import SeqRecDataModule
from recbench.metrics import metric_names
from recbench.model import SELECTION_METRIC, SeqRecModel

ROW_SCHEMA_VERSION = 1
METRIC_COLUMNS = metric_names((5, 10, 20))
# A run's identity. The device is part of it because a time-budgeted profile (quick) gives different
# numbers on different hardware; rows from two devices are never merged into one mean.
KEY_COLUMNS = ("dataset", "protocol", "model", "config", "seed", "profile", "device")
ROW_COLUMNS: tuple[str, ...] = (
    "dataset",
    "protocol",
    "model",
    "config",
    "seed",
    "profile",
    *METRIC_COLUMNS,
    "invalid_id_rate",
    "collision_rate",
    "parameters",
    "epochs",
    "best_epoch",
    "train_seconds",
    "seconds_per_epoch",
    "test_users_per_second",
    "peak_memory_mb",
    "device",
    "precision",
    "world_size",
    "val_subset",
    "exclude_history",
    "git_commit",
    "config_hash",
    "data_fingerprint",
    "date",
    "run_id",
    "notes",
    "schema_version",
)


@dataclass(frozen=True)
class Profile:
    """A benchmark profile (``benchmark/configs/profile/<name>.yaml``); unknown keys are errors.

    Args:
        name: profile name recorded in every row.
        max_epochs: epoch budget.
        patience: early-stopping patience in validation epochs.
        val_subset: validate on this many seeded validation cases (None = all).
        limit_train_batches: cap on training batches per epoch (smoke runs).
        check_val_every_n_epoch: validation cadence.
        model_variant: use ``<model>_<variant>.yaml`` where that file exists.
        precision: Lightning precision; None = bf16-mixed on GPU, 32-true on CPU.
        max_minutes: wall-clock budget for one fit (training plus its validations); when it runs
            out mid-epoch Lightning validates once more, so the best checkpoint always exists. A
            budgeted profile gives hardware-dependent numbers: rows are keyed and ranked per device.
    """

    name: str
    max_epochs: int
    patience: int
    val_subset: int | None = None
    limit_train_batches: int | None = None
    check_val_every_n_epoch: int = 1
    model_variant: str = ""
    precision: str | None = None
    max_minutes: float | None = None


def load_profile(name_or_path: str) -> Profile:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Profile, "profile")
    path = resolve_config("profile", name_or_path)
    if not Path(path).is_file():
        raise ValueError(f"unknown profile {name_or_path!r}: expected one of {', '.join(config_names('profile'))}")
    config = parser.parse_object({"profile": yaml.safe_load(Path(path).read_text())})
    return parser.instantiate(config).profile


def model_config_for(model: str, profile: Profile) -> str:
    if profile.model_variant and (CONFIG_DIR / "model" / f"{model}_{profile.model_variant}.yaml").exists():
        return f"{model}_{profile.model_variant}"
    return model


def default_models() -> list[str]:
    """Every base model config (no ``_variant`` suffix)."""
    return [name for name in config_names("model") if "_" not in name]


# ---------------------------------------------------------------------- the CSV store
def _row_key(row: dict[str, object]) -> tuple[str, ...]:
    return tuple(str(row[column]) for column in KEY_COLUMNS)


def append_row(path: Path, row: dict[str, object], replace: bool = False) -> None:
    """Add ``row`` to the CSV under an exclusive lock, atomically; a duplicate key is an error
    unless ``replace``."""
    missing = set(ROW_COLUMNS) - set(row)
    if missing:
        raise ValueError(f"row lacks columns {sorted(missing)}")
    with locked(path):
        rows = read_rows(path)
        key = _row_key(row)
        if any(_row_key(existing) == key for existing in rows):
            if not replace:
                raise ValueError(f"{path}: a row for {dict(zip(KEY_COLUMNS, key, strict=True))} exists already")
            rows = [existing for existing in rows if _row_key(existing) != key]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=ROW_COLUMNS, extrasaction="raise")
        writer.writeheader()
        for existing in rows:
            writer.writerow({column: existing.get(column, "") for column in ROW_COLUMNS})
        writer.writerow({column: "" if row[column] is None else row[column] for column in ROW_COLUMNS})
        atomic_write_text(path, buffer.getvalue())


# ---------------------------------------------------------------------- one run
class _EpochLog(Callback):
    """Remembers the validation metric per epoch and the wall time of training."""

    def __init__(self) -> None:
        self.val_history: list[tuple[int, float]] = []
        self.epoch_seconds: list[float] = []

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # on_validation_end runs after the module logged its epoch metrics (epoch-end hooks do not).
        if trainer.sanity_checking or SELECTION_METRIC not in trainer.callback_metrics:
            return
        self.val_history.append((trainer.current_epoch, float(trainer.callback_metrics[SELECTION_METRIC])))

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        seconds = trainer.callback_metrics.get("train/epoch_seconds")
        if seconds is not None:
            self.epoch_seconds.append(float(seconds))


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    model_config: str
    seed: int
    profile: Profile

    @property
    def run_id(self) -> str:
        # The device is part of a run's key (see KEY_COLUMNS), so it is part of its directory names:
        # a CPU run must never overwrite a GPU run's per-case values or resume from its checkpoint.
        return f"{self.dataset}-{self.model_config}-{self.profile.name}-seed{self.seed}-{device_slug(device_name())}"


def git_commit() -> str:
    """HEAD (with ``-dirty`` for uncommitted changes to tracked files outside ``results/``);
    ``$RECBENCH_GIT_COMMIT`` where the checkout has no ``.git`` (a copied working tree on a remote
    machine)."""
    if os.environ.get("RECBENCH_GIT_COMMIT"):
        return os.environ["RECBENCH_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=root, check=True
        ).stdout.strip()
        # Result files are outputs, not code: rows appended by a run must not mark the next run dirty.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"],
            capture_output=True,
            text=True,
            cwd=root,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu} ({os.cpu_count()} cores)"


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _config_hash(parts: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_one(
    spec: RunSpec,
    results_dir: Path,
    work_dir: Path,
    trainer_overrides: dict[str, object],
    data_overrides: dict[str, object],
    force: bool = False,
) -> dict[str, object]:
    """Fit, test the best checkpoint, append the row; returns the row."""
    profile = spec.profile
    # Read before the fit: the commit the code was loaded from, not whatever the tree holds by the
    # time the row is written minutes later.
    commit = git_commit()
    pl.seed_everything(spec.seed, workers=True, verbose=False)
    data: SeqRecDataModule = instantiate_data(spec.dataset, val_subset=profile.val_subset, **data_overrides)
    model: SeqRecModel = instantiate_model(spec.model_config, data.num_items, data.max_len)
    run_dir = work_dir / spec.run_id
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", monitor=SELECTION_METRIC, mode="max", filename="best", save_last=True
    )
    epoch_log = _EpochLog()
    # The Timer's elapsed training time is saved in checkpoints, so a resumed run reports (and is
    # budgeted by) its whole training time, not only the part after the restart.
    timer = Timer(timedelta(minutes=profile.max_minutes) if profile.max_minutes is not None else None, verbose=False)
    max_epochs = profile.max_epochs
    if model.max_useful_epochs is not None:
        max_epochs = min(max_epochs, model.max_useful_epochs)
    options: dict[str, object] = {
        "max_epochs": max_epochs,
        "precision": profile.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true"),
        "callbacks": [
            checkpoint,
            EarlyStopping(SELECTION_METRIC, mode="max", patience=profile.patience),
            epoch_log,
            timer,
        ],
        # CSV unless the overrides name another logger (`recbench bench --trainer.logger ...`).
        "logger": LoggerSpec.csv(work_dir),
        "check_val_every_n_epoch": profile.check_val_every_n_epoch,
        "num_sanity_val_steps": 0,
        "enable_model_summary": False,
    }
    if profile.limit_train_batches is not None:
        options["limit_train_batches"] = profile.limit_train_batches
    options.update(trainer_overrides)
    if isinstance(options["logger"], LoggerSpec):
        # Built here, once per run, so that two runs of one bench never share a log directory.
        options["logger"] = options["logger"].build(spec.run_id)
    trainer = pl.Trainer(**options)  # type: ignore[arg-type]
    last = run_dir / "checkpoints" / "last.ckpt"
    resumed = last.exists() and not force
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, datamodule=data, ckpt_path=str(last) if resumed else None)
    train_seconds = timer.time_elapsed("train")
    # No best checkpoint exists when training never stepped an optimiser (counting baselines): the
    # in-memory model is then the trained model.
    best_path = checkpoint.best_model_path or None
    (test_metrics,) = trainer.test(model, datamodule=data, ckpt_path=best_path, verbose=False)
    if not trainer.is_global_zero:
        return {}

    best_epoch = max(epoch_log.val_history, key=lambda item: item[1])[0] if epoch_log.val_history else None
    resolved = {
        "model": {"class_path": f"{type(model).__module__}.{type(model).__qualname__}", "init_args": dict(model.hparams)},
        "data": {"class_path": f"{type(data).__module__}.{type(data).__qualname__}", **data.describe()},
        "profile": asdict(profile),
        "trainer": {k: v for k, v in options.items() if k not in ("callbacks", "logger")},
        "seed": spec.seed,
    }
    notes = {
        **model.run_notes(),
        "resumed": resumed,
        "stopped_by": _stop_reason(timer, trainer, max_epochs),
        "global_steps": trainer.global_step,
        "torch_threads": torch.get_num_threads(),
        "best_checkpoint": best_path,
        "trainer_overrides": {k: str(v) for k, v in trainer_overrides.items()},
        "data_overrides": {k: str(v) for k, v in data_overrides.items()},
    }
    row: dict[str, object] = {
        "dataset": data.name,
        "protocol": data.split,
        "model": type(model).__name__,
        "config": spec.model_config,
        "seed": spec.seed,
        "profile": profile.name,
        **{name: round(float(test_metrics[f"test/{name}"]), 6) for name in METRIC_COLUMNS},
        "invalid_id_rate": (
            round(float(test_metrics["test/invalid_id_rate"]), 6) if "test/invalid_id_rate" in test_metrics else None
        ),
        "collision_rate": model.item_id_stats().get("collision_rate"),
        "parameters": model.num_parameters(),
        "epochs": trainer.current_epoch,
        "best_epoch": best_epoch,
        "train_seconds": round(train_seconds, 2),
        "seconds_per_epoch": (
            round(sum(epoch_log.epoch_seconds) / len(epoch_log.epoch_seconds), 3) if epoch_log.epoch_seconds else None
        ),
        "test_users_per_second": round(float(test_metrics["test/users_per_second"]), 1),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "device": device_name(),
        "precision": str(trainer.precision),
        "world_size": trainer.world_size,
        "val_subset": profile.val_subset,
        "exclude_history": model.exclude_history,
        "git_commit": commit,
        "config_hash": _config_hash(resolved),
        "data_fingerprint": data.fingerprint,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run_id": spec.run_id,
        "notes": json.dumps(notes, sort_keys=True),
        "schema_version": ROW_SCHEMA_VERSION,
    }
    out = results_dir / "runs" / spec.run_id
    atomic_write_text(out / "config.json", json.dumps(resolved, indent=2, default=str))
    atomic_write_text(out / "metrics.json", json.dumps(row, indent=2, default=str))
    cases = polars.DataFrame(
        {
            "case": model.test_cases.numpy(),
            "user": model.test_case_users.numpy(),
            **{name: model.test_case_values[:, i].numpy() for i, name in enumerate(metric_names(model.ks))},
        }
    )
    with tempfile.NamedTemporaryFile(dir=out, suffix=".parquet.tmp", delete=False) as handle:
        cases.write_parquet(handle.name)
    os.replace(handle.name, out / "cases.parquet")
    append_row(results_dir / f"{data.name}.csv", row, replace=force)
    return row


def _stop_reason(timer: Timer, trainer: pl.Trainer, max_epochs: int) -> str:
    remaining = timer.time_remaining()
    if remaining is not None and remaining <= 0:
        return "time budget"
    if trainer.current_epoch >= max_epochs:
        return "max epochs"
    return "early stopping" if trainer.should_stop else "finished"


def summary_line(row: dict[str, object]) -> str:
    return (
        f"{row['dataset']} {row['config']} seed={row['seed']} [{row['profile']}]: "
        f"R@10={float(row['recall@10']):.4f} N@10={float(row['ndcg@10']):.4f} "
        f"R@20={float(row['recall@20']):.4f} N@20={float(row['ndcg@20']):.4f} "
        f"epochs={row['epochs']} (best {row['best_epoch']}) train={float(row['train_seconds']):.0f}s "
        f"test={float(row['test_users_per_second']):.0f} users/s"
    )


def model_class_name(model_config: str) -> str:
    """The class a model config names, without building the model."""
    return str(yaml.safe_load(Path(resolve_config("model", model_config)).read_text())["class_path"]).rsplit(".", 1)[-1]


def existing_keys(results_dir: Path, dataset_name: str) -> set[tuple[str, ...]]:
    return {_row_key(row) for row in read_rows(results_dir / f"{dataset_name}.csv")}


def bench(
    dataset: str = "synthetic",
    models: Sequence[str] | None = None,
    seeds: Sequence[int] = (1,),
    profile: str = "quick",
    force: bool = False,
    results_dir: Path = Path("results"),
    work_dir: Path = Path("runs/bench"),
    trainer_overrides: dict[str, object] | None = None,
    data_overrides: dict[str, object] | None = None,
) -> list[dict[str, object]]:
    """Fit and test every (model config, seed) on ``dataset`` under ``profile``; one row each.

    Args:
        dataset: data short name or YAML.
        models: model configs (default: every base model).
        seeds: seeds to run.
        profile: smoke, quick, paper or a profile YAML.
        force: rerun and replace rows that exist.
        results_dir: where rows and run directories are written.
        work_dir: checkpoints and logs.
        trainer_overrides: Trainer keyword arguments that replace the profile's.
        data_overrides: datamodule ``init_args`` that replace the data config's.
    """
    trainer_overrides = dict(trainer_overrides or {})
    data_overrides = dict(data_overrides or {})
    loaded_profile = load_profile(profile)
    model_names = list(models) if models else default_models()
    data = instantiate_data(dataset, **data_overrides)
    # Decided once, before any run: under DDP every process re-executes this and must agree.
    done = existing_keys(results_dir, data.name)
    specs = [RunSpec(dataset, model_config_for(m, loaded_profile), s, loaded_profile) for m in model_names for s in seeds]
    started = time.perf_counter()
    rows = []
    for index, spec in enumerate(specs, 1):
        key = _row_key(
            {
                "dataset": data.name,
                "protocol": data.split,
                "model": model_class_name(spec.model_config),
                "config": spec.model_config,
                "seed": spec.seed,
                "profile": loaded_profile.name,
                "device": device_name(),
            }
        )
        if key in done and not force:
            print(f"[{index}/{len(specs)}] skip {spec.run_id}: already in {results_dir / (data.name + '.csv')}")
            continue
        print(f"[{index}/{len(specs)}] {spec.run_id}")
        row = run_one(spec, results_dir, work_dir, trainer_overrides, data_overrides, force)
        if row:
            rows.append(row)
            print(summary_line(row), flush=True)
    print(f"bench finished: {len(rows)} runs in {time.perf_counter() - started:.0f} s")
    return rows
