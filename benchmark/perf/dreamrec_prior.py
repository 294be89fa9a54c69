"""DreamRec's retrieval popularity prior measured on ONE trained checkpoint (same weights, same noise).

    python -m benchmark.perf.dreamrec_prior --checkpoint runs/bench/<run>/checkpoints/best.ckpt \
        --dataset steam [--priors 0 4 8 16 32 64] [--profile quick] [--out-dir results/perf/recipe_checks]

``popularity_prior`` only changes retrieval (``x0 · E[j] + b log(1 + n_j)``), not training, so its
effect is measured exactly on a stored checkpoint: validation NDCG@10 (the profile's seeded subset)
for each ``b``, the ``b`` with the best validation chosen, then the test metrics at that ``b`` and at
``b = 0``. The test split is read once per reported ``b`` and never chooses anything. Evaluation
noise is keyed by history (``eval_seed``), so every ``b`` ranks the same generated vectors. Writes
``<out-dir>/<name>.json`` and ``.md`` atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from baselines.dreamrec import DreamRec
from benchmark.perf.common import checkpoint_parser, environment, parse_checkpoint_args, write_report
from benchmark.registry import instantiate_data
from benchmark.run import load_profile

DEFAULT_PRIORS = (0.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0)


def evaluate(checkpoint: Path, dataset: str, profile_name: str, priors: Sequence[float]) -> dict[str, Any]:
    # weights_only: a checkpoint from elsewhere must never run code; ours holds only plain types.
    model = DreamRec.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    data = instantiate_data(dataset, val_subset=load_profile(profile_name).val_subset)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )

    def with_prior(prior: float) -> DreamRec:
        model.popularity_prior = prior
        model.clear_sampling_cache()  # the index holds the bias
        return model

    validation = {
        prior: trainer.validate(with_prior(prior), datamodule=data, verbose=False)[0]["val/ndcg@10"] for prior in priors
    }
    chosen = max(validation, key=validation.__getitem__)
    test = {prior: trainer.test(with_prior(prior), datamodule=data, verbose=False)[0] for prior in dict.fromkeys([0.0, chosen])}
    return {"val_ndcg@10": validation, "chosen_prior": chosen, "test": test}


def _markdown(payload: dict[str, Any]) -> str:
    result, env = payload["result"], payload["environment"]
    lines = [
        f"# DreamRec popularity prior on one checkpoint: {payload['dataset']}",
        "",
        f"Checkpoint `{payload['checkpoint']}`; validation on the {payload['profile']} profile's subset; "
        f"{env['device']}, commit {env['git_commit']}, {env['date']}.",
        "",
        "| popularity_prior | val NDCG@10 |",
        "|---|---|",
        *(f"| {prior:g} | {value:.4f} |" for prior, value in result["val_ndcg@10"].items()),
        "",
        f"Chosen on validation: {result['chosen_prior']:g}.",
        "",
        "| popularity_prior | test NDCG@10 | test Recall@10 | test NDCG@10 (history excluded) |",
        "|---|---|---|---|",
        *(
            f"| {prior:g} | {m['test/ndcg@10']:.4f} | {m['test/recall@10']:.4f} | {m['test/ndcg@10_excl']:.4f} |"
            for prior, m in result["test"].items()
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = checkpoint_parser(__doc__, "dreamrec_prior")
    parser.add_argument("--priors", type=float, nargs="+", default=list(DEFAULT_PRIORS))
    args = parse_checkpoint_args(parser, argv)
    if min(args.priors) < 0:
        parser.error(f"priors must be >= 0, got {args.priors}")
    payload = {
        "checkpoint": str(args.checkpoint),
        "dataset": args.dataset,
        "profile": args.profile,
        "environment": environment(),
        "result": evaluate(args.checkpoint, args.dataset, args.profile, args.priors),
    }
    write_report(args.out_dir, args.name or f"dreamrec_prior_{args.dataset}", payload, _markdown(payload))
    print(_markdown(payload))
    return payload


if __name__ == "__main__":
    main()
