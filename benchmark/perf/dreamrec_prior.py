"""DreamRec's evaluation-time knobs measured on ONE trained checkpoint (same weights, same noise):
the retrieval popularity prior, or the guidance weight.

    python -m benchmark.perf.dreamrec_prior --checkpoint runs/bench/<run>/checkpoints/best.ckpt \
        --dataset steam [--priors 0 4 8 16 32 64 | --guidance-weights 0 1 2 4] [--profile quick] \
        [--out-dir results/perf/recipe_checks]

``popularity_prior`` only changes retrieval (``x0 · E[j] + b log(1 + n_j)``), not training, so its
effect is measured exactly on a stored checkpoint: validation NDCG@10 (the profile's seeded subset)
for each ``b``, the ``b`` with the best validation chosen, then the test metrics at that ``b`` and at
``b = 0``. The test split is read once per reported ``b`` and never chooses anything. Evaluation
noise is keyed by history (``eval_seed``), so every ``b`` ranks the same generated vectors.
``--guidance-weights`` does the same for ``w`` in ``(1 + w) f(x, h) - w f(x, ∅)`` (sampling only;
the same noise for every ``w``), testing the chosen ``w`` and the checkpoint's own. Writes
``<out-dir>/<name>.json`` and ``.md`` atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl

from baselines.dreamrec import DreamRec
from benchmark.perf.common import checkpoint_parser, environment, parse_checkpoint_args, write_report
from benchmark.registry import instantiate_data
from benchmark.run import load_profile

DEFAULT_PRIORS = (0.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0)
Knob = Literal["popularity_prior", "guidance_weight"]


def evaluate(
    checkpoint: Path, dataset: str, profile_name: str, values: Sequence[float], knob: Knob = "popularity_prior"
) -> dict[str, Any]:
    """Validation NDCG@10 per value of ``knob``; test metrics at the best one and at the reference
    value (prior 0; the checkpoint's own guidance weight)."""
    # weights_only: a checkpoint from elsewhere must never run code; ours holds only plain types.
    model = DreamRec.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    data = instantiate_data(dataset, val_subset=load_profile(profile_name).val_subset)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )

    reference = 0.0 if knob == "popularity_prior" else model.guidance_weight

    def with_value(value: float) -> DreamRec:
        if knob == "popularity_prior":
            model.popularity_prior = value
        else:
            model.guidance_weight = value
        model.clear_sampling_cache()  # the index holds the prior's bias
        return model

    validation = {
        value: trainer.validate(with_value(value), datamodule=data, verbose=False)[0]["val/ndcg@10"] for value in values
    }
    chosen = max(validation, key=validation.__getitem__)
    test = {
        value: trainer.test(with_value(value), datamodule=data, verbose=False)[0]
        for value in dict.fromkeys([reference, chosen])
    }
    return {"knob": knob, "val_ndcg@10": validation, "chosen": chosen, "test": test}


def _markdown(payload: dict[str, Any]) -> str:
    result, env = payload["result"], payload["environment"]
    knob = result["knob"]
    lines = [
        f"# DreamRec {knob} on one checkpoint: {payload['dataset']}",
        "",
        f"Checkpoint `{payload['checkpoint']}`; validation on the {payload['profile']} profile's subset; "
        f"{env['device']}, commit {env['git_commit']}, {env['date']}.",
        "",
        f"| {knob} | val NDCG@10 |",
        "|---|---|",
        *(f"| {value:g} | {ndcg:.4f} |" for value, ndcg in result["val_ndcg@10"].items()),
        "",
        f"Chosen on validation: {result['chosen']:g}.",
        "",
        f"| {knob} | test NDCG@10 | test Recall@10 | test NDCG@10 (history excluded) |",
        "|---|---|---|---|",
        *(
            f"| {value:g} | {m['test/ndcg@10']:.4f} | {m['test/recall@10']:.4f} | {m['test/ndcg@10_excl']:.4f} |"
            for value, m in result["test"].items()
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = checkpoint_parser(__doc__, "dreamrec_prior")
    sweep = parser.add_mutually_exclusive_group()
    sweep.add_argument("--priors", type=float, nargs="+", default=list(DEFAULT_PRIORS))
    sweep.add_argument("--guidance-weights", type=float, nargs="+", default=None, help="sweep w instead of the prior")
    args = parse_checkpoint_args(parser, argv)
    knob: Knob = "popularity_prior" if args.guidance_weights is None else "guidance_weight"
    values = args.priors if args.guidance_weights is None else args.guidance_weights
    if knob == "popularity_prior" and min(values) < 0:
        parser.error(f"priors must be >= 0, got {values}")
    payload = {
        "checkpoint": str(args.checkpoint),
        "dataset": args.dataset,
        "profile": args.profile,
        "environment": environment(),
        "result": evaluate(args.checkpoint, args.dataset, args.profile, values, knob),
    }
    default_name = "dreamrec_prior" if knob == "popularity_prior" else "dreamrec_guidance"
    write_report(args.out_dir, args.name or f"{default_name}_{args.dataset}", payload, _markdown(payload))
    print(_markdown(payload))
    return payload


if __name__ == "__main__":
    main()
