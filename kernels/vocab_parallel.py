"""softmax(LayerNorm(logits)) @ VTE with the visual vocabulary split across tensor-parallel ranks.

Each rank holds a slice of the Vh softmax columns (its head rows, LayerNorm weights and VTE
rows). The result equals the single-device one up to rounding, because every statistic merges
exactly:
  1. LayerNorm moments of each slice (mean, M2), all-gathered and merged (Chan et al.);
  2. each slice's softmax (max, sum-exp) given the row's (mean, rstd), all-gathered;
  3. each slice's unnormalized product sum_j exp(y_j - max_slice) * VTE[j], rescaled to the
     row's global max, all-reduced, divided by the global sum-exp.
Ranks exchange two [N, 2] fp32 tensors and one [N, D] fp32 tensor.

The pieces run as Triton kernels on CUDA (kernels/triton_kernels.py) and as chunked torch ops
otherwise (vLLM's CPU backend under tensor parallel).
"""
from typing import Callable, Sequence

import torch
from torch import Tensor

from ovis_vllm.kernels import triton_kernels
from ovis_vllm.kernels.cpu import DEFAULT_CHUNK_MB, chunk_rows


def vocab_parallel_visual_embedding(
        logits: Tensor, ln_weight: Tensor, ln_bias: Tensor, vte_rows: Tensor, eps: float, *,
        widths: Sequence[int], rank: int,
        all_gather: Callable[[Tensor], Tensor], all_reduce: Callable[[Tensor], Tensor],
        dtype: torch.dtype | None = None, chunk_mb: float = DEFAULT_CHUNK_MB) -> Tensor:
    """This rank's call: `logits` [N, widths[rank]] are its columns of the row, `ln_weight`,
    `ln_bias` and `vte_rows` its slice of the LayerNorm and of the VTE's softmax rows.

    all_gather(t [N, 2]) -> [N, 2 * ranks] (the ranks' tensors side by side, in rank order);
    all_reduce(t) -> the sum over ranks. Returns the whole [N, D] embedding in `dtype`
    (default: the VTE's), the same on every rank."""
    ranks = len(widths)
    moments = all_gather(ln_partial_stats(logits, chunk_mb).contiguous())
    norm = combine_ln_stats([(widths[r], moments[:, 2 * r:2 * r + 2]) for r in range(ranks)], eps)
    sm = softmax_partial_stats(logits, ln_weight, ln_bias, norm, chunk_mb)
    sm_all = all_gather(sm.contiguous())
    maxes, sums = sm_all[:, 0::2], sm_all[:, 1::2]
    scales = torch.exp(maxes - maxes.amax(dim=1, keepdim=True))  # each slice -> the global max
    mine = partial_product(logits, ln_weight, ln_bias, vte_rows, norm, sm, chunk_mb)
    total = all_reduce(mine * scales[:, rank:rank + 1])
    return (total / (sums * scales).sum(dim=1, keepdim=True)).to(dtype or vte_rows.dtype)


def ln_partial_stats(logits: Tensor, chunk_mb: float = DEFAULT_CHUNK_MB) -> Tensor:
    """LayerNorm statistics of a vocabulary slice: fp32 [N, 2] = (mean of the slice's logits,
    M2 = sum of squared deviations from that mean). Centred rather than a raw sum of squares:
    exact to combine (`combine_ln_stats`) and free of cancellation when |mean| >> std."""
    if triton_kernels.triton_usable(logits):
        return triton_kernels.ln_moments(logits)
    moments = torch.empty((logits.shape[0], 2), dtype=torch.float32, device=logits.device)
    rows = chunk_rows(logits.shape[1], torch.float32, chunk_mb)
    for start in range(0, logits.shape[0], rows):
        x = logits[start:start + rows].float()
        mean = x.mean(dim=1)
        moments[start:start + rows, 0] = mean
        moments[start:start + rows, 1] = ((x - mean[:, None]) ** 2).sum(dim=1)
    return moments


def combine_ln_stats(parts: Sequence[tuple[int, Tensor]], eps: float) -> Tensor:
    """[(slice width, ln_partial_stats)] of slices covering the row -> fp32 [N, 2] (mean, rstd)
    of the whole row (Chan et al.'s pairwise variance combination; biased variance as in
    LayerNorm)."""
    total = sum(count for count, _ in parts)
    mean = sum(count * st[:, 0] for count, st in parts) / total
    m2 = sum(st[:, 1] + count * (st[:, 0] - mean) ** 2 for count, st in parts)
    return torch.stack([mean, torch.rsqrt(m2 / total + eps)], dim=1)


def softmax_partial_stats(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor, norm: Tensor,
                          chunk_mb: float = DEFAULT_CHUNK_MB) -> Tensor:
    """Given the row's (mean, rstd) [N, 2], a slice's softmax statistics of the normalized
    logits: fp32 [N, 2] = (slice max m_i, sum over the slice of exp(y - m_i))."""
    if triton_kernels.triton_usable(logits):
        _, sm = triton_kernels.row_stats(logits, ln_weight, ln_bias, 0.0,
                                         norm=norm.float().contiguous())
        return sm
    sm = torch.empty((logits.shape[0], 2), dtype=torch.float32, device=logits.device)
    for start, stop, y in _normalized_chunks(logits, ln_weight, ln_bias, norm, chunk_mb):
        row_max = y.amax(dim=1)
        sm[start:stop, 0] = row_max
        sm[start:stop, 1] = torch.exp(y - row_max[:, None]).sum(dim=1)
    return sm


def partial_product(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor, vte: Tensor,
                    norm: Tensor, sm: Tensor, chunk_mb: float = DEFAULT_CHUNK_MB) -> Tensor:
    """Unnormalized product of a slice: fp32 [N, D] = sum_j exp(y_j - sm[:, 0]) * vte[j] over the
    slice's columns j (vte holds the slice's VTE rows, at least as many as it has columns)."""
    out = torch.empty((logits.shape[0], vte.shape[1]), dtype=torch.float32, device=logits.device)
    if triton_kernels.triton_usable(logits):
        triton_kernels.product(logits, ln_weight, ln_bias, vte, norm.float().contiguous(),
                               sm.float().contiguous(), out, normalize=False)
        return out
    table = vte[: logits.shape[1]].float()
    for start, stop, y in _normalized_chunks(logits, ln_weight, ln_bias, norm, chunk_mb):
        torch.matmul(torch.exp(y - sm[start:stop, 0:1].float()), table, out=out[start:stop])
    return out


def _normalized_chunks(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor, norm: Tensor,
                       chunk_mb: float):
    """fp32 LayerNorm output of a slice, a memory-budgeted chunk of rows at a time."""
    rows = chunk_rows(logits.shape[1], torch.float32, chunk_mb)
    w, b = ln_weight.float(), ln_bias.float()
    for start in range(0, logits.shape[0], rows):
        stop = start + rows
        mean, rstd = norm[start:stop, 0:1].float(), norm[start:stop, 1:2].float()
        yield start, stop, (logits[start:stop].float() - mean) * rstd * w + b
