"""benchmark/perf/train_speed.py on the tiny synthetic set: the report's fields and its padding share.

Checks what the script computes, never how fast anything is (timings on a shared CPU mean nothing).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmark.perf import train_speed
from benchmark.registry import instantiate_data
from recbench.batch import SEQUENCE, padding_slots, trim_left_padding


def test_train_speed_reports_every_measure_and_the_padding_share_of_the_batches_it_fed(tmp_path: Path) -> None:
    payload = train_speed.main(
        ["--dataset", "synthetic_tiny", "--models", "sasrec", "--profile", "smoke", "--epochs", "2",
         "--device", "cpu", "--out", str(tmp_path), "--length-buckets", "32"]
    )  # fmt: skip
    written = json.loads((tmp_path / "train_speed_synthetic-x0.02_cpu.json").read_text())
    assert written["models"] == json.loads(json.dumps(payload["models"]))
    assert "| sasrec | sequence |" in (tmp_path / "train_speed_synthetic-x0.02_cpu.md").read_text()
    (row,) = payload["models"]
    assert row["epochs"] == 2 and not row["extrapolated"]
    assert row["batches_timed"] == 2 * row["batches_per_epoch"]
    assert row["seconds_per_epoch"] > 0 and row["steps_per_second"] > 0 and row["peak_memory_mb"] > 0
    assert row["test_users"] == 447 and row["test_users_per_second"] > 0
    curve = row["time_to_quality"]
    assert [point["epoch"] for point in curve] == [1, 2]
    assert 0 < curve[0]["train_seconds"] < curve[1]["train_seconds"]
    assert all(0 <= point["val_ndcg@10"] <= 1 for point in curve)
    # Independent count over the same two epochs of batches: the loader's seed is the one
    # seed_everything(1) set, its epochs 0 and 1 are what the fit loop ran.
    data = instantiate_data("synthetic_tiny", train_format="sequence", length_buckets=32)
    torch.manual_seed(1)
    loader = data.train_dataloader()
    padded = slots = 0
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            counted = padding_slots(trim_left_padding(batch[SEQUENCE][:, :-1]))
            padded, slots = padded + counted[0], slots + counted[1]
    assert row["padding_share"] == round(padded / slots, 4)


def test_extrapolation_from_a_prefix_of_batches_is_marked(tmp_path: Path) -> None:
    payload = train_speed.main(
        ["--dataset", "synthetic_tiny", "--models", "popularity", "--profile", "smoke", "--epochs", "1",
         "--max-train-batches", "2", "--device", "cpu", "--out", str(tmp_path)]
    )  # fmt: skip
    (row,) = payload["models"]
    assert row["batches_timed"] == 2 < row["batches_per_epoch"] and row["extrapolated"]
    assert row["training_view"] == "pairs" and 0 <= row["padding_share"] < 1
