"""Full-catalogue softmax cross-entropy without the ``(M, N)`` logit matrix.

A full-softmax recommender scores every one of ``M`` training positions against all ``N`` items.
Written as ``F.cross_entropy(hidden @ table.T, labels)`` autograd keeps the whole ``(M, N)`` logit
matrix, runs log-softmax forward and backward over it and fills an ``(M, N)`` zero gradient before
scattering into it: on a CPU those memory-bound passes cost more than the three matrix products
(SASRec on Beauty: ~80 of ~180 ms a step). :func:`linear_cross_entropy` computes the loss and both
gradients chunk by chunk in the forward pass, so a chunk's logits are written once, turned into
``softmax - one_hot`` in place while still in cache, and multiplied into the gradients; the backward
pass only scales the stored gradients. Same loss and gradients up to float rounding
(``tests/test_losses.py``), and no ``(M, N)`` tensor on any device.

Chunk count depends only on shapes, so nothing here reads a device value on the host.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
# Logits per chunk. CPU: 4 MiB of float32 stays in cache (Beauty, 2 threads: 2**18 takes 1.5x and
# 2**21 1.25x the time of 2**20). GPU: large chunks keep the matrix products big.
_CPU_CHUNK_ELEMENTS = 1 << 20
_GPU_CHUNK_ELEMENTS = 1 << 26


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        table: torch.Tensor,
        labels: torch.Tensor,
        excluded: torch.Tensor | None,
        chunk_rows: int,
    ) -> torch.Tensor:
        needs_grad = any(ctx.needs_input_grad[:2])  # type: ignore[attr-defined]
        valid = labels != IGNORE_INDEX  # (M,)
        safe_labels = labels.clamp(min=0).unsqueeze(1)  # (M, 1): any column; masked below
        count = valid.sum().clamp(min=1).to(torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if needs_grad else None
        grad_table = torch.zeros(table.shape, dtype=torch.float32, device=table.device) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            chunk = hidden[rows]  # (C, d)
            keep = valid[rows].to(torch.float32).unsqueeze(1)  # (C, 1)
            logits = (chunk @ table.T).float()  # (C, N)
            target_logits = logits.gather(1, safe_labels[rows])  # (C, 1), before the exclusion: finite
            if excluded is not None:
                logits.masked_fill_(excluded, float("-inf"))  # (C, N): those classes get exp 0
            peak = logits.amax(dim=1, keepdim=True)  # (C, 1)
            exponentials = logits.sub_(peak).exp_()  # (C, N), in place: one pass, no new buffer
            sums = exponentials.sum(dim=1, keepdim=True)  # (C, 1)
            total = total + ((sums.log() + peak - target_logits) * keep).sum()
            if grad_table is None or grad_hidden is None:
                continue
            probabilities = exponentials.div_(sums)  # (C, N)
            probabilities.scatter_add_(1, safe_labels[rows], -keep).mul_(keep)  # softmax - one-hot; 0 if ignored
            grad_hidden[rows] = (probabilities @ table.to(probabilities.dtype)).float()
            grad_table += (probabilities.T @ chunk.to(probabilities.dtype)).float()  # (N, d)
        if grad_hidden is not None and grad_table is not None:
            ctx.save_for_backward(grad_hidden / count, grad_table / count)
            ctx.dtypes = (hidden.dtype, table.dtype)
        return total / count

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
        grad_hidden, grad_table = ctx.saved_tensors  # type: ignore[attr-defined]
        hidden_dtype, table_dtype = ctx.dtypes  # type: ignore[attr-defined]
        return (grad_hidden * grad_output).to(hidden_dtype), (grad_table * grad_output).to(table_dtype), None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    table: torch.Tensor,
    labels: torch.Tensor,
    excluded: torch.Tensor | None = None,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``softmax(hidden @ table.T)`` against ``labels``, over labelled rows.

    Args:
        hidden: ``(..., d)`` query vectors (flattened to ``(M, d)``).
        table: ``(N, d)`` output embeddings (e.g. a tied item table without its padding row).
        labels: ``(...)`` class indices in ``[0, N)``, or :data:`IGNORE_INDEX` for rows that do not count.
        excluded: ``(N,)`` bool, classes left out of every softmax (logits ``-inf`` in the chunk: no
            probability, no gradient); no counted label may be one of them.
        chunk_elements: logits computed at once, which sets the chunk's row count (default: 2**20 on
            CPU, 2**26 elsewhere).

    Equals ``F.cross_entropy((hidden @ table.T).float().masked_fill(excluded, -inf), labels,
    ignore_index=IGNORE_INDEX)`` (0 when no row counts, where that gives NaN). Not twice differentiable.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on the rows")
    if hidden.shape[-1] != table.shape[1]:
        raise ValueError(f"hidden width {hidden.shape[-1]} != table width {table.shape[1]}")
    if excluded is not None and (excluded.dtype != torch.bool or excluded.shape != table.shape[:1]):
        raise ValueError(f"excluded must be a bool mask of shape ({table.shape[0]},), got {excluded.dtype} {tuple(excluded.shape)}")
    if chunk_elements is None:
        chunk_elements = _CPU_CHUNK_ELEMENTS if hidden.device.type == "cpu" else _GPU_CHUNK_ELEMENTS
    chunk_rows = max(1, chunk_elements // max(1, table.shape[0]))
    loss: torch.Tensor = _LinearCrossEntropy.apply(hidden.flatten(0, -2), table, labels.flatten(), excluded, chunk_rows)
    return loss
