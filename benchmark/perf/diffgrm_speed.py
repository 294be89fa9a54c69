"""DiffGRM decoding speed: test users per second of the CPD beam at several beam widths.

    python -m benchmark.perf.diffgrm_speed [--dataset synthetic] [--config diffgrm_paper]
        [--checkpoint PATH] [--beams 32,256] [--users 256] [--batch-size 32] [--device auto]

Times ``DiffGRM.recommend(history, 20, beam)`` (encoder, ``n - 1`` beam steps, legality, dedup,
collision expansion) on the first ``--users`` test cases of the dataset, in batches of
``--batch-size`` users (the reference evaluates 32 users per batch), after one warm-up batch. Without
``--checkpoint`` the network has random weights: the cost of the beam does not depend on the weights
(all widths are fixed; only ``merge_duplicate_beams`` would make it data dependent), but the invalid-ID
rate printed alongside is then meaningless. The semantic IDs come from the checkpoint, or are
fitted (cached) on the dataset with the config's embedding source (``--embedding-source`` overrides;
``collaborative`` avoids encoding item text, which takes minutes on a CPU for Beauty-sized data).

Writes ``results/perf/<config>_speed_<dataset>_<cpu|cuda>.json`` and ``.md`` atomically (for a
checkpoint, ``<config>`` is its run directory), with the device and the date.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from baselines.diffgrm import DiffGRM
from benchmark.perf.common import write_report
from benchmark.registry import instantiate_data, instantiate_model
from benchmark.run import device_name, git_commit


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_beams(
    model: DiffGRM, histories: torch.Tensor, beams: list[int], batch_size: int, k: int = 20
) -> list[dict[str, float]]:
    """Users per second of ``model.recommend`` for each beam width (one warm-up batch first)."""
    device = next(model.parameters()).device
    rows = []
    for beam in beams:
        model.decode_stats.reset()
        model.recommend(histories[:batch_size].to(device), k, beam=beam)  # warm-up (allocator, kernels)
        model.decode_stats.reset()
        _sync(device)
        start = time.perf_counter()
        for chunk in histories.split(batch_size):
            model.recommend(chunk.to(device), k, beam=beam)
        _sync(device)
        seconds = time.perf_counter() - start
        invalid, candidates = (float(v) for v in model.decode_stats.compute())
        rows.append(
            {
                "beam": beam,
                "users": len(histories),
                "seconds": round(seconds, 4),
                "users_per_second": round(len(histories) / seconds, 3),
                "invalid_id_rate": round(invalid / candidates, 6) if candidates else None,
            }
        )
        print(f"beam {beam}: {rows[-1]['users_per_second']} users/s ({seconds:.2f} s for {len(histories)} users)")
    return rows


def _markdown(report: dict[str, object]) -> str:
    lines = [
        "# DiffGRM CPD beam speed",
        "",
        f"- date: {report['date']}",
        f"- device: {report['device']} (torch threads: {report['torch_threads']})",
        f"- dataset: {report['dataset']}; model: {report['config']} ({report['parameters']:,} parameters, "
        f"{'trained checkpoint' if report['checkpoint'] else 'random weights'})",
        f"- semantic IDs: {report['sid_scheme']}",
        f"- eval batch: {report['batch_size']} users; k = 20; precision: {report['precision']}",
        f"- git: {report['git_commit']}",
        "",
        "| beam | users | seconds | users/s | invalid-ID rate |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:  # type: ignore[union-attr]
        lines.append(
            f"| {row['beam']} | {row['users']} | {row['seconds']} | {row['users_per_second']} | {row['invalid_id_rate']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="synthetic", help="data config short name or YAML")
    parser.add_argument("--config", default="diffgrm_paper", help="model config (ignored with --checkpoint)")
    parser.add_argument("--checkpoint", default=None, help="a DiffGRM Lightning checkpoint")
    parser.add_argument("--embedding-source", choices=["text", "collaborative"], default=None)
    parser.add_argument("--beams", default="32,256", help="comma-separated beam widths")
    parser.add_argument("--users", type=int, default=256, help="test users timed per beam width")
    parser.add_argument("--batch-size", type=int, default=32, help="users per recommend call")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--out", default="results/perf", help="output directory")
    args = parser.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    data = instantiate_data(args.dataset)
    data.setup()
    if args.checkpoint:
        # weights_only: a checkpoint from elsewhere must never run code; ours holds only plain types.
        model = DiffGRM.load_from_checkpoint(args.checkpoint, map_location="cpu", weights_only=True)
        if model.num_items != data.num_items:
            raise SystemExit(f"the checkpoint has {model.num_items} items, {args.dataset} has {data.num_items}")
    else:
        overrides = {"embedding_source": args.embedding_source} if args.embedding_source else {}
        model = instantiate_model(args.config, data.num_items, data.max_len, **overrides)
        if not isinstance(model, DiffGRM):
            raise SystemExit(f"{args.config} is not a DiffGRM config")
        torch.manual_seed(0)
        model.set_semantic_ids(*model.build_semantic_ids(data))
    model = model.to(device).eval()
    histories = torch.cat([batch["history"] for batch in data.test_dataloader()])[: args.users]
    beams = [int(b) for b in args.beams.split(",")]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        results = time_beams(model, histories, beams, args.batch_size)
    report: dict[str, object] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name() if device.type == "cuda" or args.device == "auto" else str(device),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "dataset": data.name,
        "config": args.checkpoint or args.config,
        "checkpoint": bool(args.checkpoint),
        "parameters": model.num_parameters(),
        "sid_scheme": model.semantic_ids.scheme,
        "batch_size": args.batch_size,
        "precision": "bf16-autocast" if args.bf16 else "fp32",
        "git_commit": git_commit(),
        "run_notes": model.run_notes(),
        "results": results,
    }
    if device.type == "cpu":
        report["device"] = device_name()
    config_name = Path(args.checkpoint).parents[1].name if args.checkpoint else Path(args.config).stem
    paths = write_report(Path(args.out), f"{config_name}_speed_{data.name}_{device.type}", report, _markdown(report))
    print(_markdown(report))
    print("wrote", *paths)
    return report


if __name__ == "__main__":
    main()
