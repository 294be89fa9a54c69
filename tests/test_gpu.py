"""GPU checks (marker `gpu`; skipped without CUDA): the same code paths on a CUDA device."""

import pytest
import torch

from benchmark.registry import config_names, instantiate_model
from recbench.metrics import RankingMetrics
from recbench.retrieval import ItemIndex

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


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
    import lightning.pytorch as pl

    model = instantiate_model(name, tiny_data.num_items, tiny_data.max_len)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, precision="bf16-mixed")
    trainer.fit(model, datamodule=tiny_data)
    (metrics,) = trainer.test(model, datamodule=tiny_data, verbose=False)
    assert 0.0 <= metrics["test/ndcg@10"] <= 1.0
