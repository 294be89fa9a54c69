"""How popular are the items a trained checkpoint recommends? The popularity bias of its top-K lists.

    python -m benchmark.perf.recommended_popularity --checkpoint runs/bench/<run>/checkpoints/best.ckpt \
        --model dreamrec --dataset steam [--users 1000] [--k 10] [--out-dir results/perf] [--name NAME]

``recbench bands`` shows *where* a model's hits fall; this shows *what it recommends*: over the first
``--users`` test cases, the share of top-K slots taken by the 10 / 100 / 1000 most trained items
(popularity fills every slot from the first K), the median training-popularity rank of a
recommended item, and the Spearman correlation between the norm of each trained item's embedding
row and its training count (for models with an ``item_embedding``: inner-product retrieval favours
long rows, so this is where a popularity prior would live). Writes ``<out-dir>/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from scipy import stats

from benchmark.bands import popularity_ranks
from benchmark.perf.common import environment, write_report
from benchmark.registry import instantiate_data, require_config
from recbench.batch import HISTORY
from recbench.data import SeqRecDataModule
from recbench.model import SeqRecModel

HEADS = (10, 100, 1000)


@torch.no_grad()
def recommended_popularity(model: SeqRecModel, data: SeqRecDataModule, users: int, k: int) -> dict[str, Any]:
    """The figures described in the module docstring, for ``model`` on ``data``'s first test cases."""
    ranks = popularity_ranks(data.train_item_counts().numpy())
    lists = []
    for batch in data.test_dataloader():
        lists.append(model.recommend(batch[HISTORY], k))  # (B, k)
        if sum(len(chunk) for chunk in lists) >= users:
            break
    recommended = torch.cat(lists)[:users].numpy()
    filled = recommended[recommended > 0]  # 0 marks a slot the model could not fill
    if filled.size == 0:
        raise ValueError(f"{type(model).__name__} filled no top-{k} slot for the first {users} test cases")
    slot_ranks = ranks[filled]
    result: dict[str, Any] = {
        "users": int(len(recommended)),
        "k": k,
        "empty_slots": int((recommended <= 0).sum()),
        **{f"share_on_top{head}": float((slot_ranks < head).mean()) for head in HEADS},
        "median_rank": float(np.median(slot_ranks)),
    }
    embedding = getattr(model, "item_embedding", None)
    if isinstance(embedding, torch.nn.Embedding):
        counts = data.train_item_counts().numpy()
        trained = counts > 0  # row 0, the padding id, has count 0
        norms = embedding.weight.detach().float().norm(dim=1).cpu().numpy()
        result["norm_count_spearman"] = float(stats.spearmanr(norms[trained], counts[trained]).statistic)
    return result


def load_model(config: str, checkpoint: Path) -> SeqRecModel:
    """The checkpoint, as the class its model config names (``baselines.dreamrec.DreamRec`` ...)."""
    class_path = yaml.safe_load(Path(require_config("model", config)).read_text())["class_path"]
    module_name, class_name = class_path.rsplit(".", 1)
    model_class = getattr(importlib.import_module(module_name), class_name)
    # weights_only: a checkpoint from elsewhere must never run code; ours holds only plain types.
    return model_class.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()


def _markdown(payload: dict[str, Any]) -> str:
    result, env = payload["result"], payload["environment"]
    heads = " / ".join(f"{result[f'share_on_top{h}']:.4f}" for h in HEADS)
    lines = [
        f"# Popularity of the items `{payload['model']}` recommends on {payload['dataset']}",
        "",
        f"Checkpoint `{payload['checkpoint']}`; first {result['users']} test cases, top-{result['k']}; "
        f"{env['device']}, commit {env['git_commit']}, {env['date']}.",
        "",
        f"- share of filled slots on the {' / '.join(map(str, HEADS))} most trained items: {heads} "
        "(popularity: 1 / 1 / 1)",
        f"- median training-popularity rank of a recommended item: {result['median_rank']:.0f}",
        f"- empty slots: {result['empty_slots']}",
    ]
    if "norm_count_spearman" in result:
        lines.append(f"- Spearman(item-row norm, training count) over trained items: {result['norm_count_spearman']:.3f}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--model", required=True, help="the model config the checkpoint was trained from")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out-dir", type=Path, default=Path("results/perf"))
    parser.add_argument("--name", default=None, help="report name (default: recommended_popularity_<dataset>_<model>)")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"no checkpoint at {args.checkpoint}")
    data = instantiate_data(args.dataset)
    payload = {
        "checkpoint": str(args.checkpoint),
        "model": args.model,
        "dataset": data.name,
        "environment": environment(),
        "result": recommended_popularity(load_model(args.model, args.checkpoint), data, args.users, args.k),
    }
    name = args.name or f"recommended_popularity_{data.name}_{args.model}"
    write_report(args.out_dir, name, payload, _markdown(payload))
    print(_markdown(payload))
    return payload


if __name__ == "__main__":
    main()
