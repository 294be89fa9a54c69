"""Validation metrics of ONE trained semantic-ID checkpoint under decoding variants (same weights).

    python -m benchmark.perf.decode_variants --checkpoint runs/bench/<run>/checkpoints/best.ckpt \
        --dataset beauty [--beams 16 20] [--merge-duplicate-beams] [--profile quick] \
        [--out-dir results/perf/recipe_checks] [--name NAME]

A decode-time choice (the beam width, the order in which a decoded ID expands to the items that
share it) does not change training, so its effect is measured exactly on one checkpoint: validate
it as stored, with items of a shared ID ordered by item id instead of by the stored order, and at
each ``--beams`` width (DiffGRM's ``val_beam``; TIGER's ``beam_size``), and with
``--merge-duplicate-beams`` (DiffGRM) once more at every one of those widths with beams that reach
the same partial ID through different fill orders merged. Validation uses the
profile's seeded subset. Writes ``<out-dir>/<name>.json`` and ``.md`` atomically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from benchmark.perf.common import checkpoint_parser, environment, parse_checkpoint_args, write_report
from benchmark.registry import instantiate_data
from benchmark.run import load_profile
from recbench.semantic_id_model import SemanticIDModel

_SHOWN = ("val/ndcg@10", "val/recall@10", "val/ndcg@20", "val/recall@20", "val/invalid_id_rate")


def _beam_attribute(model: SemanticIDModel) -> str:
    """The attribute that holds the validation beam width: DiffGRM's ``val_beam``, TIGER's ``beam_size``."""
    for name in ("val_beam", "beam_size"):
        if hasattr(model, name):
            return name
    raise ValueError(f"{type(model).__name__} has no validation beam to set")


def evaluate(
    checkpoint: Path, dataset: str, profile_name: str, beams: Sequence[int], merge_duplicate_beams: bool = False
) -> dict[str, Any]:
    """``{variant: validation metrics}`` for the stored checkpoint, the item-id order and each beam
    (then each beam again with duplicate beams merged, if asked)."""
    model_class = _model_class(checkpoint)
    # weights_only: a checkpoint from elsewhere must never run code; ours holds only plain types.
    model = model_class.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(model, SemanticIDModel):
        raise ValueError(f"{checkpoint}: {type(model).__name__} is not a semantic-ID model")
    if merge_duplicate_beams and not hasattr(model, "merge_duplicate_beams"):  # before minutes of validation
        raise ValueError(f"{type(model).__name__} has no merge_duplicate_beams option")
    beam_attribute = _beam_attribute(model)
    data = instantiate_data(dataset, val_subset=load_profile(profile_name).val_subset)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    results: dict[str, Any] = {}
    stored = model.semantic_ids
    results[f"as stored ({stored.scheme.rsplit(',', 1)[-1]})"] = trainer.validate(model, datamodule=data, verbose=False)[0]
    model.set_semantic_ids(stored.ordered_by(torch.arange(model.num_items + 1), "item id"), model.item_side_info)
    results["item_order=item id"] = trainer.validate(model, datamodule=data, verbose=False)[0]
    model.set_semantic_ids(stored, model.item_side_info)
    stored_beam = getattr(model, beam_attribute)
    for beam in beams:
        setattr(model, beam_attribute, beam)
        results[f"beam={beam}"] = trainer.validate(model, datamodule=data, verbose=False)[0]
    if merge_duplicate_beams:
        model.merge_duplicate_beams = True
        for beam in [stored_beam, *beams]:
            setattr(model, beam_attribute, beam)
            results[f"beam={beam}, duplicates merged"] = trainer.validate(model, datamodule=data, verbose=False)[0]
    return results


def _model_class(checkpoint: Path) -> type[SemanticIDModel]:
    """TIGER or DiffGRM, told apart by the checkpoint's parameter names."""
    from baselines.diffgrm import DiffGRM
    from baselines.tiger import TIGER

    keys = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return TIGER if any(key.startswith("network.") for key in keys) else DiffGRM


def _markdown(payload: dict[str, Any]) -> str:
    lines = [
        f"# Decoding variants of one checkpoint on {payload['dataset']}",
        "",
        f"Checkpoint `{payload['checkpoint']}`, profile {payload['profile']} validation subset, "
        f"{payload['environment']['device']}, commit {payload['environment']['git_commit']}, {payload['environment']['date']}.",
        "",
        "| variant | " + " | ".join(_SHOWN) + " |",
        "|---|" + "---|" * len(_SHOWN),
    ]
    for variant, metrics in payload["results"].items():
        values = [f"{metrics[m]:.4f}" if m in metrics else "–" for m in _SHOWN]
        lines.append(f"| {variant} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = checkpoint_parser(__doc__, "decode_variants")
    parser.add_argument("--beams", type=int, nargs="*", default=[], help="validation beam widths to try")
    parser.add_argument(
        "--merge-duplicate-beams",
        action="store_true",
        help="also validate every width with duplicate partial beams merged (DiffGRM)",
    )
    args = parse_checkpoint_args(parser, argv)
    payload = {
        "checkpoint": str(args.checkpoint),
        "dataset": args.dataset,
        "profile": args.profile,
        "environment": environment(),
        "results": evaluate(args.checkpoint, args.dataset, args.profile, args.beams, args.merge_duplicate_beams),
    }
    write_report(args.out_dir, args.name or f"decode_variants_{args.dataset}", payload, _markdown(payload))
    print(json.dumps(payload["results"], indent=1))
    return payload


if __name__ == "__main__":
    main()
