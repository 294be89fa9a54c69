"""TIGER-style model: training seconds per epoch and test users per second at several beam widths.

    python -m benchmark.perf.tiger_speed --dataset synthetic [--model tiger] [--max-batches 20]
        [--beams 20 50] [--max-test-users 4096] [--embedding-source text] [--out results/perf]

Training time is measured over ``--max-batches`` optimiser steps (after 2 warm-up steps) with
AdamW and extrapolated to a full epoch of the data's training pairs (the report says so). Test
throughput runs the shared evaluation path (``ranked_items``, i.e. encoder + KV-cached constrained
beam search + ID -> item mapping) over the first ``--max-test-users`` test cases (all with 0), once
per beam width, after one warm-up batch; the network is the briefly trained one, which costs the
same as a converged one. The semantic IDs are fitted (or read from the item-side cache) first and
not timed. On CUDA the timed code runs under bf16 autocast, as the runner's ``bf16-mixed``.
Writes ``<out>/<model>_speed_<dataset>_<cpu|cuda>.json`` and ``.md`` atomically, with the device and
the date.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from baselines.tiger import TIGER
from benchmark.perf.common import environment, write_report
from benchmark.registry import instantiate_data, instantiate_model
from recbench.batch import HISTORY


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--model", default="tiger", help="a TIGER model config name or YAML path")
    parser.add_argument("--max-batches", type=int, default=20)
    parser.add_argument("--beams", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--max-test-users", type=int, default=4096, help="0 = every test case")
    parser.add_argument("--embedding-source", choices=["text", "collaborative"], default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("results/perf"))
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )

    data = instantiate_data(args.dataset, train_format="pairs")
    data.setup()
    overrides = {} if args.embedding_source is None else {"embedding_source": args.embedding_source}
    model = instantiate_model(args.model, data.num_items, data.max_len, **overrides)
    if not isinstance(model, TIGER):
        raise SystemExit(f"{args.model} is a {type(model).__name__}, not a TIGER model")
    started = time.perf_counter()
    model.set_semantic_ids(*model.build_semantic_ids(data))  # untimed below; cached on disk
    sid_seconds = time.perf_counter() - started
    model = model.to(device)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = data.train_dataloader()
    batches_per_epoch = len(loader)
    model.train()
    timed, seconds = 0, 0.0
    for step, batch in enumerate(loader):
        if step == 2 + args.max_batches:
            break
        batch = {key: value.to(device) for key, value in batch.items()}
        _sync(device)
        started = time.perf_counter()
        with autocast:
            loss = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _sync(device)
        if step >= 2:
            timed += 1
            seconds += time.perf_counter() - started
    epoch_seconds = seconds / max(timed, 1) * batches_per_epoch

    model.eval()
    limit = args.max_test_users or None
    throughput: dict[str, float] = {}
    cases_timed = 0
    for beam in args.beams:
        model.beam_size = beam
        cases, test_seconds = 0, 0.0
        with torch.no_grad(), autocast:
            for index, batch in enumerate(data.test_dataloader()):
                history = batch[HISTORY].to(device)
                if limit is not None:
                    history = history[: limit - cases]
                if index == 0:  # warm-up (allocations, kernel selection), not timed
                    model.ranked_items(history, 20)
                _sync(device)
                started = time.perf_counter()
                model.ranked_items(history, 20)
                _sync(device)
                test_seconds += time.perf_counter() - started
                cases += len(history)
                if limit is not None and cases >= limit:
                    break
        throughput[str(beam)] = round(cases / test_seconds, 1)
        cases_timed = cases
    payload = {
        **environment(),
        "dataset": data.name,
        "model": args.model,
        "parameters": model.num_parameters(),
        "run_notes": model.run_notes(),
        "semantic_id_seconds_untimed": round(sid_seconds, 2),
        "batch_size": data.batch_size,
        "eval_batch_size": data.eval_batch_size,
        "batches_per_epoch": batches_per_epoch,
        "timed_batches": timed,
        "train_seconds_per_epoch_extrapolated": round(epoch_seconds, 2),
        "test_cases_timed": cases_timed,
        "test_users_per_second_by_beam": throughput,
        "autocast_bf16": device.type == "cuda",
    }
    rows = "".join(
        f"| test users per second, beam {beam} ({cases_timed} cases, eval batch {data.eval_batch_size}) "
        f"| {value:.0f} |\n"
        for beam, value in throughput.items()
    )
    markdown = (
        f"# {args.model} speed on {data.name} ({payload['device']})\n\n"
        f"| measure | value |\n|---|---|\n"
        f"| train seconds per epoch (from {timed} of {batches_per_epoch} batches of {data.batch_size}, "
        f"extrapolated) | {epoch_seconds:.1f} |\n"
        f"{rows}"
        f"| parameters | {payload['parameters']:,} |\n\n"
        f"Semantic IDs: {payload['run_notes'].get('scheme')} on {payload['run_notes'].get('embedding_source')} "
        f"(fitted or read from cache before timing, {sid_seconds:.1f} s). "
        f"{'bf16 autocast. ' if device.type == 'cuda' else ''}"
        f"torch {payload['torch']}, {payload['threads']} threads, {payload['date']}, commit {payload['git_commit']}\n"
    )
    paths = write_report(args.out, f"{Path(args.model).stem}_speed_{data.name}_{device.type}", payload, markdown)
    print(markdown)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
