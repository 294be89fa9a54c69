"""Evaluate one fixed, seeded SASRec on tiny synthetic data with N CPU processes (run as a script).

Usage: python tests/ddp_eval.py DEVICES OUT.json CACHE_DIR
Rank 0 writes the test metrics and the evaluated users to OUT.json.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines.sasrec import SASRec  # noqa: E402
from datamodules.synthetic import SyntheticDataModule  # noqa: E402


def main() -> None:
    devices, out, cache_dir = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    data = SyntheticDataModule(scale=0.02, eval_batch_size=64, cache_dir=cache_dir)  # 447 test users: odd
    torch.manual_seed(0)
    model = SASRec(num_items=data.num_items, max_len=data.max_len, hidden_size=32)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    if trainer.is_global_zero:
        metrics.pop("test/users_per_second")
        users = sorted(model.test_case_users.tolist())
        assert model.test_cases.tolist() == list(range(len(users))), "cases missing or repeated"
        out.write_text(json.dumps({"metrics": metrics, "users": users, "world_size": trainer.world_size}))


if __name__ == "__main__":
    main()
