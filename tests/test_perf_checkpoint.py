"""Perf scripts load checkpoints without unpickling code (issue 15, item 9); decode_variants and dreamrec_prior work."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from benchmark.perf import diffgrm_speed


class _Payload:
    """Unpickling this object runs ``Path.touch`` on ``marker``: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_diffgrm_speed_never_unpickles_code_from_a_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _Payload(marker)}}, checkpoint)
    with pytest.raises(pickle.UnpicklingError):
        diffgrm_speed.main(["--dataset", "synthetic_tiny", "--checkpoint", str(checkpoint), "--out", str(tmp_path)])
    assert not marker.exists(), "loading the checkpoint executed code from it"


def test_decode_variants_never_unpickles_code_from_a_checkpoint(tmp_path: Path) -> None:
    from benchmark.perf import decode_variants

    marker = tmp_path / "ran"
    checkpoint = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _Payload(marker)}}, checkpoint)
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do, as long as nothing ran
        decode_variants.main(["--dataset", "synthetic_tiny", "--checkpoint", str(checkpoint), "--out-dir", str(tmp_path)])
    assert not marker.exists(), "loading the checkpoint executed code from it"


def _tiny_checkpoint(tmp_path: Path, config: str, **init_args: object) -> Path:
    """A model config fitted for two batches of synthetic_tiny (seed 0), saved as a checkpoint."""
    import lightning.pytorch as pl

    from benchmark.registry import instantiate_data, instantiate_model

    pl.seed_everything(0)
    data = instantiate_data("synthetic_tiny")
    model = instantiate_model(config, data.num_items, data.max_len, **init_args)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    checkpoint = tmp_path / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    return checkpoint


def test_decode_variants_compares_item_orders_and_beams_on_one_checkpoint(tmp_path: Path) -> None:
    from benchmark.perf import decode_variants

    checkpoint = _tiny_checkpoint(tmp_path, "diffgrm", hidden_size=16, embedding_source="collaborative")
    payload = decode_variants.main(["--dataset", "synthetic_tiny", "--checkpoint", str(checkpoint), "--beams", "20", "24",
                                    "--profile", "smoke", "--out-dir", str(tmp_path), "--name", "report"])
    variants = list(payload["results"])
    assert variants[0].startswith("as stored (item_order=training popularity)") and variants[1:] == [
        "item_order=item id", "beam=20", "beam=24"]
    assert all("val/ndcg@10" in metrics for metrics in payload["results"].values())
    assert (tmp_path / "report.json").exists() and "| beam=24 |" in (tmp_path / "report.md").read_text()


def test_dreamrec_prior_chooses_on_validation_and_tests_the_choice_and_zero(tmp_path: Path) -> None:
    from benchmark.perf import dreamrec_prior

    checkpoint = _tiny_checkpoint(tmp_path, "dreamrec", timesteps=10)
    payload = dreamrec_prior.main(["--dataset", "synthetic_tiny", "--checkpoint", str(checkpoint), "--priors", "0", "2",
                                   "1000", "--profile", "smoke", "--out-dir", str(tmp_path), "--name", "report"])
    result = payload["result"]
    validation = result["val_ndcg@10"]
    assert list(validation) == [0.0, 2.0, 1000.0] and result["chosen"] == max(validation, key=validation.get)
    assert validation[1000.0] != validation[0.0], "the prior changes the ranking"
    assert set(result["test"]) == {0.0, result["chosen"]}
    assert "Chosen on validation" in (tmp_path / "report.md").read_text()
    payload = dreamrec_prior.main(["--dataset", "synthetic_tiny", "--checkpoint", str(checkpoint), "--guidance-weights",
                                   "0", "2", "50", "--profile", "smoke", "--out-dir", str(tmp_path), "--name", "w"])
    result = payload["result"]
    assert result["knob"] == "guidance_weight" and list(result["val_ndcg@10"]) == [0.0, 2.0, 50.0]
    assert set(result["test"]) == {2.0, result["chosen"]}, "the checkpoint's own w (2) and the chosen one"
    assert result["val_ndcg@10"][50.0] != result["val_ndcg@10"][0.0], "w changes the samples"
    assert "| guidance_weight | val NDCG@10 |" in (tmp_path / "w.md").read_text()
