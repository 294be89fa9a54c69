"""DiffGRM training step: the last decoder block on the scored positions only, against the full decoder.

    python -m benchmark.perf.diffgrm_step_ab [--dataset beauty] [--config diffgrm] [--batches 20]
        [--rounds 6] [--batch-size N] [--out results/perf]

``DiffGRM.loss`` runs the last decoder block's cross-attention and FFN on the masked positions of its
nested views only (10 of 16 per target at n = 4); the full step is the same loss computed with every
position of every block (``decoder_logits`` without ``scored``; same loss and gradients,
``tests/test_diffgrm.py``). Both steps (loss, backward, clipping, AdamW) run on the same training
batches of the datamodule, alternating step by step (the order flips every other step), so that the
drift of a shared machine falls on both alike; the report gives the median and mean per step and the
epoch they extrapolate to. Writes ``results/perf/diffgrm_step_ab_<dataset>_<cpu|cuda>.{json,md}``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor

from baselines.diffgrm import DiffGRM
from benchmark.perf.common import environment, write_report
from benchmark.registry import instantiate_data, instantiate_model
from benchmark.run import available_cores, load_profile, model_config_for
from recbench.batch import HISTORY, TARGET, Batch
from recbench.diffusion import apply_mask, masked_cross_entropy


def full_decoder_loss(model: DiffGRM, batch: Batch) -> Tensor:
    """``model.loss`` with every position of every decoder block computed."""
    memory = model.encode(batch[HISTORY])
    target = model.sid_codes[batch[TARGET]]  # (B, n)
    mask = model.training_masks(memory, target.shape[0])  # (B, V, n)
    logits = model.decoder_logits(memory, apply_mask(target, mask))  # (B, V, n, K')
    scored = model._loss_mask(mask)  # (B, V, n): the positions the loss reads
    return masked_cross_entropy(logits, target.unsqueeze(1).expand_as(mask), scored, model.label_smoothing)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--dataset", default="beauty")
    parser.add_argument("--config", default="diffgrm")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--batches", type=int, default=20, help="training batches, each timed once per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's / datamodule's")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/perf"))
    args = parser.parse_args(argv)

    torch.set_num_threads(available_cores())
    pl.seed_everything(args.seed)
    profile = load_profile(args.profile)
    data = instantiate_data(args.dataset, val_subset=profile.val_subset)
    model = instantiate_model(model_config_for(args.config, profile), data.num_items, data.max_len)
    if not isinstance(model, DiffGRM):
        parser.error(f"{args.config} is not a DiffGRM config")
    data.batch_size = args.batch_size or model.training_batch_size or data.batch_size
    data.train_format = model.training_view
    data.prepare_data()
    data.setup("fit")
    model.set_semantic_ids(*model.build_semantic_ids(data))
    model.train()
    loader = data.train_dataloader()
    batches = list(itertools.islice(iter(loader), args.batches))
    optimizer = model.adamw()
    losses: dict[str, Callable[[Batch], Tensor]] = {"full": lambda b: full_decoder_loss(model, b), "trimmed": model.loss}

    def step(loss_fn: Callable[[Batch], Tensor], batch: Batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), model.gradient_clip_val)
        optimizer.step()

    for batch in batches[:3]:  # warm-up: allocator, first-call costs
        step(model.loss, batch)
    times: dict[str, list[float]] = {"full": [], "trimmed": []}
    for round_, (i, batch) in itertools.product(range(args.rounds), enumerate(batches)):
        for variant in ("full", "trimmed") if (round_ + i) % 2 else ("trimmed", "full"):
            start = time.perf_counter()
            step(losses[variant], batch)
            times[variant].append((time.perf_counter() - start) * 1000)

    rows = [
        {
            "variant": variant,
            "steps": len(values),
            "median_ms": round(statistics.median(values), 2),
            "mean_ms": round(statistics.mean(values), 2),
            "epoch_s_from_median": round(statistics.median(values) * len(loader) / 1000, 1),
        }
        for variant, values in times.items()
    ]
    ratio = rows[1]["median_ms"] / rows[0]["median_ms"]
    report = {
        **environment(), "dataset": args.dataset, "config": args.config, "batch_size": data.batch_size,
        "batches_per_epoch": len(loader), "rows": rows, "median_ratio_trimmed_over_full": round(ratio, 3),
    }
    lines = [
        f"# DiffGRM training step: scored positions only vs full decoder ({args.dataset}, {args.config})",
        "",
        f"{report['device']}, {report['threads']} threads, torch {report['torch']}, {report['date']}, "
        f"commit {report['git_commit']}; batch {data.batch_size}, {len(loader)} batches per epoch; "
        f"{args.batches} batches x {args.rounds} rounds, alternating.",
        "",
        "| decoder | steps | median ms / step | mean ms / step | s / epoch (median) |",
        "|---|---|---|---|---|",
        *(f"| {r['variant']} | {r['steps']} | {r['median_ms']} | {r['mean_ms']} | {r['epoch_s_from_median']} |" for r in rows),
        "",
        f"Median ratio trimmed / full: {ratio:.3f}.",
        "",
    ]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = write_report(args.out, f"diffgrm_step_ab_{args.dataset}_{device}", report, "\n".join(lines))
    print("\n".join(lines))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
