"""Nearest items by inner product: exact (torch or faiss flat) or approximate (faiss IVF/HNSW).

``ItemIndex`` wraps an item-embedding table ``(N + 1, D)`` whose row 0 is padding. Searches return
item ids in ``1..N`` (never PAD) best first, and 0 in slots that could not be filled (fewer allowed
items than ``k``).

Backends (``backend=``):

- ``torch``: one ``(B, D) x (D, N)`` matrix product and a top-k, on the table's device. Exact.
- ``faiss``: ``IndexFlatIP`` (exact) or, opt-in via ``kind``, ``IndexIVFFlat`` / ``IndexHNSWFlat``
  (approximate; the choice is recorded by :meth:`ItemIndex.describe`). CPU faiss, or faiss-gpu when
  it is installed and the table lives on a GPU.
- ``auto``: faiss when it is installed and usable for the table's device, else torch. On a GPU
  without faiss-gpu this is the torch exact path.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import numpy as np
import torch

from recbench.batch import PAD_ID

Backend = Literal["auto", "torch", "faiss"]
IndexKind = Literal["exact", "ivf", "hnsw"]


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def exact_top_items(
    queries: torch.Tensor, table: torch.Tensor, k: int, allowed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k over rows ``1..N`` of ``table``; returns ``(scores, items)``.

    ``queries`` (B, D), ``table`` (N + 1, D), ``allowed`` optional BoolTensor (N + 1,). Items are
    1-based ids; slots beyond the number of allowed items hold item 0 and score ``-inf``.
    """
    scores = queries @ table[1:].T  # (B, N)
    if allowed is not None:
        scores = scores.masked_fill(~allowed[1:].unsqueeze(0), float("-inf"))
    k_eff = min(k, scores.shape[1])
    top_scores, top_index = torch.topk(scores, k_eff, dim=1)  # (B, k_eff)
    items = torch.where(torch.isfinite(top_scores), top_index + 1, torch.zeros_like(top_index))
    if k_eff < k:
        pad = k - k_eff
        items = torch.nn.functional.pad(items, (0, pad), value=PAD_ID)
        top_scores = torch.nn.functional.pad(top_scores, (0, pad), value=float("-inf"))
    return top_scores, items


class ItemIndex:
    """Inner-product nearest-item search over an item table; PAD (row 0) is never returned.

    Args:
        table: item embeddings ``(N + 1, D)``, row 0 = padding.
        allowed: optional BoolTensor ``(N + 1,)``; only these items can be returned.
        backend: ``auto``, ``torch`` or ``faiss`` (see the module docstring).
        kind: ``exact`` (default), or approximate ``ivf`` / ``hnsw`` (faiss only).
        item_bias: optional ``(N + 1,)`` score added to each item's inner product (a prior, e.g.
            a popularity term). Stored as one more table column that every query meets with a 1,
            so every backend and index kind searches ``q · e_j + bias_j`` unchanged.
        nlist: IVF cells; ``nprobe``: IVF cells searched; ``hnsw_m``: HNSW graph degree.
    """

    def __init__(
        self,
        table: torch.Tensor,
        allowed: torch.Tensor | None = None,
        backend: Backend = "auto",
        kind: IndexKind = "exact",
        item_bias: torch.Tensor | None = None,
        nlist: int = 256,
        nprobe: int = 16,
        hnsw_m: int = 32,
    ) -> None:
        if table.dim() != 2 or table.shape[0] < 2:
            raise ValueError(f"table must be (N + 1, D) with N >= 1, got {tuple(table.shape)}")
        if item_bias is not None:
            if item_bias.shape != (table.shape[0],):
                raise ValueError(f"item_bias must be ({table.shape[0]},), got {tuple(item_bias.shape)}")
            table = torch.cat([table, item_bias.to(table).unsqueeze(1)], dim=1)  # (N + 1, D + 1)
        self.biased = item_bias is not None
        if allowed is None:
            allowed = torch.ones(table.shape[0], dtype=torch.bool, device=table.device)
        allowed = allowed.to(table.device).clone()
        allowed[PAD_ID] = False
        if not bool(allowed.any()):
            raise ValueError("ItemIndex: no item is allowed")
        self.table, self.allowed, self.kind = table.detach(), allowed, kind
        self.backend = self._resolve_backend(backend, kind)
        self._faiss_index = None
        if self.backend == "faiss":
            self._faiss_index, self._faiss_ids = self._build_faiss(nlist, nprobe, hnsw_m)

    def _resolve_backend(self, backend: Backend, kind: IndexKind) -> Literal["torch", "faiss"]:
        if backend == "faiss" and not faiss_available():
            raise ImportError("backend='faiss' needs faiss: pip install 'recbench[faiss-cpu]'")
        if kind != "exact" and backend == "torch":
            raise ValueError(f"approximate kind={kind!r} needs the faiss backend")
        if backend == "auto":
            if kind != "exact":
                if not faiss_available():
                    raise ImportError(f"kind={kind!r} needs faiss: pip install 'recbench[faiss-cpu]'")
                return "faiss"
            if not faiss_available():
                return "torch"
            if self.table.is_cuda:
                import faiss

                return "faiss" if faiss.get_num_gpus() > 0 else "torch"
            return "faiss"
        return backend

    def _build_faiss(self, nlist: int, nprobe: int, hnsw_m: int):  # type: ignore[no-untyped-def]
        import faiss

        ids = torch.nonzero(self.allowed).squeeze(1)  # (M,) item ids in the index
        vectors = np.ascontiguousarray(self.table[ids].float().cpu().numpy())
        dim = vectors.shape[1]
        if self.kind == "exact":
            index = faiss.IndexFlatIP(dim)
        elif self.kind == "ivf":
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, min(nlist, len(vectors)), faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = 0
            index.train(vectors)
            index.nprobe = nprobe
        else:
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        if self.table.is_cuda and faiss.get_num_gpus() > 0:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), self.table.device.index or 0, index)
        index.add(vectors)
        return index, ids.cpu()

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` items for each query ``(B, D)``: ``(scores, items)``, both ``(B, k)``."""
        if self.biased:
            queries = torch.cat([queries, queries.new_ones(queries.shape[0], 1)], dim=1)  # (B, D + 1)
        if self.backend == "torch":
            return exact_top_items(queries.to(self.table.dtype), self.table, k, self.allowed)
        assert self._faiss_index is not None
        k_eff = min(k, len(self._faiss_ids))
        scores, index = self._faiss_index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k_eff)
        index_t = torch.from_numpy(index)
        found = index_t >= 0
        items = torch.where(found, self._faiss_ids[index_t.clamp(min=0)], torch.zeros_like(index_t))
        scores_t = torch.where(found, torch.from_numpy(scores), torch.full_like(torch.from_numpy(scores), float("-inf")))
        if k_eff < k:
            items = torch.nn.functional.pad(items, (0, k - k_eff), value=PAD_ID)
            scores_t = torch.nn.functional.pad(scores_t, (0, k - k_eff), value=float("-inf"))
        return scores_t.to(queries.device), items.to(queries.device)

    def describe(self) -> str:
        """What a result row records: backend and exactness."""
        return f"{self.backend}:{self.kind}" + (" + item bias" if self.biased else "")
