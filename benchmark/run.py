"""The benchmark runner: ``recbench bench --dataset D [--models a,b] [--seeds 1,2,3] [--profile P]``.

For every (model config, seed) it fits with early stopping on ``val/ndcg@10``, tests the best
checkpoint once, and appends one row to ``<results_dir>/<dataset>.csv`` (schema :data:`ROW_COLUMNS`,
version :data:`ROW_SCHEMA_VERSION`) plus ``<results_dir>/runs/<run_id>/`` with the resolved config
(``config.json``), the metrics (``metrics.json``) and per-case metric values (``cases.parquet``) for
paired significance tests.

What a row is: a property of (dataset, protocol, config, seed, profile) -- :data:`KEY_COLUMNS`.
Profiles end a fit by early stopping (patience on validation NDCG@10, never before the profile's
``min_epochs``) under an epoch or step cap, never by the clock, so the same key gives the same row
on any hardware up to floating-point noise.
Device, precision, threads and seconds are columns, not identity. A profile may carry a wall-clock
safety net (``time_limit_minutes``); a fit it ends is stored with ``stopped_by = "time limit"`` and
``converged = false`` and never enters a leaderboard mean. ``converged`` is true when patience ran
out (``early stopping``) or the model cannot change any more (``complete``: counting baselines after
their one epoch, or a fit whose learning rate has decayed to 0 at its config's ``decay_epochs``, which
trains to that epoch without early stopping); a fit ended by the epoch or step cap was still
improving and is not converged.

Where rows go: a user's bench writes to a local, git-ignored directory
(``$RECBENCH_RESULTS_DIR``, default :data:`LOCAL_RESULTS_DIR`) and ends by printing its rows beside
the stored reference rows in ``results/`` with paired tests; writing into ``results/`` is an explicit
choice (``--results_dir results`` or ``make bench RESULTS_DIR=results``).

Robustness:

- appends hold an exclusive ``fcntl`` lock on ``<csv>.lock`` and rewrite the CSV through a temporary
  file and ``os.replace``: two runners at once lose nothing and a crash never leaves a partial row;
- checkpoints live in ``<work_dir>/<run_id>/checkpoints``: ``best.ckpt`` (the selection metric's
  best epoch, which the test reads) and ``last.ckpt`` (rewritten at the end of every training
  epoch, after its validation, with the early-stopping, timer and epoch-log states); both are written to a temporary file and renamed
  into place, so a kill never leaves a torn checkpoint. Rerunning the same command after a crash
  resumes from ``last.ckpt``, i.e. from the last finished epoch; a ``last.ckpt`` that does not load
  is an error naming it (``--force`` starts over);
- a run whose key is already in the results CSV is skipped unless ``force`` (which replaces the row),
  or unless every stored row of the key was ended by the safety net: the safety net is not part of a
  run's identity (nor of its ``run_id``), so rerunning under a larger one resumes the cut fit from
  ``last.ckpt`` and its row replaces the time-limited one (whose run folder stays, as the evidence of
  the cut, the way ``make gpu-import`` keeps it).

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
import pickle
import platform
import re
import resource
import shutil
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
from lightning.pytorch.plugins.io import TorchCheckpointIO

from benchmark.loggers import LoggerSpec
from benchmark.registry import (
    CONFIG_DIR,
    config_names,
    instantiate_data,
    instantiate_model,
    require_config,
    resolve_config,
)

# The torch-free part of the store, shared with the leaderboard; re-exported for the callers that
# import it from here (benchmark.migrate, benchmark.perf, the tests).
from benchmark.store import EXCLUDED_METRIC_COLUMNS as EXCLUDED_METRIC_COLUMNS
from benchmark.store import LOCAL_RESULTS_DIR as LOCAL_RESULTS_DIR
from benchmark.store import METRIC_COLUMNS as METRIC_COLUMNS
from benchmark.store import REFERENCE_RESULTS_DIR as REFERENCE_RESULTS_DIR
from benchmark.store import atomic_write_text as atomic_write_text
from benchmark.store import locked as locked
from benchmark.store import read_rows as read_rows
from benchmark.store import resolve_results_dir as resolve_results_dir
from recbench.data import SeqRecDataModule
from recbench.metric_names import ID_LEVEL_PREFIX
from recbench.model import SELECTION_METRIC, SeqRecModel

ROW_SCHEMA_VERSION = 2
#: A run's identity: what the row is a property of. The device is a column, never part of the key.
KEY_COLUMNS = ("dataset", "protocol", "config", "seed", "profile")
#: Why a fit ended; the first two are convergence, the rest are not.
CONVERGED_STOPS = ("early stopping", "complete")
STOP_REASONS = (*CONVERGED_STOPS, "epoch cap", "step cap", "time limit")
ROW_COLUMNS: tuple[str, ...] = (
    "dataset",
    "protocol",
    "model",
    "config",
    "seed",
    "profile",
    *METRIC_COLUMNS,
    *EXCLUDED_METRIC_COLUMNS,
    "excluded_short_rate",
    "invalid_id_rate",
    "collision_rate",
    "parameters",
    "epochs",
    "best_epoch",
    "global_steps",
    "stopped_by",
    "converged",
    "train_seconds",
    "seconds_per_epoch",
    "test_users_per_second",
    "peak_memory_mb",
    "device",
    "precision",
    "threads",
    "world_size",
    "val_subset",
    "git_commit",
    "config_hash",
    "data_fingerprint",
    "date",
    "run_id",
    "notes",
    "schema_version",
)


class EarlyStoppingAfter(EarlyStopping):
    """Lightning's ``EarlyStopping`` that never stops before ``min_epochs`` completed epochs.

    Not the Trainer's ``min_epochs``: there a stop signalled earlier stays set and ends the fit at
    ``min_epochs`` even if validation has improved since. Here a patience stop signalled before
    ``min_epochs`` is withdrawn (the wait count keeps running, so the fit stops at the first
    validation at or after ``min_epochs`` whose last ``patience`` did not improve); stops for a
    non-finite metric, and other callbacks' stops (the time limit), are left alone."""

    def __init__(self, min_epochs: int, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if min_epochs < 0:
            raise ValueError(f"min_epochs must be >= 0, got {min_epochs}")
        self.min_epochs = min_epochs

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        stopping_before = trainer.should_stop
        super()._run_early_stopping_check(trainer)
        current = trainer.callback_metrics.get(self.monitor)
        finite = current is not None and bool(torch.isfinite(current))
        early = trainer.current_epoch + 1 < self.min_epochs
        if early and finite and self.wait_count >= self.patience and trainer.should_stop and not stopping_before:
            trainer.should_stop = False
            self.stopped_epoch = 0


@dataclass(frozen=True)
class Profile:
    """A benchmark profile (``benchmark/configs/profile/<name>.yaml``); unknown keys are errors.

    Args:
        name: profile name recorded in every row.
        max_epochs: epoch budget.
        patience: early-stopping patience in validation epochs.
        min_epochs: no early stop before this many epochs (patience still counts from the start:
            the fit stops at the first validation at or after ``min_epochs`` that ends ``patience``
            non-improving ones). A model that learns only after a plateau at chance level
            (DreamRec: Beauty and Toys validation NDCG@10 below 0.001 for its first 4-5 epochs) is
            otherwise stopped there and stored as converged.
        val_subset: validate on this many seeded validation cases (None = all).
        limit_train_batches: cap on training batches per epoch (smoke runs).
        check_val_every_n_epoch: validation cadence.
        model_variant: use ``<model>_<variant>.yaml`` where that file exists.
        precision: Lightning precision; None = bf16-mixed on GPU, 32-true on CPU.
        max_steps: optimiser-step cap (None = only the epoch cap).
        time_limit_minutes: a wall-clock safety net for one fit, never a stopping rule: a fit it ends
            is stored as ``stopped_by = "time limit"``, ``converged = false``, and is kept out of
            every leaderboard mean.
        batch_size: training batch size of every fit of the profile (replaces the data config's;
            a bigger one fills a GPU); None = the data config's.
        compile: fit ``torch.compile(model, dynamic=True)`` (shapes vary with the length buckets);
            recorded in the row's notes. Off by default: it pays a compile per new shape, which a
            CPU fit of minutes does not win back.
        models: the model configs ``bench`` fits when none are named, one per model family (each
            mapped through ``model_variant``); None = every base config (no ``_`` in its name).
    """

    name: str
    max_epochs: int
    patience: int
    min_epochs: int = 0
    val_subset: int | None = None
    limit_train_batches: int | None = None
    check_val_every_n_epoch: int = 1
    model_variant: str = ""
    precision: str | None = None
    max_steps: int | None = None
    time_limit_minutes: float | None = None
    batch_size: int | None = None
    compile: bool = False
    models: list[str] | None = None


def load_profile(name_or_path: str) -> Profile:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Profile, "profile")
    path = require_config("profile", name_or_path)
    config = parser.parse_object({"profile": yaml.safe_load(Path(path).read_text())})
    return parser.instantiate(config).profile


