"""Learning and determinism on synthetic data: tests that fail when the model does not learn."""

import lightning.pytorch as pl
import pytest
from conftest import fit_and_test

from benchmark.registry import instantiate_model
from datamodules.synthetic import SyntheticDataModule


@pytest.fixture(scope="module")
def small_data() -> SyntheticDataModule:
    data = SyntheticDataModule(scale=0.05, max_len=20, batch_size=128, eval_batch_size=512)
    data.setup()
    return data


def _fit(name: str, data: SyntheticDataModule, epochs: int, seed: int = 0, **init_args) -> dict[str, float]:
    pl.seed_everything(seed)
    model = instantiate_model(name, data.num_items, data.max_len, **init_args)
    return fit_and_test(model, data, epochs)


def test_sasrec_clearly_beats_popularity(small_data: SyntheticDataModule) -> None:
    popularity = _fit("popularity", small_data, 1)
    sasrec = _fit("sasrec", small_data, 10, lr=3e-3)
    assert popularity["test/ndcg@10"] > 0.005, "popularity should not be at zero on skewed data"
    assert sasrec["test/ndcg@10"] > 2 * popularity["test/ndcg@10"], (sasrec, popularity)
    assert sasrec["test/recall@10"] > popularity["test/recall@10"]


def test_same_seed_same_metrics(small_data: SyntheticDataModule) -> None:
    first = _fit("sasrec", small_data, 2, seed=7)
    second = _fit("sasrec", small_data, 2, seed=7)
    assert {k: v for k, v in first.items() if "per_second" not in k} == {
        k: v for k, v in second.items() if "per_second" not in k
    }
