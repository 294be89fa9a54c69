"""Semantic-ID tokenizers and the vectorised lookups that generative decoders need.

An item's semantic ID (SID) is a tuple of ``n_digits`` small integers ("codes"); digit ``d`` takes
values ``0 .. codebook_sizes[d] - 1``. Two tokenizers build them from an item-embedding table
(``recbench.text``), each fitted on **training items only** (items that appear in training
sequences) and then applied to all items 1..N:

* :func:`fit_residual_kmeans` - TIGER-style residual k-means (3 x 256), plus an optional
  collision digit that makes every ID unique (TIGER, arXiv 2305.05065);
* :func:`fit_parallel_pq` - DiffGRM's parallel semantic encoding: PCA + whitening, L2, OPQ, PQ
  into independent sub-spaces (DiffGRM). Collisions are not resolved by default; they are
  expanded into all colliding items at decode time (:meth:`SemanticIDs.expand_to_items`).

TIGER's original RQ-VAE tokenizer was removed (issue 13): no config used it, no row showed it, and
residual k-means gives the same kind of ID (one unique ID per item with the collision digit) at a
fraction of the cost; ``git show bb43126:recbench/semantic_ids.py`` has the last version.

:class:`SemanticIDs` holds the codes and precomputed lookup tables as plain tensors (a model
registers them as buffers, so they follow it to the GPU and into checkpoints), and provides the
decode-time operations, all vectorised torch with no Python loop over users or beams:

* packing a code tuple into one int64 **key** (mixed radix, digit 0 most significant:
  ``key = sum_d c_d * prod(codebook_sizes[d+1:])``). Digit 0 most significant means that sorting
  keys sorts IDs lexicographically and that the key of the first ``l`` digits is
  ``key // prod(codebook_sizes[l:])``. The PAD / invalid key is ``-1``;
* key -> item(s) through a sorted key table and ``torch.searchsorted``;
* ranked keys -> the top-k distinct items (invalid dropped, duplicates dropped, colliding keys
  expanded to all their items in the IDs' item order: ascending item id, or a rank such as
  training popularity set by :meth:`SemanticIDs.ordered_by`);
* per-level prefix masks for constrained beam search: which next codes lead to a real item.

Row 0 of every per-item table is PAD: its codes are all ``PAD_CODE`` (-1) and its key is -1.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from recbench.text import atomic_save_tensors, load_tensors, tensor_sha256

log = logging.getLogger(__name__)

PAD_CODE = -1
"""Code of every digit of the PAD row (item 0)."""
INVALID_KEY = -1
"""Packed key of PAD and of any code tuple with an out-of-range digit."""

_CACHE_FORMAT_VERSION = 2  # bump when a fitting algorithm changes its output (2: unknown items numbered)


# --------------------------------------------------------------------------------------------
# container
# --------------------------------------------------------------------------------------------


class KeyLookup(NamedTuple):
    """Result of :meth:`SemanticIDs.items_for_keys`; every field has the shape of the keys.

    valid: the key is the ID of at least one real item.
    item: the smallest item id with that key (the only one when IDs are unique); 0 if invalid.
    count: how many items share the key; 0 if invalid.
    group: row of the key in the sorted unique-key table (meaningless where invalid).
    """

    valid: Tensor
    item: Tensor
    count: Tensor
    group: Tensor


@dataclass(frozen=True)
class PrefixTable:
    """Valid next codes after a prefix of ``level`` digits.

    prefix_keys: (P,) sorted packed keys of the prefixes of length ``level`` that real items have
        (level 0: the single empty prefix, key 0).
    next_mask: (P, K) bool, ``K = codebook_sizes[level]``; True where prefix + code is the prefix
        of at least one real item.
    """

    level: int
    prefix_keys: Tensor
    next_mask: Tensor

    def lookup(self, prefix_keys: Tensor) -> Tensor:
        """(...,) packed prefix keys -> (..., K) bool mask of allowed next codes. Prefixes that no
        item has (or key -1) get an all-False row."""
        pos = torch.searchsorted(self.prefix_keys, prefix_keys)  # (...,)
        pos_c = pos.clamp(max=self.prefix_keys.numel() - 1)
        found = (pos < self.prefix_keys.numel()) & (self.prefix_keys[pos_c] == prefix_keys)
        return self.next_mask[pos_c] & found.unsqueeze(-1)  # (..., K)


@dataclass(frozen=True)
class SemanticIDStats:
    """Quality report of a tokenizer, written into result rows.

    n_items: N (PAD excluded).
    n_unique_ids: distinct code tuples before the collision digit.
    collision_rate: share of items whose pre-collision-digit tuple is shared with another item.
    max_collision_group: size of the largest group of items sharing a tuple (1 = no collision).
    code_usage: per digit, how many of its codes are used by at least one item.
    code_entropy_bits: per digit, entropy of the code distribution over items, in bits
        (log2 of the codebook size at most).
    fit_seconds: wall seconds of the fit.
    """

    n_items: int
    n_unique_ids: int
    collision_rate: float
    max_collision_group: int
    code_usage: tuple[int, ...]
    code_entropy_bits: tuple[float, ...]
    fit_seconds: float


_DERIVED = ("item_keys", "sorted_items", "unique_keys", "group_start", "group_size")


class SemanticIDs:
    """Semantic IDs of items 0..N plus the lookup tables decoders need (all plain tensors).

    Args:
        codes: LongTensor (N+1, n_digits); row 0 (PAD) is overwritten with ``PAD_CODE``.
        codebook_sizes: codes per digit.
        scheme: description of how the IDs were made (goes into result rows).
        collision_digit: whether the last digit is a collision digit (then the IDs are unique and
            the stats measure collisions on the digits before it).
        fit_seconds: wall seconds of the fit.
        item_rank: LongTensor (N+1,), the order in which items sharing an ID are expanded (lower
            first, e.g. training popularity rank; see :meth:`ordered_by`); None = ascending item id.
    """

    def __init__(
        self,
        codes: Tensor,
        codebook_sizes: tuple[int, ...],
        scheme: str,
        collision_digit: bool = False,
        fit_seconds: float = 0.0,
        item_rank: Tensor | None = None,
    ) -> None:
        codebook_sizes = tuple(int(s) for s in codebook_sizes)
        if codes.ndim != 2 or codes.shape[1] != len(codebook_sizes) or codes.shape[0] < 2:
            raise ValueError(
                f"codes must be (N+1, {len(codebook_sizes)}) with N >= 1, got {tuple(codes.shape)}"
            )
        if math.prod(codebook_sizes) >= 2**62:
            raise ValueError(f"codebook sizes {codebook_sizes} do not fit a packed int64 key")
        codes = codes.to(torch.long).clone()
        codes[0] = PAD_CODE
        sizes_t = torch.tensor(codebook_sizes, dtype=torch.long, device=codes.device)
        bad = ((codes[1:] < 0) | (codes[1:] >= sizes_t)).any(1)
        if bad.any():
            item = int(torch.nonzero(bad)[0]) + 1
            raise ValueError(
                f"item {item} has codes {codes[item].tolist()} outside codebook sizes {codebook_sizes}"
            )
        if item_rank is None:
            item_rank = torch.arange(codes.shape[0], device=codes.device)
        elif item_rank.shape != (codes.shape[0],):
            raise ValueError(f"item_rank must be ({codes.shape[0]},), got {tuple(item_rank.shape)}")
        self._set(codes, sizes_t, scheme, collision_digit, fit_seconds, derived=None, item_rank=item_rank.to(codes))

    def ordered_by(self, item_rank: Tensor, label: str) -> SemanticIDs:
        """The same IDs with items sharing one ordered by ``item_rank`` (N+1,) (lower first) instead
        of by item id: the collision digit (if any) is renumbered in that order, and the expansion
        of a decoded ID to its items follows it. ``label`` names the order in the scheme."""
        codes = self.codes.clone()
        sizes = self.codebook_sizes
        if self.collision_digit:
            base = codes[1:, :-1].cpu()
            codes[1:, -1] = _collision_ranks(base, sizes[:-1], sizes[-1], item_rank[1:].cpu()).to(codes.device)
        return SemanticIDs(
            codes, sizes, f"{self.scheme},item_order={label}", self.collision_digit, self.fit_seconds, item_rank
        )

    # ---- construction helpers -------------------------------------------------------------

    def _set(
        self,
        codes: Tensor,
        sizes_t: Tensor,
        scheme: str,
        collision_digit: bool,
        fit_seconds: float,
        derived: dict[str, Tensor] | None,
        item_rank: Tensor,
    ) -> None:
        self.codes = codes  # (N+1, n)
        self.item_rank = item_rank  # (N+1,)
        self.codebook_sizes: tuple[int, ...] = tuple(int(s) for s in sizes_t.tolist())
        self._sizes = sizes_t  # (n,) long, on the codes' device
        self.scheme = scheme
        self.collision_digit = bool(collision_digit)
        self.fit_seconds = float(fit_seconds)
        if derived is None:
            derived = self._build_tables()
        self.item_keys: Tensor = derived["item_keys"]  # (N+1,), PAD -1
        self.sorted_items: Tensor = derived["sorted_items"]  # (N,) items ordered by (key, item_rank)
        self.unique_keys: Tensor = derived["unique_keys"]  # (U,) sorted
        self.group_start: Tensor = derived["group_start"]  # (U,) offset of the group in sorted_items
        self.group_size: Tensor = derived["group_size"]  # (U,) items per key
        self.prefix_tables: tuple[PrefixTable, ...] = tuple(
            PrefixTable(level, derived[f"prefix_keys_{level}"], derived[f"prefix_mask_{level}"])
            for level in range(self.n_digits)
        )

    def _build_tables(self) -> dict[str, Tensor]:
        codes = self.codes[1:]  # (N, n)
        n_items = codes.shape[0]
        keys = self.pack(codes)  # (N,)
        # Items in rank order, then a stable sort by key: within a key, items stay in rank order
        # (the expansion order).
        by_rank = torch.sort(self.item_rank[1:], stable=True).indices  # (N,)
        sorted_keys, within = torch.sort(keys[by_rank], stable=True)
        order = by_rank[within]
        unique_keys, group_size = torch.unique_consecutive(sorted_keys, return_counts=True)
        group_start = torch.cumsum(group_size, 0) - group_size
        out = {
            "item_keys": torch.cat([keys.new_full((1,), INVALID_KEY), keys]),
            "sorted_items": order + 1,
            "unique_keys": unique_keys,
            "group_start": group_start,
            "group_size": group_size,
        }
        for level in range(self.n_digits):
            prefix = self.pack(codes[:, :level])  # (N,) ; level 0 -> all zeros
            prefix_keys, inverse = torch.unique(prefix, sorted=True, return_inverse=True)
            mask = torch.zeros(
                prefix_keys.numel(), self.codebook_sizes[level], dtype=torch.bool, device=codes.device
            )
            mask[inverse, codes[:, level]] = True  # (P, K)
            out[f"prefix_keys_{level}"] = prefix_keys
            out[f"prefix_mask_{level}"] = mask
        assert out["sorted_items"].numel() == n_items
        return out

    # ---- basic properties -----------------------------------------------------------------

    @property
    def n_digits(self) -> int:
        return len(self.codebook_sizes)

    @property
    def num_items(self) -> int:
        return self.codes.shape[0] - 1

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def keys(self) -> Tensor:
        """(N+1,) packed key of every item; PAD -> -1."""
        return self.item_keys

    def __repr__(self) -> str:
        return f"SemanticIDs(num_items={self.num_items}, codebook_sizes={self.codebook_sizes}, scheme={self.scheme!r})"

    # ---- packing --------------------------------------------------------------------------

    def _multipliers(self, level: int) -> Tensor:
        """(level,) mixed-radix place values of the first ``level`` digits."""
        sizes = self._sizes[:level]
        mult = torch.ones(level, dtype=torch.long, device=sizes.device)
        if level > 1:
            mult[:-1] = torch.flip(torch.cumprod(torch.flip(sizes[1:], (0,)), 0), (0,))
        return mult

    def pack(self, codes: Tensor) -> Tensor:
        """(..., l) codes of the first ``l <= n_digits`` digits -> (...,) int64 keys.

        ``l = n_digits`` gives the item key; smaller ``l`` gives prefix keys (radix over the
        first ``l`` digits only). Any out-of-range digit (e.g. PAD_CODE) gives ``INVALID_KEY``.
        """
        level = codes.shape[-1]
        if level > self.n_digits:
            raise ValueError(f"codes have {level} digits, the scheme has {self.n_digits}")
        sizes = self._sizes[:level].to(codes.device)
        in_range = ((codes >= 0) & (codes < sizes)).all(-1)
        key = (codes * self._multipliers(level).to(codes.device)).sum(-1)
        return torch.where(in_range, key, torch.full_like(key, INVALID_KEY))

    def unpack(self, keys: Tensor, level: int | None = None) -> Tensor:
        """(...,) keys of ``level`` digits (default all) -> (..., level) codes; invalid -> PAD_CODE."""
        level = self.n_digits if level is None else level
        sizes = self._sizes[:level].to(keys.device)
        codes = (keys.unsqueeze(-1) // self._multipliers(level).to(keys.device)) % sizes
        in_range = (keys >= 0) & (keys < math.prod(self.codebook_sizes[:level]))
        return torch.where(in_range.unsqueeze(-1), codes, torch.full_like(codes, PAD_CODE))

    # ---- key -> items ---------------------------------------------------------------------

    def items_for_keys(self, keys: Tensor) -> KeyLookup:
        """Look packed full keys (any shape) up in the sorted key table (binary search)."""
        n_unique = self.unique_keys.numel()
        pos = torch.searchsorted(self.unique_keys, keys)  # (...,)
        pos_c = pos.clamp(max=n_unique - 1)
        valid = (pos < n_unique) & (self.unique_keys[pos_c] == keys) & (keys >= 0)
        zero = torch.zeros_like(keys)
        item = torch.where(valid, self.sorted_items[self.group_start[pos_c]], zero)
        count = torch.where(valid, self.group_size[pos_c], zero)
        return KeyLookup(valid, item, count, pos_c)

    def expand_to_items(self, ranked_keys: Tensor, valid_mask: Tensor | None, k: int) -> Tensor:
        """Turn ranked decoded keys into the top-``k`` distinct items.

        Per row, in rank order: keys that are no real item's ID, or whose ``valid_mask`` is
        False, are dropped; repeated keys keep only their first (best-ranked) occurrence; each
        remaining key expands to ALL its items in ``item_rank`` order (ascending item id unless
        :meth:`ordered_by` set another). The first ``k`` items
        of that list are returned, 0 (PAD) where there are fewer. Different keys have disjoint
        item sets, so the items are distinct.

        Args:
            ranked_keys: (B, M) int64 keys, best first.
            valid_mask: (B, M) bool or None (all True).
            k: list length.

        Returns:
            (B, k) int64 item ids.
        """
        batch, m = ranked_keys.shape
        if m == 0 or k == 0:
            return ranked_keys.new_zeros(batch, k)
        look = self.items_for_keys(ranked_keys)
        valid = look.valid if valid_mask is None else look.valid & valid_mask  # (B, M)
        position = torch.arange(m, device=ranked_keys.device).expand(batch, m)
        # Dedup among the valid keys: invalid entries get distinct negative stand-ins so they
        # neither collide with each other nor with a valid key (valid keys are >= 0).
        dedup_key = torch.where(valid, ranked_keys, -1 - position)  # (B, M)
        sorted_key, order = torch.sort(dedup_key, dim=1, stable=True)  # stable: first occurrence first
        first = torch.ones_like(valid)
        first[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
        keep = torch.zeros_like(valid).scatter_(1, order, first) & valid  # (B, M)
        size = torch.where(keep, look.count, torch.zeros_like(look.count))  # (B, M) items per entry
        end = torch.cumsum(size, 1)  # (B, M) exclusive end of each entry's slots
        slots = torch.arange(k, device=ranked_keys.device).expand(batch, k).contiguous()  # (B, k)
        # Entry covering output slot j: the first m with end[m] > j (zero-size entries skipped).
        entry = torch.searchsorted(end, slots, right=True)  # (B, k)
        filled = entry < m
        entry_c = entry.clamp(max=m - 1)
        offset = slots - (end - size).gather(1, entry_c)  # (B, k) index within the key's group
        start = self.group_start[look.group.gather(1, entry_c)]  # (B, k)
        idx = (start + offset).clamp(0, self.sorted_items.numel() - 1)
        return torch.where(filled, self.sorted_items[idx], torch.zeros_like(idx))

    # ---- constrained decoding -------------------------------------------------------------

    def prefix_table(self, level: int) -> PrefixTable:
        """Allowed codes of digit ``level`` given the first ``level`` digits (0 <= level < n)."""
        if not 0 <= level < self.n_digits:
            raise ValueError(f"level must be in [0, {self.n_digits}), got {level}")
        return self.prefix_tables[level]

    def valid_next_codes(self, prefix_codes: Tensor) -> Tensor:
        """(B, level) codes of the first ``level`` digits -> (B, K) bool mask of next codes that
        lead to at least one real item (``level`` may be 0: shape (B, 0))."""
        level = prefix_codes.shape[-1]
        return self.prefix_table(level).lookup(self.pack(prefix_codes))

    # ---- persistence ----------------------------------------------------------------------

    def state_dict(self, include_derived: bool = True) -> dict[str, Tensor]:
        """Plain tensors (for buffers, checkpoints and ``torch.load(weights_only=True)``). With
        ``include_derived`` the lookup tables are included too, so restoring needs no rebuild.

        Pattern for a model: register every entry as a buffer (``self.register_buffer("sid_" +
        name, tensor)``), so the tables follow the model to its device and into checkpoints, and
        rebuild the view where needed with ``SemanticIDs.from_state_dict({name: buffer, ...})``,
        which wraps the tensors without copying or recomputing."""
        state = {
            "codes": self.codes,
            "codebook_sizes": self._sizes,
            "collision_digit": torch.tensor(self.collision_digit),
            "fit_seconds": torch.tensor(self.fit_seconds, dtype=torch.float64),
            "scheme": torch.tensor(list(self.scheme.encode()), dtype=torch.uint8),
            "item_rank": self.item_rank,
        }
        if include_derived:
            state |= {name: getattr(self, name) for name in _DERIVED}
            for table in self.prefix_tables:
                state[f"prefix_keys_{table.level}"] = table.prefix_keys
                state[f"prefix_mask_{table.level}"] = table.next_mask
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> SemanticIDs:
        """Inverse of :meth:`state_dict`; rebuilds the lookup tables if they are absent."""
        missing = [
            k
            for k in ("codes", "codebook_sizes", "collision_digit", "fit_seconds", "scheme")
            if k not in state
        ]
        if missing:
            raise ValueError(f"SemanticIDs state is missing {missing}")
        sizes = state["codebook_sizes"].to(torch.long)
        n = sizes.numel()
        table_names = list(_DERIVED) + [f"prefix_{w}_{lv}" for lv in range(n) for w in ("keys", "mask")]
        obj = cls.__new__(cls)
        derived = {k: state[k] for k in table_names} if all(k in state for k in table_names) else None
        obj._set(
            state["codes"].to(torch.long),
            sizes.to(state["codes"].device),
            bytes(state["scheme"].tolist()).decode(),
            bool(state["collision_digit"]),
            float(state["fit_seconds"]),
            derived,
            state["item_rank"] if "item_rank" in state else torch.arange(state["codes"].shape[0], device=state["codes"].device),
        )
        return obj

    def to(self, device: torch.device | str) -> SemanticIDs:
        """A copy with every tensor on ``device``."""
        return SemanticIDs.from_state_dict({k: v.to(device) for k, v in self.state_dict().items()})

    # ---- stats ----------------------------------------------------------------------------

    def stats(self) -> SemanticIDStats:
        codes = self.codes[1:].cpu()  # (N, n)
        n_base = self.n_digits - 1 if self.collision_digit else self.n_digits
        base = codes[:, :n_base]
        _, inverse, counts = torch.unique(base, dim=0, return_inverse=True, return_counts=True)
        usage, entropy = [], []
        for d in range(self.n_digits):  # loop over digits (<= 8), not items
            hist = torch.bincount(codes[:, d], minlength=self.codebook_sizes[d]).double()
            p = hist[hist > 0] / codes.shape[0]
            usage.append(int((hist > 0).sum()))
            entropy.append(float(-(p * torch.log2(p)).sum()))
        return SemanticIDStats(
            n_items=self.num_items,
            n_unique_ids=int(counts.numel()),
            collision_rate=float((counts[inverse] > 1).double().mean()),
            max_collision_group=int(counts.max()),
            code_usage=tuple(usage),
            code_entropy_bits=tuple(entropy),
            fit_seconds=self.fit_seconds,
        )


# --------------------------------------------------------------------------------------------
# shared fitting helpers
# --------------------------------------------------------------------------------------------


def _require_faiss():
    if importlib.util.find_spec("faiss") is None:
        raise ModuleNotFoundError(
            "fitting semantic IDs needs faiss: `pip install faiss-cpu` (or faiss-gpu), "
            "e.g. through the recbench extra `pip install recbench[faiss-cpu]`"
        )
    import faiss

    return faiss


@contextmanager
def faiss_threads(n: int | None) -> Iterator[None]:
    """Run the enclosed faiss calls on ``n`` OpenMP threads, restoring the previous setting after
    (``None``: leave it alone).

    Two reasons to use it around the fits: (1) results are reproducible only for a fixed thread
    count: k-means and PQ codes are identical across runs with the same count, but OPQ's rotation
    (and so every parallel-PQ code) changes with it; (2) on small machines faiss's OpenMP threads
    can spin-wait against its BLAS threads: on a 2-core VM parallel PQ on 12k x 384 took 289 s
    on 2 threads, 21 s on 1 (or 24 s on 2 with ``OMP_WAIT_POLICY=PASSIVE``).
    """
    if n is None:
        yield
        return
    faiss = _require_faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _check_inputs(embeddings: Tensor, train_item_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Validate (N+1, D) embeddings and the (N+1,) mask; returns float64 CPU embeddings of items
    1..N (N, D) and the index (into 0..N-1) of the training items."""
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"embeddings must be (N+1, D) with row 0 = PAD, got {tuple(embeddings.shape)}")
    if train_item_mask.shape != (embeddings.shape[0],) or train_item_mask.dtype != torch.bool:
        raise ValueError(
            f"train_item_mask must be a bool tensor of shape ({embeddings.shape[0]},), got "
            f"{train_item_mask.dtype} {tuple(train_item_mask.shape)}"
        )
    x = embeddings[1:].detach().cpu().to(torch.float64)
    finite = torch.isfinite(x).all(1)
    if not finite.all():
        raise ValueError(f"item {int(torch.nonzero(~finite)[0]) + 1} has a non-finite embedding")
    train_idx = torch.nonzero(train_item_mask[1:].cpu()).squeeze(1)  # PAD row never trains
    return x, train_idx