def model_config_for(model: str, profile: Profile) -> str:
    if profile.model_variant and (CONFIG_DIR / "model" / f"{model}_{profile.model_variant}.yaml").exists():
        return f"{model}_{profile.model_variant}"
    return model


def default_models(profile: Profile | None = None) -> list[str]:
    """The profile's ``models``, else every base model config (no ``_variant`` suffix)."""
    if profile is not None and profile.models is not None:
        return list(profile.models)
    return [name for name in config_names("model") if "_" not in name]


# ---------------------------------------------------------------------- the CSV store
def _row_key(row: dict[str, object]) -> tuple[str, ...]:
    return tuple(str(row[column]) for column in KEY_COLUMNS)


def append_row(path: Path, row: dict[str, object], replace: bool = False) -> list[dict[str, str]]:
    """Add ``row`` to the CSV under an exclusive lock, atomically; a duplicate key is an error
    unless ``replace``. Returns the rows it replaced."""
    missing = set(ROW_COLUMNS) - set(row)
    if missing:
        raise ValueError(f"row lacks columns {sorted(missing)}")
    with locked(path):
        rows = read_rows(path)
        key = _row_key(row)
        replaced = [existing for existing in rows if _row_key(existing) == key]
        if replaced:
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
    return replaced


# ---------------------------------------------------------------------- one run
class _EpochLog(Callback):
    """Remembers the validation metric per epoch and the wall time of training; its state travels in
    checkpoints, so a resumed fit reports its whole history (best epoch, seconds per epoch)."""

    def __init__(self) -> None:
        self.val_history: list[tuple[int, float]] = []
        self.epoch_seconds: list[float] = []
        self._epoch_started = 0.0

    def state_dict(self) -> dict[str, object]:
        return {"val_history": list(self.val_history), "epoch_seconds": list(self.epoch_seconds)}

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        self.val_history = [(int(epoch), float(value)) for epoch, value in state_dict["val_history"]]  # type: ignore[union-attr]
        self.epoch_seconds = [float(seconds) for seconds in state_dict["epoch_seconds"]]  # type: ignore[union-attr]

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # on_validation_end runs after the module logged its epoch metrics (epoch-end hooks do not).
        if trainer.sanity_checking or SELECTION_METRIC not in trainer.callback_metrics:
            return
        self.val_history.append((trainer.current_epoch, float(trainer.callback_metrics[SELECTION_METRIC])))

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._epoch_started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # Timed here, as the module times ``train/epoch_seconds`` (training + validation): callbacks'
        # epoch-end hooks run before the module's, so its value of this epoch is not logged yet.
        self.epoch_seconds.append(time.perf_counter() - self._epoch_started)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to ``<name>.partial`` and renames it into place: a fit killed while
    saving keeps its previous ``last.ckpt``, which the rerun resumes from."""

    def save_checkpoint(self, checkpoint: dict[str, object], path: str | Path, storage_options: object = None) -> None:
        target = Path(path)
        partial = target.with_name(target.name + ".partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        os.replace(partial, target)


def resume_checkpoint(path: Path) -> Path:
    """``path`` if it loads (a fit resumes from it), else an error that names it and the way out."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:  # torn, truncated, foreign
        raise RuntimeError(
            f"{path}: cannot resume from this checkpoint ({type(error).__name__}: {error}); delete it, or rerun "
            "with --force to start the fit over"
        ) from error
    if not isinstance(state, dict) or "epoch" not in state or "state_dict" not in state:
        raise RuntimeError(f"{path}: not a Lightning fit checkpoint (no epoch or state_dict); delete it or rerun with --force")
    return path


