"""SASRec training seconds per epoch and test users per second.

    python -m benchmark.perf.sasrec_speed --dataset synthetic [--max-batches 40] [--out results/perf]

Training time is measured over ``--max-batches`` optimiser steps (after 3 warm-up steps) and
extrapolated to a full epoch (the report says so); test throughput runs the shared evaluation
path (``ranked_items`` + metrics) over every test case.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmark.perf.common import environment, write_report
from benchmark.registry import instantiate_data, instantiate_model
from recbench.batch import HISTORY, TARGET
from recbench.metrics import RankingMetrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--model", default="sasrec")
    parser.add_argument("--max-batches", type=int, default=40)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("results/perf"))
    args = parser.parse_args()
    device = torch.device(args.device)
    data = instantiate_data(args.dataset, train_format="sequence")
    data.setup()
    model = instantiate_model(args.model, data.num_items, data.max_len).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = data.train_dataloader()
    batches_per_epoch = len(loader)
    model.train()
    timed, seconds = 0, 0.0
    for step, batch in enumerate(loader):
        if step == 3 + args.max_batches:
            break
        batch = {key: value.to(device) for key, value in batch.items()}
        started = time.perf_counter()
        loss = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 3:
            timed += 1
            seconds += time.perf_counter() - started
    epoch_seconds = seconds / max(timed, 1) * batches_per_epoch

    model.eval()
    metrics = RankingMetrics().to(device)
    cases = 0
    started = time.perf_counter()
    with torch.no_grad():
        for batch in data.test_dataloader():
            history, target = batch[HISTORY].to(device), batch[TARGET].to(device)
            metrics.update(model.ranked_items(history, 20), target)
            cases += len(target)
    if device.type == "cuda":
        torch.cuda.synchronize()
    test_seconds = time.perf_counter() - started
    payload = {
        **environment(),
        "dataset": data.name,
        "model": args.model,
        "parameters": model.num_parameters(),
        "batch_size": data.batch_size,
        "batches_per_epoch": batches_per_epoch,
        "timed_batches": timed,
        "train_seconds_per_epoch_extrapolated": round(epoch_seconds, 2),
        "test_cases": cases,
        "test_users_per_second": round(cases / test_seconds, 1),
        "test_ndcg@10_untrained": round(float(metrics.compute()["ndcg@10"]), 5),
    }
    markdown = (
        f"# {args.model} speed on {data.name} ({payload['device']})\n\n"
        f"| measure | value |\n|---|---|\n"
        f"| train seconds per epoch (from {timed} of {batches_per_epoch} batches, extrapolated) | {epoch_seconds:.1f} |\n"
        f"| test users per second ({cases} cases, eval batch {data.eval_batch_size}) | {cases / test_seconds:.0f} |\n"
        f"| parameters | {payload['parameters']:,} |\n\ntorch {payload['torch']}, {payload['date']}, commit {payload['git_commit']}\n"
    )
    paths = write_report(args.out, f"{args.model}_speed_{data.name}_{device.type}", payload, markdown)
    print(markdown)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
