"""DreamRec sampling cost: exact fused sampling vs the reference's per-step loop, and DDIM's price.

Usage (CPU or GPU)::

    PYTHONPATH=. python -m benchmark.perf.dreamrec_sampling [--data synthetic] [--checkpoint PATH]

It builds a DreamRec on a dataset (a short name from ``benchmark/configs/data``; default the
Beauty-sized synthetic set), either from a checkpoint or by fitting ``--fit-epochs`` epochs, and
measures on the same test cases, in one run, test users per second of ``recommend``
(generation + retrieval):

- ``naive``: the reference's loop, evaluation batch 100, two denoiser calls per step and the time
  MLP at every step (``DreamRec.generate(path="naive")``). It is slow, so it runs on the first
  ``--naive-cases`` cases only; the report says how many.
- ``fused, batch 100``: the exact speed-ups except the large batch (isolates the fusion gain).
- ``fused, large batch``: the exact speed-ups, ``--fused-batch`` cases per batch (0 = all at once).
- ``ddim``: strided DDIM with ``--ddim-steps`` steps (approximate) on every case, large batch; its
  Recall/NDCG@10/20 next to the exact DDPM metrics of the same cases.

All paths use the model's keyed evaluation noise, so the naive and fused paths must return the same
lists (checked: the share of identical top-10 lists and the largest difference of the generated
vectors). Writes ``<out>.json`` and ``<out>.md`` (default ``results/perf/dreamrec_sampling``)
atomically, with device, torch version, thread count and date.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import lightning.pytorch as pl
import torch

from baselines.dreamrec import DreamRec, SamplerKind, SamplingPath
from benchmark.registry import instantiate_data, instantiate_model
from benchmark.run import atomic_write_text, device_name
from recbench.batch import HISTORY, TARGET
from recbench.metrics import case_metric_values, metric_names

KS = (10, 20)


@dataclass(frozen=True)
class Measurement:
    """One timed configuration."""

    name: str
    exact: bool
    cases: int
    batch_size: int
    seconds: float
    users_per_second: float
    recall_10: float
    ndcg_10: float
    recall_20: float
    ndcg_20: float


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def rank(
    model: DreamRec,
    history: torch.Tensor,
    k: int,
    path: SamplingPath,
    sampler: SamplerKind,
    ddim_steps: int,
    ddim_eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0 (B, d), items (B, k))`` for one batch, as ``recommend`` does, with a chosen path."""
    x0 = model.generate(history, path=path, sampler=sampler, ddim_steps=ddim_steps, ddim_eta=ddim_eta)
    _, items = model.item_index().search(x0, k)
    return x0, items


