from __future__ import annotations

import os
import warnings

import pytest

from datamodules.synthetic import SyntheticDataModule

warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never write into the user's cache unless RECBENCH_CACHE_DIR says so."""
    if "RECBENCH_CACHE_DIR" not in os.environ:
        os.environ["RECBENCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("recbench-cache"))


@pytest.fixture
def tiny_data() -> SyntheticDataModule:
    """447 users, 242 items: an odd number of cases, so DDP shards are uneven."""
    data = SyntheticDataModule(scale=0.02, batch_size=64, eval_batch_size=100)
    data.setup()
    return data


def quiet_trainer(max_epochs: int = 1, **kwargs: object):
    import lightning.pytorch as pl

    options = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def fit_and_test(model, data, max_epochs: int) -> dict[str, float]:
    """Fit for ``max_epochs`` (no early stopping) and return the test metrics."""
    trainer = quiet_trainer(max_epochs, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    return metrics


def install_counting_ids(model, num_items: int) -> None:  # type: ignore[no-untyped-def]
    """Give a semantic-ID model item i's ID = i written in base ``codebook_size`` (unique; fitting IDs
    needs faiss, which the GPU image lacks); other models are left as they are."""
    import torch

    from recbench.semantic_id_model import SemanticIDModel
    from recbench.semantic_ids import SemanticIDs

    if not isinstance(model, SemanticIDModel):
        return
    base, digits = model.codebook_size, model.n_digits
    items = torch.arange(num_items + 1)
    codes = torch.stack([(items // base ** (digits - 1 - d)) % base for d in range(digits)], dim=1)
    model.set_semantic_ids(SemanticIDs(codes, (base,) * digits, "counting", collision_digit=model.collision_digit))