def config_name(name_or_path: str) -> str:
    """The name a config is known by in rows and run ids: ``sasrec`` for ``sasrec`` and for
    ``/any/where/sasrec.yaml`` alike (a filesystem path never reaches a row or a run id)."""
    return Path(name_or_path).stem


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    model_config: str
    seed: int
    profile: Profile
    data_overrides: tuple[tuple[str, str], ...] = ()

    @property
    def config(self) -> str:
        return config_name(self.model_config)

    @property
    def run_id(self) -> str:
        """``<dataset>-<config>-<profile>-seed<seed>-<hash>``: names plus a short hash of what the
        names stand for (the data and model YAML texts, the profile, the data overrides), so two
        different YAMLs with one name never share a run directory or resume each other's checkpoint.
        The profile's wall-clock safety net is left out: it decides whether a fit may finish, not
        what it computes, so a fit it cut resumes under a larger one; so is its default model list."""
        profile = {
            name: value for name, value in asdict(self.profile).items() if name not in ("time_limit_minutes", "models")
        }
        contents = {
            "data": Path(resolve_config("data", self.dataset)).read_text(),
            "model": Path(resolve_config("model", self.model_config)).read_text(),
            "profile": profile,
            "data_overrides": self.data_overrides,
        }
        digest = _config_hash(contents)[:8]
        return f"{config_name(self.dataset)}-{self.config}-{self.profile.name}-seed{self.seed}-{digest}"


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


