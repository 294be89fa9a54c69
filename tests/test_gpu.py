"""GPU checks (marker `gpu`; skipped without CUDA): the same code paths on a CUDA device.

`make gpu-bench` runs this module (with the CUDA tests of test_no_sync.py and test_tiger.py) after
the paper rows, on a GPU image that has no faiss: semantic-ID models get counting IDs here instead
of fitted ones.
"""

import lightning.pytorch as pl
import pytest
import torch
from conftest import install_counting_ids

from benchmark.registry import config_names, instantiate_model
from datamodules.synthetic import SyntheticDataModule
from recbench.batch import USER
from recbench.metrics import RankingMetrics
from recbench.model import SeqRecModel
from recbench.retrieval import ItemIndex

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _gpu_model(name: str, data) -> SeqRecModel:
    """``name`` over ``data``, with counting semantic IDs (:func:`conftest.install_counting_ids`)."""
    model = instantiate_model(name, data.num_items, data.max_len)
    install_counting_ids(model, data.num_items)
    return model


def test_item_index_on_gpu_matches_cpu() -> None:
    table = torch.randn(5001, 64, generator=torch.Generator().manual_seed(0))
    queries = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    _, cpu_items = ItemIndex(table, backend="torch").search(queries, 20)
    _, gpu_items = ItemIndex(table.cuda(), backend="torch").search(queries.cuda(), 20)
    assert torch.equal(cpu_items, gpu_items.cpu())


def test_metrics_on_gpu_match_cpu() -> None:
    ranked = torch.randint(1, 100, (512, 20), generator=torch.Generator().manual_seed(0))
    target = torch.randint(1, 100, (512,), generator=torch.Generator().manual_seed(1))
    cpu, gpu = RankingMetrics(), RankingMetrics().cuda()
    cpu.update(ranked, target)
    gpu.update(ranked.cuda(), target.cuda())
    assert {k: float(v) for k, v in cpu.compute().items()} == {k: float(v) for k, v in gpu.compute().items()}


@pytest.mark.parametrize("name", [n for n in config_names("model") if "paper" not in n])
def test_models_train_and_recommend_on_gpu(name: str, tiny_data) -> None:
    model = _gpu_model(name, tiny_data)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, precision="bf16-mixed")
    trainer.fit(model, datamodule=tiny_data)
    (metrics,) = trainer.test(model, datamodule=tiny_data, verbose=False)
    assert 0.0 <= metrics["test/ndcg@10"] <= 1.0


class _NoSyncBetweenSteps(pl.Callback):
    """``set_sync_debug_mode("error")`` from the end of the second training batch to the end of the
    training steps: it covers what a step costs in a real fit, beyond ``loss`` + ``backward`` (the
    loader's next batch, its copy to the device, bf16 autocast, gradient clipping, the optimiser and
    the per-step learning-rate schedule). Lightning's own logging reads values every
    ``log_every_n_steps`` steps and validation once per epoch; the test keeps both outside the window."""

    def __init__(self) -> None:
        self.checked_steps = 0

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch, batch_idx: int) -> None:
        self.checked_steps += torch.cuda.get_sync_debug_mode() == 2
        assert batch[USER].device.type == "cuda"

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        if batch_idx == 1:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", ["sasrec", "dreamrec", "tiger", "diffgrm", "tiger_paper", "diffgrm_paper", "dreamrec_paper"])
def test_fit_steps_do_not_synchronise(name: str) -> None:
    """Issue 13's GPU hot path, in a real Lightning fit at the paper profile's precision: no step
    after the second waits on the device. The data is large enough for six batches of the largest
    recipe batch (diffgrm_paper's 1,024 pairs)."""
    data = SyntheticDataModule(scale=0.1, batch_size=64, eval_batch_size=256)
    data.setup()
    model = _gpu_model(name, data)
    guard = _NoSyncBetweenSteps()
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_epochs=1, limit_train_batches=6, limit_val_batches=0,
                         log_every_n_steps=1000, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, precision="bf16-mixed", callbacks=[guard])
    try:
        trainer.fit(model, datamodule=data)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert guard.checked_steps == 4
    # Batches come through pinned buffers: a copy from pageable memory may wait for the queued
    # kernels, which the sync debug mode does not see (the driver waits, not torch).
    assert data.pin_memory
    batch = next(iter(data.train_dataloader()))
    assert all(value.is_pinned() for value in batch.values())
