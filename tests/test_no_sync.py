"""No host-device synchronisation inside a training step or a decoding step (issue 13, GPU hot path).

On CPU the proof runs on the ``meta`` device: a meta tensor has a shape and a dtype but no values,
so every operation whose result depends on values on the host (``.item()``, ``bool(t)``,
``int(t)``, ``.tolist()``, ``nonzero``, boolean-mask indexing, ``unique``) raises there, while
shape-only work (embeddings, matmuls, attention, ``where``, ``topk``, random draws) runs. A model
whose step runs on meta therefore reads nothing back from the device in that step; on a GPU the
same step would not synchronise. The models take the device's branch (``device.type != "cpu"``),
so this checks the GPU path. With CUDA, :func:`test_steps_do_not_synchronise_on_cuda` checks the
same with ``torch.cuda.set_sync_debug_mode("error")``.

Each semantic-ID model adds itself to :data:`STEP_CHECKS` with its own tiny set-up.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import lightning.pytorch as pl
import pytest
import torch
from conftest import install_counting_ids, quiet_trainer

from baselines.dreamrec import DreamRec
from benchmark.registry import instantiate_model
from recbench.batch import HISTORY, PAD_ID, SEQUENCE, TARGET, USER, Batch
from recbench.model import SeqRecModel
from recbench.semantic_id_model import SemanticIDModel
from recbench.semantic_ids import SemanticIDs

NUM_ITEMS, MAX_LEN, BATCH = 40, 8, 6


def _left_padded(rows: int, width: int, generator: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, width + 1, (rows,), generator=generator)
    items = torch.randint(1, NUM_ITEMS + 1, (rows, width), generator=generator)
    real = torch.arange(width).unsqueeze(0) >= (width - lengths).unsqueeze(1)
    return torch.where(real, items, torch.full_like(items, PAD_ID))


def _batch(model: SeqRecModel) -> Batch:
    generator = torch.Generator().manual_seed(0)
    if model.training_view == "sequence":
        sequence = _left_padded(BATCH, MAX_LEN + 1, generator)
        sequence[:, -2:] = torch.randint(1, NUM_ITEMS + 1, (BATCH, 2), generator=generator)  # >= 1 target
        return {SEQUENCE: sequence, USER: torch.arange(BATCH)}
    history = _left_padded(BATCH, MAX_LEN, generator)
    return {HISTORY: history, TARGET: torch.randint(1, NUM_ITEMS + 1, (BATCH,), generator=generator), USER: torch.arange(BATCH)}


SMALL: dict[str, dict[str, object]] = {
    "sasrec": {"hidden_size": 16},
    "sasrec_bce1": {"hidden_size": 16},
    "dreamrec": {"hidden_size": 16, "timesteps": 5},
    "dreamrec_rank": {"hidden_size": 16, "timesteps": 5},
    "diffgrm": {"hidden_size": 16, "num_heads": 2, "inner_size": 32, "codebook_size": 8},
}


def _small(name: str) -> SeqRecModel:
    return instantiate_model(name, NUM_ITEMS, MAX_LEN, **SMALL.get(name, {}))


def _decode(model: SeqRecModel, history: torch.Tensor) -> torch.Tensor:
    """A decoding step. DreamRec's on meta: its T-step sampler; its nearest-item index is built once
    per evaluation (that build reads the allowed-item mask back), then searched by matmul + top-k."""
    if isinstance(model, DreamRec) and history.device.type == "meta":
        return model.generate(history)
    return model.recommend(history, 5)


def _lookup_on(sids: SemanticIDs, device: torch.device) -> SemanticIDs:
    """The lookup tables' tensors on ``device`` (building them reads codes on the host, which a meta
    tensor cannot; they are built once per evaluation, not in a step)."""
    moved = copy.copy(sids)
    for name, value in vars(sids).items():
        if isinstance(value, torch.Tensor):
            setattr(moved, name, value.to(device))
    return moved


def _on(device: torch.device, model: SeqRecModel) -> Batch:
    """The model's batch on ``device``: the loader's copy, which happens before a step starts."""
    return {key: value.to(device) for key, value in _batch(model).items()}


def _run_step(model: SeqRecModel, batch: Batch) -> None:
    """One training step (loss + backward) and one decoding step on the batch's device."""
    device = next(iter(batch.values())).device
    lookup = model.semantic_ids if isinstance(model, SemanticIDModel) else None
    model.to(device)
    if lookup is not None and device.type == "meta":
        model._sids = _lookup_on(lookup, device)
    _train_step(model, batch)
    _decode_step(model, batch)