def _nearest(x: Tensor, centroids: Tensor, chunk: int = 16384) -> Tensor:
    """(n, d) x (k, d) -> (n,) index of the nearest centroid (L2), float64, ties -> lowest index.

    Assignment is done here rather than by faiss so that it is exact and identical on every
    platform; faiss is used for training the codebooks."""
    c_sq = (centroids * centroids).sum(1)  # (k,)
    out = []
    for start in range(0, x.shape[0], chunk):  # chunks bound the (chunk, k) distance matrix
        block = x[start : start + chunk]
        out.append(torch.argmin(c_sq[None, :] - 2.0 * block @ centroids.T, dim=1))
    return torch.cat(out)


def _collision_ranks(
    base: Tensor, codebook_sizes: tuple[int, ...], collision_size: int, item_rank: Tensor | None = None
) -> Tensor:
    """(N, L) codes -> (N,): within each group of items sharing the L codes, number the items
    0..c-1 in ``item_rank`` order (N,) (ascending item id when None). Raises if a group has more
    than ``collision_size`` items."""
    radix = torch.tensor(codebook_sizes, dtype=torch.long)
    mult = torch.ones(len(codebook_sizes), dtype=torch.long)
    if len(codebook_sizes) > 1:
        mult[:-1] = torch.flip(torch.cumprod(torch.flip(radix[1:], (0,)), 0), (0,))
    keys = (base * mult).sum(1)  # (N,)
    by_rank = torch.arange(keys.numel()) if item_rank is None else torch.sort(item_rank, stable=True).indices
    sorted_keys, within = torch.sort(keys[by_rank], stable=True)  # ties keep rank order
    order = by_rank[within]
    new_group = torch.ones_like(sorted_keys, dtype=torch.bool)
    new_group[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group_id = torch.cumsum(new_group.long(), 0) - 1
    group_first = torch.nonzero(new_group).squeeze(1)  # (G,) sorted position of each group start
    rank_sorted = torch.arange(keys.numel()) - group_first[group_id]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    if int(rank.max()) >= collision_size:
        worst = int(torch.argmax(rank))
        members = torch.nonzero(keys == keys[worst]).squeeze(1) + 1
        raise ValueError(
            f"{members.numel()} items share the semantic ID {base[worst].tolist()} (items "
            f"{members[:10].tolist()}{' ...' if members.numel() > 10 else ''}), more than the "
            f"collision digit's {collision_size} codes; raise codebook_size or use more levels"
        )
    return rank


def _number_unknown_items(base: Tensor, unknown: Tensor, codebook_size: int) -> Tensor:
    """Items with nothing known (an all-zero embedding row: collaborative vectors of items that never
    co-occur in training) share the zero vector's cell at every level, one group that can outgrow
    the collision digit (YooChoose: 5,150 of 9,514 items). For them the last level carries no
    information, so it numbers them instead (round-robin over its codes, in item-id order); the
    collision digit then tells apart about count / codebook_size of them per cell. Their first
    levels still say "unknown". ``base`` (N, L), ``unknown`` (N,) bool; returns a new (N, L)."""
    numbered = base.clone()
    index = torch.nonzero(unknown).squeeze(1)
    numbered[index, -1] = torch.arange(index.numel()) % codebook_size
    return numbered


def _append_collision_digit(base: Tensor, codebook_sizes: tuple[int, ...], collision_size: int) -> Tensor:
    """(N, L) codes -> (N, L+1) with the collision digit in ascending item id order."""
    return torch.cat([base, _collision_ranks(base, codebook_sizes, collision_size).unsqueeze(1)], 1)


def _finish(
    base: Tensor,
    sizes: tuple[int, ...],
    collision_digit: bool,
    collision_size: int,
    scheme: str,
    start: float,
) -> SemanticIDs:
    """Add the optional collision digit and the PAD row, and wrap into SemanticIDs."""
    if collision_digit:
        base = _append_collision_digit(base, sizes, collision_size)
        sizes = sizes + (collision_size,)
    codes = torch.cat([torch.full((1, base.shape[1]), PAD_CODE, dtype=torch.long), base])
    return SemanticIDs(
        codes, sizes, scheme, collision_digit=collision_digit, fit_seconds=time.perf_counter() - start
    )


def _check_train_count(n_train: int, codebook_size: int, what: str) -> None:
    # We raise rather than silently shrink k: a smaller codebook changes the ID space (and every
    # model's vocabulary), which must be a visible decision of the caller.
    if n_train < codebook_size:
        raise ValueError(
            f"{what}: only {n_train} training items for codebooks of {codebook_size} codes; "
            "pass a smaller codebook_size"
        )


# --------------------------------------------------------------------------------------------
# residual k-means (TIGER-style)
# --------------------------------------------------------------------------------------------


def fit_residual_kmeans(
    embeddings: Tensor,
    train_item_mask: Tensor,
    levels: int = 3,
    codebook_size: int = 256,
    collision_digit: bool = True,
    seed: int = 0,
    niter: int = 20,
) -> SemanticIDs:
    """Residual k-means semantic IDs (a cheaper alternative to TIGER's RQ-VAE).

    Level l runs faiss k-means (``niter`` Lloyd iterations, seed ``seed + l``) with
    ``codebook_size`` centres on the level-l residuals of the **training items only**; every item
    1..N is then assigned to its nearest centre (exact float64) and its residual updated. With
    ``collision_digit`` a last digit numbers the items sharing the ``levels`` codes 0..c-1 in
    ascending item id order (re-ordered afterwards by :meth:`SemanticIDs.ordered_by`, e.g. by training
    popularity), so every ID is unique; a group larger than ``codebook_size`` raises. Items with an
    all-zero embedding (nothing known) are numbered by their last level first
    (:func:`_number_unknown_items`; the scheme records how many).

    Deterministic: same inputs, same machine and thread count -> bit-identical codes (faiss
    k-means is seeded; the assignment is ours).

    Args:
        embeddings: (N+1, D) float; row 0 PAD is ignored.
        train_item_mask: (N+1,) bool, True for items that appear in training sequences.
        levels: residual levels (digits before the collision digit).
        codebook_size: centres per level (also the collision digit's range). Must not exceed the
            number of training items (ValueError otherwise; we do not shrink it silently).
    """
    faiss = _require_faiss()
    start = time.perf_counter()
    x, train_idx = _check_inputs(embeddings, train_item_mask)
    _check_train_count(train_idx.numel(), codebook_size, "residual k-means")
    residual = x.clone()  # (N, D)
    base = torch.empty(x.shape[0], levels, dtype=torch.long)
    for level in range(levels):  # loop over levels (3), each fully vectorised
        kmeans = faiss.Kmeans(x.shape[1], codebook_size, niter=niter, seed=seed + level, verbose=False)
        kmeans.train(np.ascontiguousarray(residual[train_idx].numpy(), dtype=np.float32))
        centroids = torch.from_numpy(kmeans.centroids).to(torch.float64)  # (K, D)
        base[:, level] = _nearest(residual, centroids)
        residual -= centroids[base[:, level]]
    scheme = (
        f"rq-kmeans:levels={levels},k={codebook_size},niter={niter},seed={seed},"
        f"collision_digit={collision_digit}"
    )
    unknown = (x == 0).all(dim=1)  # (N,)
    if collision_digit and bool(unknown.any()):
        base = _number_unknown_items(base, unknown, codebook_size)
        scheme += f",unknown_items_numbered={int(unknown.sum())}"
    return _finish(base, (codebook_size,) * levels, collision_digit, codebook_size, scheme, start)


# --------------------------------------------------------------------------------------------
# parallel PQ (DiffGRM PSE)
# --------------------------------------------------------------------------------------------


def fit_parallel_pq(
    embeddings: Tensor,
    train_item_mask: Tensor,
    n_digits: int = 4,
    codebook_size: int = 256,
    pca_dim: int = 256,
    whiten: bool = True,
    use_opq: bool = True,
    collision_digit: bool = False,
    seed: int = 0,
) -> SemanticIDs:
    """DiffGRM's parallel semantic encoding (``_generate_semantic_id_opq``), equivalent to faiss's
    ``OPQ{n},IVF1,PQ{n}x8`` with the inner-product metric, written out step by step:

    1. PCA fitted on the training items (float64 SVD, component signs fixed so the largest
       entry is positive), keeping ``pca_dim`` components, divided by their standard deviation
       when ``whiten``. ``pca_dim`` is clamped to D (and to T-1 for T training items); the
       effective value is in the scheme string, e.g. ``pca=64(clamped from 256)``.
    2. Rows L2-normalised again.
    3. OPQ (``faiss.OPQMatrix``, n sub-spaces, its inner PQ seeded with ``seed``) learns an
       orthogonal rotation on the training items (identity when ``use_opq`` is False).
    4. IVF1: a single coarse centroid, the unit-norm mean direction of the rotated training
       vectors (what spherical k-means with one centre converges to), is subtracted: a global shift.
    5. PQ (``faiss.ProductQuantizer``, seed ``seed``) splits the vector into ``n_digits``
       disjoint sub-vectors with their own codebook of ``codebook_size`` centres (a power of 2),
       trained on the training items; all items get the nearest centre per sub-space.

    The digits are parallel (one per sub-space), not residual. Collisions are not resolved unless
    ``collision_digit`` (then as in :func:`fit_residual_kmeans`); without it several items may
    share an ID and decoding expands the ID to all of them (:meth:`SemanticIDs.expand_to_items`).

    Deterministic for a fixed faiss thread count (bit-identical codes across fits); OPQ's
    rotation, hence the codes, changes with the thread count: pin it with :func:`faiss_threads`
    or cache the result (:func:`cached_semantic_ids`).
    """
    faiss = _require_faiss()
    start = time.perf_counter()
    nbits = int(round(math.log2(codebook_size))) if codebook_size > 1 else 0
    if codebook_size < 2 or 2**nbits != codebook_size or nbits > 16:
        raise ValueError(f"codebook_size must be a power of two in [2, 65536] for PQ, got {codebook_size}")
    x, train_idx = _check_inputs(embeddings, train_item_mask)
    n_train = train_idx.numel()
    _check_train_count(n_train, codebook_size, "parallel PQ")

    # 1. PCA (+ whitening) fitted on training items.
    x_train = x[train_idx]
    mean = x_train.mean(0)
    _, singular, vh = torch.linalg.svd(x_train - mean, full_matrices=False)  # vh (r, D)
    dim = min(pca_dim, x.shape[1], n_train - 1)
    note = f"(clamped from {pca_dim})" if dim != pca_dim else ""
    if dim != pca_dim:
        log.warning(
            "parallel PQ: PCA dimension %d clamped to %d (D=%d, %d training items)",
            pca_dim,
            dim,
            x.shape[1],
            n_train,
        )
    if dim % n_digits:
        raise ValueError(f"PCA dimension {dim} is not divisible by n_digits={n_digits}")
    components = vh[:dim]  # (dim, D)
    flip = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))  # (dim, 1)
    components = components * flip
    y = (x - mean) @ components.T  # (N, dim)
    if whiten:
        std = singular[:dim] / math.sqrt(max(n_train - 1, 1))
        y = y / std.clamp(min=std[0] * 1e-6)  # guard near-zero variance directions
    # 2. L2 normalise.
    y = torch.nn.functional.normalize(y, dim=1)

    # 3. OPQ rotation.
    if use_opq:
        opq = faiss.OPQMatrix(dim, n_digits)
        opq.verbose = False
        inner_pq = faiss.ProductQuantizer(dim, n_digits, nbits)  # kept alive while OPQ trains
        inner_pq.cp.seed = seed
        inner_pq.verbose = False
        opq.pq = inner_pq
        opq.train(np.ascontiguousarray(y[train_idx].numpy(), dtype=np.float32))
        rotation = torch.from_numpy(faiss.vector_to_array(opq.A).reshape(dim, dim)).to(
            torch.float64
        )  # (out, in)
        y = y @ rotation.T
    # 4. IVF1 shift.
    centre = torch.nn.functional.normalize(y[train_idx].mean(0), dim=0)
    y = y - centre
    # 5. PQ.
    pq = faiss.ProductQuantizer(dim, n_digits, nbits)
    pq.cp.seed = seed
    pq.verbose = False
    pq.train(np.ascontiguousarray(y[train_idx].numpy(), dtype=np.float32))
    dsub = dim // n_digits
    centroids = torch.from_numpy(faiss.vector_to_array(pq.centroids)).to(torch.float64)
    centroids = centroids.reshape(n_digits, codebook_size, dsub)  # (n, K, dsub)
    base = torch.stack(
        [_nearest(y[:, d * dsub : (d + 1) * dsub], centroids[d]) for d in range(n_digits)], 1
    )  # (N, n)
    scheme = (
        f"parallel-pq:pca={dim}{note},whiten={whiten},l2=True,opq={use_opq},ivf1_shift=True,"
        f"digits={n_digits},k={codebook_size},seed={seed},collision_digit={collision_digit}"
    )
    return _finish(base, (codebook_size,) * n_digits, collision_digit, codebook_size, scheme, start)


