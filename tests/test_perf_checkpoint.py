"""Issue 15, item 9: the DiffGRM speed script loads a checkpoint without unpickling code."""

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
