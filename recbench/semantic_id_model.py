"""`SemanticIDModel`: the one semantic-ID lifecycle of every model that decodes items as codes.

TIGER-style and DiffGRM differ in how their IDs are fitted (residual k-means + collision digit,
parallel PQ), not in what happens to them afterwards, so the afterwards lives here once:

1. **fit** in ``setup`` from the trainer's datamodule, on training items only, through the
   subclass's :meth:`SemanticIDModel.build_semantic_ids` (which reads the on-disk caches of
   :mod:`recbench.item_side`). Under DDP only rank 0 fits and broadcasts, so every rank decodes
   with the same IDs even where a fit is not bit-reproducible (ARPACK, threads);
2. **store** the codes ``(N + 1, n)``, the effective codes per digit ``(n,)`` and the order of
   items that share an ID ``(N + 1,)`` as persistent buffers (``sid_codes``,
   ``sid_codebook_sizes``, ``sid_item_rank``), so a checkpoint decodes without the data or the
   cache, and the provenance strings (embedding source, scheme, fallbacks) in the checkpoint;
3. **reload**: a checkpoint's buffers win over a new fit (``setup`` fits only when the buffers are
   empty); the lookup tables (:class:`~recbench.semantic_ids.SemanticIDs`) are rebuilt lazily
   after a load or a device move.

The codebook sizes are also kept as a Python tuple, so training and decoding steps never read a
device tensor to learn them (no host-device synchronisation on GPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from recbench.batch import PAD_ID
from recbench.data import SeqRecDataModule
from recbench.item_side import ItemOrder, codebook_size_for, item_embeddings_for
from recbench.metrics import DEFAULT_KS
from recbench.model import SeqRecModel
from recbench.semantic_ids import PAD_CODE, SemanticIDs
from recbench.text import ItemEmbeddings

_CHECKPOINT_KEY = "semantic_id_provenance"

EmbeddingSource = Literal["text", "collaborative"]


def _forget_lookup_after_load(module: nn.Module, incompatible_keys: object) -> None:
    """``load_state_dict`` post-hook: the buffers may hold other IDs now."""
    if isinstance(module, SemanticIDModel):
        module._forget_lookup()


class SemanticIDModel(SeqRecModel):
    """Base of the semantic-ID models; subclasses implement :meth:`build_semantic_ids`.

    Args:
        num_items, max_len, lr, weight_decay, ks: see :class:`~recbench.model.SeqRecModel`.
        n_digits: digits per ID (collision digit included).
        codebook_size: the configured codes per digit; the vocabulary is sized by it, so parameter
            shapes never depend on the data (a small-data fallback uses only the first codes).
        collision_digit: whether the last digit only separates items that share the others.
        item_order: order of the items that share an ID (:func:`~recbench.item_side.semantic_ids_for`):
            ``popularity`` (training occurrences) or ``item_id``; for ``build_semantic_ids``.
    """

    def __init__(
        self,
        num_items: int,
        max_len: int,
        lr: float,
        weight_decay: float,
        ks: Sequence[int] = DEFAULT_KS,
        *,
        n_digits: int,
        codebook_size: int,
        collision_digit: bool,
        item_order: ItemOrder = "popularity",
    ) -> None:
        super().__init__(num_items, max_len, lr, weight_decay, ks)
        self.n_digits, self.codebook_size, self.collision_digit = n_digits, codebook_size, collision_digit
        self.item_order: ItemOrder = item_order
        self.register_buffer("sid_codes", torch.full((num_items + 1, n_digits), PAD_CODE, dtype=torch.long))
        self.register_buffer("sid_codebook_sizes", torch.zeros(n_digits, dtype=torch.long))  # 0 = not set
        # The order of items that share an ID (SemanticIDs.item_rank); item id order until set.
        self.register_buffer("sid_item_rank", torch.arange(num_items + 1))
        self.item_side_info: dict[str, Any] = {}
        self._sids: SemanticIDs | None = None
        self._sizes: tuple[int, ...] | None = None  # host copy of sid_codebook_sizes; None = not read yet
        self.register_load_state_dict_post_hook(_forget_lookup_after_load)

    # ------------------------------------------------------------------ the subclass's part
    def build_semantic_ids(self, datamodule: SeqRecDataModule) -> tuple[SemanticIDs, dict[str, Any]]:
        """Fit (or read from the cache) the IDs of ``datamodule``'s items; return them with their
        provenance (plain values for ``run_notes``)."""
        raise NotImplementedError

    def item_side_inputs(
        self, datamodule: SeqRecDataModule, source: EmbeddingSource, encoder: str, collaborative_dim: int
    ) -> tuple[ItemEmbeddings, int, int, dict[str, Any]]:
        """What every fit starts from: the items' embeddings (cached on disk), the number of training
        items, the codes per digit they support (the configured size, or the small-data fallback) and
        the provenance notes (embedding source, fallback)."""
        embeddings = item_embeddings_for(
            datamodule, source=source, encoder=encoder, collaborative_dim=collaborative_dim, show_progress=False
        )
        n_train = int(datamodule.train_item_mask().sum())
        size, fallback = codebook_size_for(self.codebook_size, n_train, type(self).__name__)
        return embeddings, n_train, size, {"embedding_source": embeddings.source, "codebook_fallback": fallback or None}

    def check_semantic_ids(self, sids: SemanticIDs) -> None:
        """Model-specific requirements on IDs about to be installed (raise ``ValueError``)."""

    # ------------------------------------------------------------------ lifecycle
    def _forget_lookup(self) -> None:
        self._sids, self._sizes = None, None

    @property
    def active_codebook_sizes(self) -> tuple[int, ...]:
        """Codes per digit actually used (the configured size, or the small-data fallback); all 0
        while no IDs are installed. Read from the buffer once after a load, then kept on the host."""
        if self._sizes is None:
            self._sizes = tuple(int(size) for size in self.sid_codebook_sizes.tolist())
        return self._sizes

    @property
    def has_semantic_ids(self) -> bool:
        """Whether the buffers hold item IDs (set in setup, by set_semantic_ids or a checkpoint)."""
        return all(size > 0 for size in self.active_codebook_sizes)

    def require_semantic_ids(self) -> None:
        if not self.has_semantic_ids:
            raise RuntimeError(
                f"{type(self).__name__} has no semantic IDs yet: fit or test it through a SeqRecDataModule, "
                "load a checkpoint that has them, or call set_semantic_ids(...)"
            )

    def shared_id_keys(self) -> torch.Tensor | None:
        """Each item's ID key (see :meth:`SeqRecModel.shared_id_keys`), or None when no two items
        share an ID (e.g. with a collision digit) or no IDs are installed yet."""
        if not self.has_semantic_ids:
            return None
        unique, inverse = torch.unique(self.sid_codes[1:], dim=0, return_inverse=True)  # over items 1..N
        if len(unique) == self.num_items:
            return None
        return torch.cat([inverse.new_zeros(1), inverse + 1])  # (N + 1,): PAD -> 0

    def set_semantic_ids(self, sids: SemanticIDs, info: dict[str, Any] | None = None) -> None:
        """Install ``sids`` as the items' IDs (fills the buffers); ``info`` = provenance for run_notes."""
        if sids.num_items != self.num_items or sids.n_digits != self.n_digits:
            raise ValueError(
                f"semantic IDs for {sids.num_items} items x {sids.n_digits} digits; the model has "
                f"{self.num_items} items x {self.n_digits} digits"
            )
        if max(sids.codebook_sizes) > self.codebook_size:
            raise ValueError(f"codebook sizes {sids.codebook_sizes} exceed the vocabulary's {self.codebook_size}")
        self.check_semantic_ids(sids)
        with torch.no_grad():
            self.sid_codes.copy_(sids.codes.to(self.sid_codes.device))
            self.sid_codes[PAD_ID] = PAD_CODE
            self.sid_codebook_sizes.copy_(torch.tensor(sids.codebook_sizes))
            self.sid_item_rank.copy_(sids.item_rank.to(self.sid_item_rank.device))
        self.item_side_info = {"embedding_source": "given", **(info or {}), "scheme": sids.scheme}
        self._sids = sids.to(self.sid_codes.device)
        self._sizes = tuple(sids.codebook_sizes)

    @property
    def semantic_ids(self) -> SemanticIDs:
        """The lookup tables over the buffers, rebuilt after a checkpoint load or a device move."""
        self.require_semantic_ids()
        if self._sids is None or self._sids.device != self.sid_codes.device:
            self._sids = SemanticIDs(
                self.sid_codes,
                self.active_codebook_sizes,
                self.item_side_info.get("scheme", "from checkpoint buffers"),
                collision_digit=self.collision_digit,
                item_rank=self.sid_item_rank,
            )
        return self._sids

    def setup(self, stage: str) -> None:
        """Fit the IDs unless the buffers hold them (a second fit/test, or a checkpoint: its codes win)."""
        trainer = self.trainer
        distributed = trainer.world_size > 1
        if not self.has_semantic_ids and (not distributed or trainer.is_global_zero):
            datamodule = trainer.datamodule
            if not isinstance(datamodule, SeqRecDataModule):
                raise TypeError(
                    f"{type(self).__name__} builds its semantic IDs from a SeqRecDataModule in setup(); pass "
                    "datamodule=... to the trainer, load a checkpoint that has them, or call set_semantic_ids(...)"
                )
            self.set_semantic_ids(*self.build_semantic_ids(datamodule))
        if distributed:
            codes, sizes, rank, info = trainer.strategy.broadcast(
                (self.sid_codes.cpu(), self.active_codebook_sizes, self.sid_item_rank.cpu(), dict(self.item_side_info)),
                src=0,
            )
            scheme = str(info.get("scheme", "broadcast from rank 0"))
            sids = SemanticIDs(codes, tuple(sizes), scheme, collision_digit=self.collision_digit, item_rank=rank)
            self.set_semantic_ids(sids, info)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_CHECKPOINT_KEY] = dict(self.item_side_info)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        info = checkpoint.get(_CHECKPOINT_KEY)
        if isinstance(info, dict):
            self.item_side_info = dict(info)
        self._forget_lookup()  # the state dict is loaded after this hook; the post-hook forgets again