# --------------------------------------------------------------------------------------------
# typed configs + cache
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResidualKMeansConfig:
    """Parameters of :func:`fit_residual_kmeans` (TIGER-style, default 3 x 256 + collision digit)."""

    levels: int = 3
    codebook_size: int = 256
    collision_digit: bool = True
    seed: int = 0
    niter: int = 20

    def fit(self, embeddings: Tensor, train_item_mask: Tensor) -> SemanticIDs:
        return fit_residual_kmeans(embeddings, train_item_mask, **asdict(self))


@dataclass(frozen=True)
class ParallelPQConfig:
    """Parameters of :func:`fit_parallel_pq` (DiffGRM PSE, default 4 x 256, no collision digit)."""

    n_digits: int = 4
    codebook_size: int = 256
    pca_dim: int = 256
    whiten: bool = True
    use_opq: bool = True
    collision_digit: bool = False
    seed: int = 0

    def fit(self, embeddings: Tensor, train_item_mask: Tensor) -> SemanticIDs:
        return fit_parallel_pq(embeddings, train_item_mask, **asdict(self))


SemanticIDConfig = ResidualKMeansConfig | ParallelPQConfig


def cached_semantic_ids(
    embeddings: Tensor,
    train_item_mask: Tensor,
    config: SemanticIDConfig,
    cache_dir: Path,
    fit_threads: int | None = None,
) -> SemanticIDs:
    """Fit semantic IDs once and cache them on disk.

    Key = SHA-256 of (embedding table bytes, train item mask, tokenizer type and all its
    parameters, cache format version). Stored as ``sid_<hash>.pt`` (plain tensors, loaded with
    ``weights_only=True``) plus a JSON sidecar with the scheme, parameters and stats; both
    written atomically. ``fit_seconds`` on a cache hit is the original fit's. ``fit_threads``
    limits faiss's threads during a fit (:func:`faiss_threads`); a cache hit never imports faiss, so
    IDs fitted elsewhere load on a machine without it (the GPU image).
    """
    params = json.dumps({"type": type(config).__name__, **asdict(config)}, sort_keys=True)
    h = hashlib.sha256(f"v{_CACHE_FORMAT_VERSION}\0{params}\0".encode())
    h.update(tensor_sha256(embeddings.to(torch.float32)).encode())
    h.update(tensor_sha256(train_item_mask.to(torch.bool)).encode())
    key = h.hexdigest()
    path = Path(cache_dir) / f"sid_{key[:24]}.pt"
    loaded = load_tensors(path)
    if loaded is not None:
        tensors, meta = loaded
        if meta.get("key") == key and tensors["codes"].shape[0] == embeddings.shape[0]:
            return SemanticIDs.from_state_dict(tensors)
        log.warning("ignoring stale or mismatching semantic-ID cache %s", path)
    with faiss_threads(fit_threads):  # only a fit needs faiss: a cache hit loads on a machine without it
        sids = config.fit(embeddings, train_item_mask)
    meta = {"key": key, "scheme": sids.scheme, "params": json.loads(params), "stats": asdict(sids.stats())}
    atomic_save_tensors(path, sids.state_dict(include_derived=False), meta)
    return sids


# --------------------------------------------------------------------------------------------
# decoded codes -> items (generative decoders; batched, no host reads)
# --------------------------------------------------------------------------------------------


def ranked_codes_to_items(
    sids: SemanticIDs, codes: Tensor, alive: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Decoded IDs ranked best first -> the top-``k`` items (item-level ranking).

    Keys are packed (digit 0 most significant); keys of no item are dropped; a repeated key keeps
    its best-ranked occurrence; each key expands to all its items in the IDs' item order
    (:meth:`SemanticIDs.expand_to_items`).

    Args:
        sids: the item IDs.
        codes: (B, W, n) decoded IDs, best first per row.
        alive: (B, W) bool, False at empty slots (not decoded candidates).
        k: list length.

    Returns:
        items (B, k) LongTensor (0 where fewer), invalid count and candidate count (scalar int64
        tensors: alive IDs that map to no item, and all alive IDs), for ``decode_stats``.
    """
    keys = sids.pack(codes)  # (B, W)
    valid = sids.items_for_keys(keys).valid
    invalid = (alive & ~valid).sum()
    return sids.expand_to_items(keys, alive, k), invalid, alive.sum()

