"""recbench's data and evaluator from your own Lightning script.

The datamodule gives the benchmark's split and batches (``history``, ``target``, ``user``, ...);
:class:`~recbench.metrics.RankingMetrics` gives the benchmark's metrics (full ranking, Recall/NDCG/
MRR at 5/10/20) from any model's ranked item ids. Nothing here depends on ``SeqRecModel``::

    python examples/own_lightning_script.py                 # synthetic data, no files needed
    python examples/own_lightning_script.py --data beauty   # needs RECBENCH_DATA_DIR
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import nn

from benchmark.registry import instantiate_data
from recbench.batch import HISTORY, PAD_ID, TARGET
from recbench.metrics import RankingMetrics


class LastItem(pl.LightningModule):
    """Predicts the next item from the last one only (a first-order Markov model)."""

    def __init__(self, num_items: int, hidden_size: int = 32) -> None:
        super().__init__()
        self.items = nn.Embedding(num_items + 1, hidden_size, padding_idx=PAD_ID)
        self.metrics = RankingMetrics(ks=(5, 10, 20))

    def scores(self, history: torch.Tensor) -> torch.Tensor:
        scores = self.items(history[:, -1]) @ self.items.weight.T  # histories are left-padded
        scores[:, PAD_ID] = float("-inf")
        return scores

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.scores(batch[HISTORY]), batch[TARGET])

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.metrics.update(self.scores(batch[HISTORY]).topk(20, dim=1).indices, batch[TARGET])

    def on_test_epoch_end(self) -> None:
        self.log_dict({f"test/{name}": value for name, value in self.metrics.compute().items()})
        self.metrics.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="synthetic_tiny", help="a data config name or YAML")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    pl.seed_everything(0)
    # train_format="pairs": one (history, target) pair per training position, which is what
    # this model's training_step reads (the default, "auto", follows the model's training_view).
    data = instantiate_data(args.data, train_format="pairs")
    model = LastItem(data.num_items)
    trainer = pl.Trainer(
        max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, datamodule=data)
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    print({name: round(value, 4) for name, value in metrics.items()})


if __name__ == "__main__":
    main()