class PeakMemory:
    """Peak memory of one run, not of the process: a bench runs many fits in one process, and the
    process-lifetime peak (``ru_maxrss``) would charge every later run with the largest earlier one.

    GPU: the CUDA allocator's peak since :meth:`start`. CPU (Linux): the resident-set high-water mark
    ``VmHWM``, reset at :meth:`start` through ``/proc/self/clear_refs``; it includes what the process
    already held (interpreter, libraries, cached data). Where that reset is not possible the scope is
    the process lifetime, and :attr:`scope` says so (recorded in the row's notes).
    """

    def __init__(self) -> None:
        self.scope = "run"

    def start(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5 = reset the peak RSS (Linux >= 4.0)
        except OSError:
            self.scope = "process"

    def peak_mb(self) -> float:
        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
        with contextlib.suppress(OSError):
            match = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
            if match:
                return int(match.group(1)) / 1024
        self.scope = "process"
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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
    profile_data = {} if profile.batch_size is None else {"batch_size": profile.batch_size}
    data: SeqRecDataModule = instantiate_data(
        spec.dataset, val_subset=profile.val_subset, **{**profile_data, **data_overrides}
    )
    model: SeqRecModel = instantiate_model(spec.model_config, data.num_items, data.max_len)
    run_id = spec.run_id
    run_dir = work_dir / run_id
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", monitor=SELECTION_METRIC, mode="max", filename="best")
    # Not ``save_last=True``: Lightning (2.6) then rewrites last.ckpt only in epochs that improved the
    # monitored metric, and a resume would replay every epoch since the best one. Saved at the end of
    # the training epoch (after validation), once the epoch log holds the epoch's seconds too.
    latest = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="last", enable_version_counter=False, save_on_train_epoch_end=True
    )
    max_epochs = profile.max_epochs
    if model.max_useful_epochs is not None:
        max_epochs = min(max_epochs, model.max_useful_epochs)
    # A model that cannot change after max_useful_epochs (a count, or a rate annealed to 0) trains to
    # that epoch: an early stop inside its schedule would be decided by validation noise.
    never_before = max_epochs if model.max_useful_epochs is not None else min(profile.min_epochs, max_epochs)
    early_stopping = EarlyStoppingAfter(never_before, SELECTION_METRIC, mode="max", patience=profile.patience)
    epoch_log = _EpochLog()
    # The Timer's elapsed training time is saved in checkpoints, so a resumed run reports (and is
    # limited by) its whole training time, not only the part after the restart.
    limit = timedelta(minutes=profile.time_limit_minutes) if profile.time_limit_minutes is not None else None
    timer = Timer(limit, verbose=False)
    options: dict[str, object] = {
        "max_epochs": max_epochs,
        "max_steps": profile.max_steps if profile.max_steps is not None else -1,
        "precision": profile.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true"),
        "callbacks": [checkpoint, latest, early_stopping, epoch_log, timer],
        "plugins": [AtomicCheckpointIO()],
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
        # Built here, once per run, so that two runs of one bench never share a log directory; logs
        # left at the default directory follow the work directory, beside the run's checkpoints.
        options["logger"] = options["logger"].under(work_dir).build(spec.run_id)
    trainer = pl.Trainer(**options)  # type: ignore[arg-type]
    last = run_dir / "checkpoints" / "last.ckpt"
    resumed = last.exists() and not force
    if force:  # starts over: no checkpoint of an earlier fit of this run is kept beside the new ones
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    memory = PeakMemory()
    memory.start()
    started = time.perf_counter()
    # Lightning unwraps a compiled module and compiles it again after moving it to the device.
    fitted = torch.compile(model, dynamic=True) if profile.compile else model
    trainer.fit(fitted, datamodule=data, ckpt_path=str(resume_checkpoint(last)) if resumed else None)  # type: ignore[arg-type]
    fit_wall_seconds = time.perf_counter() - started
    train_seconds = timer.time_elapsed("train")
    stopped_by = stop_reason(timer, early_stopping, trainer, model, max_epochs, profile.max_steps)
    # Read before the test: testing a checkpoint restores the callbacks' states saved in it, and the
    # best checkpoint's epoch log ends at the best epoch.
    val_history, epoch_seconds = list(epoch_log.val_history), list(epoch_log.epoch_seconds)
    # No best checkpoint exists when training never stepped an optimiser (counting baselines): the
    # in-memory model is then the trained model.
    best_path = checkpoint.best_model_path or None
    started = time.perf_counter()
    (test_metrics,) = trainer.test(model, datamodule=data, ckpt_path=best_path, verbose=False)
    test_wall_seconds = time.perf_counter() - started
    if not trainer.is_global_zero:
        return {}

    best_epoch = max(val_history, key=lambda item: item[1])[0] if val_history else None
    resolved = {
        "model": {"class_path": f"{type(model).__module__}.{type(model).__qualname__}", "init_args": dict(model.hparams)},
        "data": {"class_path": f"{type(data).__module__}.{type(data).__qualname__}", **data.describe()},
        # The profile's default model list says which fits bench starts, nothing about this one.
        "profile": {name: value for name, value in asdict(profile).items() if name != "models"},
        "trainer": {k: v for k, v in options.items() if k not in ("callbacks", "logger", "plugins")},
        "seed": spec.seed,
    }
    excluded_short_rate = float(test_metrics["test/excluded_short_rate"])
    notes = {
        **model.run_notes(),
        "resumed": resumed,
        "compiled": profile.compile,
        "best_checkpoint": best_path,
        "fit_wall_seconds": round(fit_wall_seconds, 2),
        "test_wall_seconds": round(test_wall_seconds, 2),
        "peak_memory_scope": memory.scope,
        "excluded_metrics": "exact" if excluded_short_rate == 0 else (
            f"approximate: {excluded_short_rate:.1%} of test cases got fewer than {max(model.ks)} items after "
            "excluding history items (the model returned too few candidates)"
        ),
        # Models whose items share IDs: the same lists scored at ID level (SeqRecModel.shared_id_keys).
        "id_level_metrics": {
            name[len("test/") :]: round(float(value), 6)
            for name, value in test_metrics.items()
            if name.startswith(f"test/{ID_LEVEL_PREFIX}")
        }
        or None,
        "trainer_overrides": {k: str(v) for k, v in trainer_overrides.items()},
        "data_overrides": {k: str(v) for k, v in data_overrides.items()},
    }
    row: dict[str, object] = {
        "dataset": data.name,
        "protocol": data.split,
        "model": type(model).__name__,
        "config": spec.config,
        "seed": spec.seed,
        "profile": profile.name,
        **{name: round(float(test_metrics[f"test/{name}"]), 6) for name in (*METRIC_COLUMNS, *EXCLUDED_METRIC_COLUMNS)},
        "excluded_short_rate": round(excluded_short_rate, 6),
        "invalid_id_rate": (
            round(float(test_metrics["test/invalid_id_rate"]), 6) if "test/invalid_id_rate" in test_metrics else None
        ),
        "collision_rate": model.item_id_stats().get("collision_rate"),
        "parameters": model.num_parameters(),
        "epochs": trainer.current_epoch,
        "best_epoch": best_epoch,
        "global_steps": trainer.global_step,
        "stopped_by": stopped_by,
        "converged": stopped_by in CONVERGED_STOPS,
        "train_seconds": round(train_seconds, 2),
        "seconds_per_epoch": (
            round(sum(epoch_seconds) / len(epoch_seconds), 3) if epoch_seconds else None
        ),
        "test_users_per_second": round(float(test_metrics["test/users_per_second"]), 1),
        "peak_memory_mb": round(memory.peak_mb(), 1),
        "device": device_name(),
        "precision": str(trainer.precision),
        "threads": torch.get_num_threads(),
        "world_size": trainer.world_size,
        "val_subset": profile.val_subset,
        "git_commit": commit,
        "config_hash": _config_hash(resolved),
        "data_fingerprint": data.fingerprint,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run_id": run_id,
        "notes": json.dumps(notes, sort_keys=True),
        "schema_version": ROW_SCHEMA_VERSION,
    }
    out = results_dir / "runs" / run_id
    atomic_write_text(out / "config.json", json.dumps(resolved, indent=2, default=str))
    atomic_write_text(out / "metrics.json", json.dumps(row, indent=2, default=str))
    cases = polars.DataFrame(
        {
            "case": model.test_cases.numpy(),
            "user": model.test_case_users.numpy(),
            **{name: model.test_case_values[:, i].numpy() for i, name in enumerate(model.case_value_names)},
        }
    )
    with tempfile.NamedTemporaryFile(dir=out, suffix=".parquet.tmp", delete=False) as handle:
        cases.write_parquet(handle.name)
    os.replace(handle.name, out / "cases.parquet")
    table = results_dir / f"{data.name}.csv"
    cut_by_the_clock = rows_by_key(table).get(_row_key(row), [])
    replace = force or (bool(cut_by_the_clock) and not settled(cut_by_the_clock))
    for old in append_row(table, row, replace=replace):
        # A replaced row's per-case values and config describe a run that no longer has a row; the
        # folder of a row the safety net ended stays, as the record of that cut.
        if old["run_id"] != run_id and old["stopped_by"] != "time limit":
            shutil.rmtree(results_dir / "runs" / old["run_id"], ignore_errors=True)
    return row


def stop_reason(
    timer: Timer,
    early_stopping: EarlyStoppingAfter,
    trainer: pl.Trainer,
    model: SeqRecModel,
    max_epochs: int,
    max_steps: int | None,
) -> str:
    """Why a fit ended: one of :data:`STOP_REASONS`.

    A model that trained every batch of every epoch it can use is complete even when the clock ran
    out in its last batch (a popularity count on a loaded machine can outlast a tiny limit); a clock
    that stopped it mid-epoch left it incomplete, which is a time limit."""
    if model.max_useful_epochs is not None and trainer.current_epoch >= model.max_useful_epochs:
        batches_in_last_epoch = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if batches_in_last_epoch >= trainer.num_training_batches:
            return "complete"
    remaining = timer.time_remaining()
    if remaining is not None and remaining <= 0:
        return "time limit"
    if early_stopping.stopped_epoch > 0 or (trainer.should_stop and early_stopping.wait_count >= early_stopping.patience):
        return "early stopping"
    if max_steps is not None and trainer.global_step >= max_steps:
        return "step cap"
    return "epoch cap"


def summary_line(row: dict[str, object]) -> str:
    return (
        f"{row['dataset']} {row['config']} seed={row['seed']} [{row['profile']}]: "
        f"R@10={float(row['recall@10']):.4f} N@10={float(row['ndcg@10']):.4f} "
        f"R@20={float(row['recall@20']):.4f} N@20={float(row['ndcg@20']):.4f} "
        f"N@10(excl)={float(row['ndcg@10_excl']):.4f} "
        f"epochs={row['epochs']} (best {row['best_epoch']}, {row['stopped_by']}, "
        f"{'converged' if row['converged'] else 'NOT converged'}) train={float(row['train_seconds']):.0f}s "
        f"test={float(row['test_users_per_second']):.0f} users/s"
    )


def existing_keys(results_dir: Path, dataset_name: str) -> set[tuple[str, ...]]:
    return {_row_key(row) for row in read_rows(results_dir / f"{dataset_name}.csv")}


def rows_by_key(path: Path) -> dict[tuple[str, ...], list[dict[str, str]]]:
    """The stored rows of a results CSV, grouped by key."""
    grouped: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for row in read_rows(path):
        grouped.setdefault(_row_key(row), []).append(row)
    return grouped


def settled(rows: Sequence[dict[str, str]]) -> bool:
    """Whether a new fit would not change these stored rows of one key: one of them stopped otherwise
    than by the wall-clock safety net (``time limit``), which on a lent GPU is the call's clock."""
    return any(row["stopped_by"] != "time limit" for row in rows)


def longest_training(rows: Sequence[dict[str, str]]) -> float:
    """The longest training time (seconds) among stored rows of one key, e.g. where the time limit cut them."""
    return max((float(row["train_seconds"] or 0) for row in rows), default=0.0)


def bench(
    dataset: str = "synthetic",
    models: Sequence[str] | None = None,
    seeds: Sequence[int] = (1,),
    profile: str = "quick",
    force: bool = False,
    results_dir: Path | None = None,
    reference_dir: Path = REFERENCE_RESULTS_DIR,
    work_dir: Path = Path("runs/bench"),
    threads: int | None = None,
    trainer_overrides: dict[str, object] | None = None,
    data_overrides: dict[str, object] | None = None,
) -> list[dict[str, object]]:
    """Fit and test every (model config, seed) on ``dataset`` under ``profile``; one row each, then
    the rows beside the stored reference rows of the same dataset, protocol and profile.

    Args:
        dataset: data short name or YAML.
        models: model configs (default: the profile's ``models``, else every base model).
        seeds: seeds to run.
        profile: smoke, quick, paper or a profile YAML.
        force: rerun and replace rows that exist.
        results_dir: where rows and run directories are written (default: ``$RECBENCH_RESULTS_DIR``,
            else the git-ignored ``runs/results``; pass ``results`` to store into the reference).
        reference_dir: the stored leaderboard the rows are compared with at the end.
        work_dir: checkpoints and logs.
        threads: torch CPU threads (default: every core this process may use; recorded per row).
        trainer_overrides: Trainer keyword arguments that replace the profile's.
        data_overrides: datamodule ``init_args`` that replace the data config's.
    """
    from benchmark.leaderboard import print_reference_comparison

    results_dir = resolve_results_dir(results_dir)
    trainer_overrides = dict(trainer_overrides or {})
    data_overrides = dict(data_overrides or {})
    torch.set_num_threads(threads or available_cores())
    loaded_profile = load_profile(profile)
    model_names = list(models) if models else default_models(loaded_profile)
    for name in model_names:  # every name checked before the first fit, not after an hour of them
        require_config("model", name)
    data = instantiate_data(dataset, **data_overrides)
    overrides_key = tuple(sorted((key, json.dumps(value, default=str)) for key, value in data_overrides.items()))
    # Decided once, before any run: under DDP every process re-executes this and must agree.
    stored = rows_by_key(results_dir / f"{data.name}.csv")
    specs = [
        RunSpec(dataset, model_config_for(m, loaded_profile), s, loaded_profile, overrides_key)
        for m in model_names
        for s in seeds
    ]
    print(f"bench: {len(specs)} run(s) of {data.name} [{loaded_profile.name}] into {results_dir} "
          f"({torch.get_num_threads()} torch threads on {device_name()})", flush=True)
    started = time.perf_counter()
    rows = []
    for index, spec in enumerate(specs, 1):
        key = _row_key(
            {"dataset": data.name, "protocol": data.split, "config": spec.config, "seed": spec.seed,
             "profile": loaded_profile.name}
        )
        if settled(stored.get(key, [])) and not force:
            print(f"[{index}/{len(specs)}] skip {spec.config} seed {spec.seed}: already in "
                  f"{results_dir / (data.name + '.csv')}")
            continue
        cut = "" if force or key not in stored else (
            f" (its stored row was ended by the time limit after {longest_training(stored[key]):.0f} s "
            "of training: fitting on, from last.ckpt where it is kept, to replace that row)")
        print(f"[{index}/{len(specs)}] {spec.run_id}{cut}", flush=True)
        run_started = time.perf_counter()
        row = run_one(spec, results_dir, work_dir, trainer_overrides, data_overrides, force)
        if row:
            rows.append(row)
            print(f"{summary_line(row)} [{time.perf_counter() - run_started:.0f} s]", flush=True)
    print(f"bench finished: {len(rows)} runs in {time.perf_counter() - started:.0f} s")
    if rows and Path(reference_dir).resolve() != results_dir.resolve():
        print_reference_comparison(results_dir, Path(reference_dir), data.name, data.split, loaded_profile.name)
    return rows