def _train_step(model: SeqRecModel, batch: Batch) -> None:
    model.train()
    model.loss(batch).backward()


def _decode_step(model: SeqRecModel, batch: Batch) -> None:
    model.eval()
    history = batch[SEQUENCE][:, :-1] if SEQUENCE in batch else batch[HISTORY]
    assert _decode(model, history).shape[0] == BATCH


@contextlib.contextmanager
def _sync_is_an_error() -> Iterator[None]:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


#: model config -> how to prepare it before the step (semantic-ID models install hand-made IDs).
STEP_CHECKS: dict[str, Callable[[SeqRecModel], None]] = {
    "sasrec": lambda model: None,
    "sasrec_bce1": lambda model: None,
    "dreamrec": lambda model: model.set_train_items(torch.ones(NUM_ITEMS + 1, dtype=torch.bool)),
    "dreamrec_rank": lambda model: model.set_train_items(torch.ones(NUM_ITEMS + 1, dtype=torch.bool)),
    # Hand-made IDs (4 digits x 8 codes); DiffGRM's own test also covers its other maskings.
    "diffgrm": lambda model: model.set_semantic_ids(
        SemanticIDs(torch.randint(0, 8, (NUM_ITEMS + 1, 4), generator=torch.Generator().manual_seed(0)), (8,) * 4, "hand-made")
    ),
}


@pytest.mark.parametrize("name", sorted(STEP_CHECKS))
def test_training_and_decoding_steps_read_nothing_back_from_the_device(name: str) -> None:
    model = _small(name)
    STEP_CHECKS[name](model)
    _run_step(model, _on(torch.device("meta"), model))


def test_the_meta_check_can_fail() -> None:
    """A step that reads a value back (here ``.item()``) raises on meta: the check has teeth."""
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.ones(3, device="meta").sum().item()
    with pytest.raises((RuntimeError, NotImplementedError)):
        x = torch.ones(3, device="meta")
        x[x > 0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(STEP_CHECKS))
def test_steps_do_not_synchronise_on_cuda(name: str) -> None:
    model = _small(name)
    STEP_CHECKS[name](model)
    batch = _on(torch.device("cuda"), model)
    _run_step(model, batch)  # warm-up: lazy tables, cuBLAS handles
    with _sync_is_an_error():
        _train_step(model, batch)
    if isinstance(model, DreamRec):
        model.item_index()  # once per evaluation, not per step: it reads the allowed-item mask back
    with _sync_is_an_error():
        _decode_step(model, batch)


class _CountReadBacks(pl.Callback):
    """Counts ``Tensor.item`` calls from the end of the second training batch to the end of the
    training steps of a CPU fit: on CUDA each one waits for the device (Lightning turns progress-bar
    values into numbers with it), so this is the CPU stand-in of test_gpu's sync-debug window."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.read_backs = 0
        self._monkeypatch = monkeypatch
        self._item = torch.Tensor.item

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:  # type: ignore[no-untyped-def]
        if batch_idx == 1:
            def counting_item(tensor: torch.Tensor):  # type: ignore[no-untyped-def]
                self.read_backs += 1
                return self._item(tensor)

            self._monkeypatch.setattr(torch.Tensor, "item", counting_item)

    def on_train_epoch_end(self, trainer, module) -> None:  # type: ignore[no-untyped-def]
        self._monkeypatch.setattr(torch.Tensor, "item", self._item)


@pytest.mark.parametrize("name", ["sasrec", "diffgrm"])
def test_bf16_fit_steps_read_nothing_back_and_clip_with_the_fused_optimiser(
    name: str, tiny_data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bf16-mixed fit (the paper profile's precision) with the fused AdamW: DiffGRM clips gradients
    (Lightning refuses that for a fused optimiser unless recbench clips them itself), and no step
    after the second reads a value back for the progress bar."""
    model = instantiate_model(name, tiny_data.num_items, tiny_data.max_len, **SMALL.get(name, {}))
    install_counting_ids(model, tiny_data.num_items)
    window = _CountReadBacks(monkeypatch)
    trainer = quiet_trainer(precision="bf16-mixed", limit_train_batches=5, limit_val_batches=0, log_every_n_steps=1000,
                            callbacks=[window])
    trainer.fit(model, datamodule=tiny_data)
    assert trainer.global_step == 5
    assert window.read_backs == 0
    assert trainer.progress_bar_metrics["train/loss_epoch"] > 0