def timed_run(
    name: str,
    exact: bool,
    run_batch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    history: torch.Tensor,
    target: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> tuple[Measurement, torch.Tensor, torch.Tensor]:
    """Time ``run_batch`` over ``history`` in batches; returns the measurement, x0 and the lists."""
    size = batch_size if batch_size > 0 else len(history)
    run_batch(history[: min(size, 8)])  # warm-up: tables, index, kernels
    _synchronize(device)
    started = time.perf_counter()
    outputs = [run_batch(chunk) for chunk in history.split(size)]
    _synchronize(device)
    seconds = time.perf_counter() - started
    x0 = torch.cat([x for x, _ in outputs])
    items = torch.cat([i for _, i in outputs])
    values = case_metric_values(items, target, KS).mean(dim=0)  # (len(metric_names(KS)),)
    named = dict(zip(metric_names(KS), values.tolist(), strict=True))
    measurement = Measurement(
        name=name,
        exact=exact,
        cases=len(history),
        batch_size=size,
        seconds=round(seconds, 4),
        users_per_second=round(len(history) / seconds, 1),
        recall_10=named["recall@10"],
        ndcg_10=named["ndcg@10"],
        recall_20=named["recall@20"],
        ndcg_20=named["ndcg@20"],
    )
    return measurement, x0, items


def build_model(args: argparse.Namespace, data, device: torch.device) -> tuple[DreamRec, str]:  # type: ignore[no-untyped-def]
    """Load ``--checkpoint`` or fit ``--fit-epochs`` epochs; returns the model and how it was made."""
    if args.checkpoint:
        model = DreamRec.load_from_checkpoint(args.checkpoint, map_location="cpu")
        origin = f"checkpoint {args.checkpoint}"
    else:
        pl.seed_everything(args.seed, verbose=False)
        model = instantiate_model(args.model, data.num_items, data.max_len, timesteps=args.timesteps)
        if not isinstance(model, DreamRec):
            raise SystemExit(f"--model {args.model} is not a DreamRec config")
        if args.fit_epochs > 0:
            trainer = pl.Trainer(
                accelerator="gpu" if device.type == "cuda" else "cpu",
                devices=1,
                max_epochs=args.fit_epochs,
                limit_val_batches=0,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
            )
            started = time.perf_counter()
            trainer.fit(model, datamodule=data)
            origin = f"fitted {args.fit_epochs} epoch(s) here in {time.perf_counter() - started:.0f} s"
        else:
            origin = "untrained (random weights)"
    if not bool(model.train_items.any()):
        model.set_train_items(data.train_item_mask())
    return model.to(device).eval(), origin


def markdown(report: dict[str, object], rows: list[Measurement]) -> str:
    lines = [
        "# DreamRec sampling cost",
        "",
        f"{report['date']} · {report['device']} · torch {report['torch']} · {report['threads']} CPU threads · "
        f"dataset `{report['dataset']}` ({report['model_origin']}) · T = {report['timesteps']} · "
        f"{report['denoiser']} · w = {report['guidance_weight']}",
        "",
        "| sampler | exact | cases | batch | users/s | Recall@10 | NDCG@10 | Recall@20 | NDCG@20 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {'yes' if row.exact else 'APPROXIMATE'} | {row.cases} | {row.batch_size} | "
            f"{row.users_per_second:,.0f} | {row.recall_10:.4f} | {row.ndcg_10:.4f} | "
            f"{row.recall_20:.4f} | {row.ndcg_20:.4f} |"
        )
    lines += [
        "",
        f"- fused large batch vs naive batch 100: **{report['speedup_fused_vs_naive']:.1f}x** test users per "
        f"second (fusion alone, both at batch 100: {report['speedup_fusion_only']:.1f}x). The naive loop ran on "
        f"the first {report['naive_cases']} of the {report['cases']} cases.",
        f"- same lists: {100 * float(report['naive_fused_same_top10']):.2f}% of the naive path's top-10 lists "
        f"equal the fused path's (max |x0 difference| {float(report['naive_fused_max_abs_x0_diff']):.2e}).",
        f"- DDIM {report['ddim_steps']} steps (eta {report['ddim_eta']}), approximate: NDCG@10 "
        f"{float(report['ddim_minus_exact_ndcg_10']):+.4f}, Recall@10 {float(report['ddim_minus_exact_recall_10']):+.4f} "
        f"vs exact DDPM on the same {report['cases']} cases, at "
        f"{float(report['speedup_ddim_vs_exact']):.1f}x the exact fused speed.",
        "- noise: keyed by history (eval_seed " + str(report["eval_seed"]) + "), identical in every path.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="synthetic", help="data short name or YAML (default: synthetic)")
    parser.add_argument("--model", default="dreamrec", help="DreamRec model config (default: dreamrec)")
    parser.add_argument("--checkpoint", default=None, help="a DreamRec checkpoint to load instead of fitting")
    parser.add_argument("--timesteps", type=int, default=500, help="T when building a model (default 500)")
    parser.add_argument(
        "--fit-epochs", type=int, default=1, help="epochs to fit when no checkpoint (default 1)"
    )
    parser.add_argument("--cases", type=int, default=0, help="test cases to use (0 = all)")
    parser.add_argument("--naive-cases", type=int, default=1000, help="cases for the naive path (0 = all)")
    parser.add_argument(
        "--naive-batch", type=int, default=100, help="naive evaluation batch (the reference: 100)"
    )
    parser.add_argument(
        "--fused-batch", type=int, default=0, help="fused evaluation batch (0 = all cases at once)"
    )
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--ddim-eta", type=float, default=0.0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/perf/dreamrec_sampling"))
    args = parser.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    data = instantiate_data(args.data)
    data.setup()
    model, origin = build_model(args, data, device)

    batches = list(data.test_dataloader())
    history = torch.cat([b[HISTORY] for b in batches]).to(device)  # (C, L)
    target = torch.cat([b[TARGET] for b in batches]).to(device)  # (C,)
    if args.cases > 0:
        history, target = history[: args.cases], target[: args.cases]
    n_naive = len(history) if args.naive_cases <= 0 else min(args.naive_cases, len(history))
    k = max(KS)
    T = model.diffusion.num_timesteps

    def path_runner(
        path: SamplingPath, sampler: SamplerKind = "ddpm"
    ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        return lambda h: rank(model, h, k, path, sampler, args.ddim_steps, args.ddim_eta)

    naive, naive_x0, naive_items = timed_run(
        f"ddpm T={T}, naive loop",
        True,
        path_runner("naive"),
        history[:n_naive],
        target[:n_naive],
        args.naive_batch,
        device,
    )
    fused_small, _, _ = timed_run(
        f"ddpm T={T}, fused",
        True,
        path_runner("fused"),
        history[:n_naive],
        target[:n_naive],
        args.naive_batch,
        device,
    )
    fused, fused_x0, fused_items = timed_run(
        f"ddpm T={T}, fused", True, path_runner("fused"), history, target, args.fused_batch, device
    )
    ddim, _, _ = timed_run(
        f"ddim {args.ddim_steps} of {T} steps, eta {args.ddim_eta:g}",
        False,
        path_runner("fused", "ddim"),
        history,
        target,
        args.fused_batch,
        device,
    )
    same = (naive_items[:, :10] == fused_items[:n_naive, :10]).all(dim=1).float().mean().item()
    rows = [naive, fused_small, fused, ddim]
    report: dict[str, object] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name() if device.type == "cuda" else f"CPU: {device_name()}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "dataset": data.name,
        "data_fingerprint": data.fingerprint,
        "model_origin": origin,
        "timesteps": T,
        "denoiser": model.denoiser_kind,
        "guidance_weight": model.guidance_weight,
        "eval_seed": model.eval_seed,
        "sampler_exact": model.sampler_description(),
        "retrieval": model.retrieval_description(),
        "cases": len(history),
        "naive_cases": n_naive,
        "ddim_steps": args.ddim_steps,
        "ddim_eta": args.ddim_eta,
        "speedup_fused_vs_naive": fused.users_per_second / naive.users_per_second,
        "speedup_fusion_only": fused_small.users_per_second / naive.users_per_second,
        "speedup_ddim_vs_exact": ddim.users_per_second / fused.users_per_second,
        "naive_fused_same_top10": same,
        "naive_fused_max_abs_x0_diff": (naive_x0 - fused_x0[:n_naive]).abs().max().item(),
        "ddim_minus_exact_ndcg_10": ddim.ndcg_10 - fused.ndcg_10,
        "ddim_minus_exact_recall_10": ddim.recall_10 - fused.recall_10,
        "ddim_minus_exact_ndcg_20": ddim.ndcg_20 - fused.ndcg_20,
        "ddim_minus_exact_recall_20": ddim.recall_20 - fused.recall_20,
        "measurements": [asdict(row) for row in rows],
        "args": {key: str(value) for key, value in vars(args).items()},
    }
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    text = markdown(report, rows)
    atomic_write_text(args.out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
