"""Fused probabilistic visual embedding of Ovis: softmax(LayerNorm(logits)) @ VTE.

Per visual token (row) the model computes, over the Vh = V - 5 head logits x:
    y = LayerNorm(x) (weight, bias, eps)      p = softmax(y)      e = [p, 0,0,0,0,0] @ VTE
The 5 padded probabilities are exactly zero, so only VTE[:Vh] contributes and is ever read here.

vLLM's built-in path (`visual_embedding_unfused`) materializes three [N, V]-sized tensors (LN
output, softmax output, padded copy: ~257 MB each for a 9-crop image in bf16) before one dense
matmul. This module provides:

* Triton (CUDA; CPU only under TRITON_INTERPRET=1), never materializing the [N, Vh] probabilities:
    pass 1 `_row_stats_kernel`: per row, LayerNorm mean/rstd (Chan's parallel variance), then
        the softmax max and sum-exp of the normalized logits (second sweep mostly hits L2);
    pass 2 `_product_kernel`: a GEMM over the vocabulary whose A tile exp(LN(x) - max) is
        built on the fly from the logits, fp32 accumulation, divided by sum-exp at the end.
  The same kernels, run on a slice of the vocabulary, give the pieces a tensor-parallel split
  of the visual vocabulary needs (`ln_partial_stats`, `combine_ln_stats`,
  `softmax_partial_stats`, `partial_product`, `combine_partials`).
* `visual_embedding_chunked`: exact CPU path. Row chunks sized from a memory budget
  (env OVIS_VISUAL_EMBED_CHUNK_MB, read at call time, default 64: one [rows, Vh] tensor); each
  chunk runs the very same torch ops as the unfused path in the input dtype, so results match it
  up to matmul rounding. Serving packs the VTE rows once (`PackedMatrix`, oneDNN) and each
  chunk's product runs on the pre-laid-out table (faster than torch.matmul: RESULTS.md).
* `visual_embedding`: the public entry point, a torch custom op "ovis::visual_embedding" (with a
  fake implementation, so torch.compile can trace it and CUDA graphs can capture it) that
  dispatches CUDA tensors to Triton and anything else to the chunked CPU path.
  Env OVIS_VISUAL_EMBED (read at call time, inside the op): "auto" (default), "unfused",
  "chunked" or "triton" forces a path.

Performance note (from sm_90 PTX, untimed): logits rows of 65531 elements are not 16-byte
aligned and the vocabulary-edge mask is not block-aligned, so logits load element by element;
VTE tiles load as 16-byte vectors, pipelined with cp.async.
"""
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # a CPU-only install: the torch paths below still work
    HAS_TRITON = False

NUM_INDICATORS = 5  # VTE rows reserved for the image indicators, never hit by the softmax
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEFAULT_CHUNK_MB = 64


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
    # exp(z) = exp2(z * log2(e)): exp2 is the hardware instruction. A kernel may only read
    # constexpr globals.
    LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)

    @triton.jit
    def _row_stats_kernel(
        x_ptr, w_ptr, b_ptr,
        ln_ptr,    # [N, 2] fp32 out (mean, M2) of this slice          (LN and not SOFTMAX)
        norm_ptr,  # [N, 2] fp32 (mean, rstd): out when LN and SOFTMAX, in when SOFTMAX only
        sm_ptr,    # [N, 2] fp32 out (max, sum exp(y - max))            (SOFTMAX)
        N, Vh, eps,
        stride_xm, stride_xv, stride_w, stride_b,
        LN: tl.constexpr, SOFTMAX: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm  # int64: N * Vh may pass 2^31

        if LN:
            # Chan et al.'s merge of per-block (count, mean, M2). A plain sum of squares would
            # cancel catastrophically in fp32 when |mean| >> std; this stays exact-ish always.
            mean = tl.zeros([BLOCK_M], tl.float32)
            m2 = tl.zeros([BLOCK_M], tl.float32)
            for v0 in range(0, Vh, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                mask = row_mask[:, None] & (cols < Vh)[None, :]
                x = tl.load(x_rows + cols[None, :] * stride_xv, mask=mask, other=0.0).to(tl.float32)
                n_prev = v0 * 1.0                       # all earlier blocks were full
                n_blk = tl.minimum(Vh - v0, BLOCK_V) * 1.0
                blk_mean = tl.sum(x, 1) / n_blk
                d = tl.where(mask, x - blk_mean[:, None], 0.0)
                delta = blk_mean - mean
                n_tot = n_prev + n_blk
                mean += delta * (n_blk / n_tot)
                m2 += tl.sum(d * d, 1) + delta * delta * (n_prev * n_blk / n_tot)
            if SOFTMAX:  # this program saw the whole row: finish the LayerNorm statistics here
                rstd = tl.rsqrt(m2 / Vh + eps)
                tl.store(norm_ptr + rows * 2, mean, mask=row_mask)
                tl.store(norm_ptr + rows * 2 + 1, rstd, mask=row_mask)
            else:  # a vocabulary slice: hand back its partial statistics
                tl.store(ln_ptr + rows * 2, mean, mask=row_mask)
                tl.store(ln_ptr + rows * 2 + 1, m2, mask=row_mask)
        else:
            mean = tl.load(norm_ptr + rows * 2, mask=row_mask, other=0.0)
            rstd = tl.load(norm_ptr + rows * 2 + 1, mask=row_mask, other=0.0)

        if SOFTMAX:
            # Online max / sum-exp (running sum rescaled when the max grows).
            m = tl.full([BLOCK_M], float("-inf"), tl.float32)
            s = tl.zeros([BLOCK_M], tl.float32)
            for v0 in range(0, Vh, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                col_mask = cols < Vh
                mask = row_mask[:, None] & col_mask[None, :]
                x = tl.load(x_rows + cols[None, :] * stride_xv, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + cols * stride_w, mask=col_mask, other=0.0).to(tl.float32)
                b = tl.load(b_ptr + cols * stride_b, mask=col_mask, other=0.0).to(tl.float32)
                y = (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
                y = tl.where(col_mask[None, :], y, float("-inf"))
                m_new = tl.maximum(m, tl.max(y, 1))
                p = tl.exp2((y - m_new[:, None]) * LOG2E)
                s = s * tl.exp2((m - m_new) * LOG2E) + tl.sum(p, 1)
                m = m_new
            tl.store(sm_ptr + rows * 2, m, mask=row_mask)
            tl.store(sm_ptr + rows * 2 + 1, s, mask=row_mask)

    @triton.jit
    def _product_kernel(
        x_ptr, w_ptr, b_ptr, vte_ptr,
        norm_ptr,  # [N, 2] fp32 (mean, rstd)
        sm_ptr,    # [N, 2] fp32 (max, sumexp)
        out_ptr,   # [SPLIT, N, D]: vte dtype when NORMALIZE, else fp32 partial sums
        N, Vh, D, V_PER_SPLIT,
        stride_xm, stride_xv, stride_w, stride_b, stride_ev, stride_ed,
        stride_os, stride_om, stride_od,
        NORMALIZE: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # D tiles vary fastest in launch order: programs running together share the same logits
        # rows (recomputing their probabilities) and VTE tiles through L2.
        pid_d = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)  # split of the vocabulary (split-K) when there are few rows
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        row_mask = rows < N
        d_mask = dcols < D

        mean = tl.load(norm_ptr + rows * 2, mask=row_mask, other=0.0)
        rstd = tl.load(norm_ptr + rows * 2 + 1, mask=row_mask, other=0.0)
        row_max = tl.load(sm_ptr + rows * 2, mask=row_mask, other=0.0)
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm

        v_lo = pid_s * V_PER_SPLIT
        v_hi = tl.minimum(v_lo + V_PER_SPLIT, Vh)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < v_hi  # also keeps the 5 indicator rows (>= Vh) from being loaded
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(x_rows + cols[None, :] * stride_xv, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols * stride_w, mask=col_mask, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + cols * stride_b, mask=col_mask, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
            p = tl.where(mask, tl.exp2((y - row_max[:, None]) * LOG2E), 0.0)  # in [0, 1]
            e = tl.load(vte_ptr + cols.to(tl.int64)[:, None] * stride_ev + dcols[None, :] * stride_ed,
                        mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            p = p.to(e.dtype)  # tensor-core operand; same rounding as a same-dtype softmax output
            if DOT_FP32:  # fp32 tables, and the interpreter (its bf16 dot is wrong)
                acc = tl.dot(p.to(tl.float32), e.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(p, e, acc)

        if NORMALIZE:
            acc = acc / tl.load(sm_ptr + rows * 2 + 1, mask=row_mask, other=1.0)[:, None]
        out = out_ptr + pid_s * stride_os + rows[:, None] * stride_om + dcols[None, :] * stride_od
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


# triton.jit picks the interpreter when the kernels are defined (TRITON_INTERPRET=1 at import).
_INTERPRETED = HAS_TRITON and type(_product_kernel).__name__ == "InterpretedFunction"


def _interpreting() -> bool:
    return _INTERPRETED


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _stats_config() -> dict:
    if _interpreting():
        return dict(BLOCK_M=4, BLOCK_V=64, num_warps=1)
    # Row statistics are memory-bound: a few rows per program, wide loads along the row.
    return dict(BLOCK_M=2, BLOCK_V=2048, num_warps=8)


def _product_blocks(dtype: torch.dtype) -> dict:
    """Block sizes of the product kernel. Not timed on a GPU yet (benchmarks/visual_embed.py
    --sweep does); chosen from ahead-of-time sm_90 compiles: no register spills and VTE tiles
    pipelined with cp.async. fp32 (tests only) needs smaller tiles."""
    if _interpreting():
        return dict(BLOCK_M=16, BLOCK_V=64, BLOCK_D=32, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_V=32, BLOCK_D=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_V=32, BLOCK_D=256, num_warps=8, num_stages=4)


def _product_config(n: int, d: int, dtype: torch.dtype, device: torch.device) -> dict:
    cfg = _product_blocks(dtype)
    cfg["SPLIT"] = 1
    if device.type == "cuda":
        # Few rows (one crop: N=196) give too few tiles to fill the GPU: split the vocabulary.
        tiles = triton.cdiv(n, cfg["BLOCK_M"]) * triton.cdiv(d, cfg["BLOCK_D"])
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        cfg["SPLIT"] = max(1, min(8, sms // tiles))
    return cfg


def _require_triton(*tensors: Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    if not (all(t.is_cuda for t in tensors) or _interpreting()):
        raise ValueError("the Triton path needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def _launch_row_stats(logits: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                      eps: float, ln: Optional[Tensor], norm: Tensor, sm: Optional[Tensor],
                      LN: bool, SOFTMAX: bool) -> None:
    n, vh = logits.shape
    w = ln_weight if ln_weight is not None else logits  # dummies when unused (LN only)
    b = ln_bias if ln_bias is not None else logits
    dummy = norm
    cfg = _stats_config()
    grid = (triton.cdiv(n, cfg["BLOCK_M"]),)
    _row_stats_kernel[grid](
        logits, w, b, ln if ln is not None else dummy, norm, sm if sm is not None else dummy,
        n, vh, eps, logits.stride(0), logits.stride(1), w.stride(0), b.stride(0),
        LN=LN, SOFTMAX=SOFTMAX, **cfg)


def _launch_product(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor, vte: Tensor,
                    norm: Tensor, sm: Tensor, out: Tensor, normalize: bool,
                    config: Optional[dict] = None) -> None:
    """normalize=True: out [N, D] (any float dtype) = softmax product. normalize=False:
    out [N, D] fp32 = sum_j exp(y_j - max) * VTE[j] (unnormalized partial product)."""
    n, vh = logits.shape
    d = vte.shape[1]
    cfg = dict(config or _product_config(n, d, vte.dtype, logits.device))
    split = cfg.pop("SPLIT", 1)
    if split > 1:  # each split writes an fp32 partial; the sum shares one max so is exact
        v_per_split = triton.cdiv(triton.cdiv(vh, split), cfg["BLOCK_V"]) * cfg["BLOCK_V"]
        split = triton.cdiv(vh, v_per_split)
    if split == 1:
        v_per_split = vh
    target = out if split == 1 else torch.empty((split, n, d), dtype=torch.float32,
                                                device=out.device)
    t_stride = target.stride() if split > 1 else (0,) + tuple(out.stride())
    grid = (triton.cdiv(d, cfg["BLOCK_D"]), triton.cdiv(n, cfg["BLOCK_M"]), split)
    _product_kernel[grid](
        logits, ln_weight, ln_bias, vte, norm, sm, target,
        n, vh, d, v_per_split,
        logits.stride(0), logits.stride(1), ln_weight.stride(0), ln_bias.stride(0),
        vte.stride(0), vte.stride(1), t_stride[0], t_stride[1], t_stride[2],
        NORMALIZE=normalize and split == 1, DOT_FP32=_interpreting() or vte.dtype == torch.float32,
        **cfg)
    if split > 1:
        acc = target.sum(0)
        if normalize:
            acc = acc / sm[:, 1:2]
        out.copy_(acc)


# ----------------------------------------------------------------------------------------------
# Tensor-parallel pieces (a slice [lo, hi) of the visual vocabulary per rank).
# Row statistics travel as small fp32 [N, 2] tensors, so ranks can all-gather them cheaply.
# ----------------------------------------------------------------------------------------------
def _use_triton(logits: Tensor) -> bool:
    """Vocabulary-slice pieces: Triton on CUDA (or under the interpreter), torch otherwise."""
    return HAS_TRITON and (logits.is_cuda or _interpreting())


def _normalized_chunks(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor, norm: Tensor):
    """fp32 LayerNorm output of a slice, a memory-budgeted chunk of rows at a time (CPU path)."""
    rows = chunk_rows(logits.shape[1], torch.float32)
    w, b = ln_weight.float(), ln_bias.float()
    for start in range(0, logits.shape[0], rows):
        stop = start + rows
        mean, rstd = norm[start:stop, 0:1].float(), norm[start:stop, 1:2].float()
        yield start, stop, (logits[start:stop].float() - mean) * rstd * w + b


def _torch_ln_partial_stats(logits: Tensor) -> Tensor:
    ln = torch.empty((logits.shape[0], 2), dtype=torch.float32, device=logits.device)
    rows = chunk_rows(logits.shape[1], torch.float32)
    for start in range(0, logits.shape[0], rows):
        x = logits[start:start + rows].float()
        mean = x.mean(dim=1)
        ln[start:start + rows, 0] = mean
        ln[start:start + rows, 1] = ((x - mean[:, None]) ** 2).sum(dim=1)
    return ln


def _torch_softmax_partial_stats(logits, ln_weight, ln_bias, norm) -> Tensor:
    sm = torch.empty((logits.shape[0], 2), dtype=torch.float32, device=logits.device)
    for start, stop, y in _normalized_chunks(logits, ln_weight, ln_bias, norm):
        row_max = y.amax(dim=1)
        sm[start:stop, 0] = row_max
        sm[start:stop, 1] = torch.exp(y - row_max[:, None]).sum(dim=1)
    return sm


def _torch_partial_product(logits, ln_weight, ln_bias, vte, norm, sm) -> Tensor:
    table = vte[: logits.shape[1]].float()
    out = torch.empty((logits.shape[0], vte.shape[1]), dtype=torch.float32, device=logits.device)
    for start, stop, y in _normalized_chunks(logits, ln_weight, ln_bias, norm):
        torch.matmul(torch.exp(y - sm[start:stop, 0:1].float()), table, out=out[start:stop])
    return out


def ln_partial_stats(logits: Tensor) -> Tensor:
    """LayerNorm statistics of a vocabulary slice: fp32 [N, 2] = (mean of the slice's logits,
    M2 = sum of squared deviations from that mean). Centred rather than a raw sum of squares:
    exact to combine (`combine_ln_stats`) and free of cancellation when |mean| >> std."""
    if not _use_triton(logits):
        return _torch_ln_partial_stats(logits)
    ln = torch.empty((logits.shape[0], 2), dtype=torch.float32, device=logits.device)
    _launch_row_stats(logits, None, None, 0.0, ln, ln, None, LN=True, SOFTMAX=False)
    return ln


def combine_ln_stats(parts: Sequence[tuple[int, Tensor]], eps: float) -> Tensor:
    """[(slice width, ln_partial_stats)] of slices covering the row -> fp32 [N, 2] (mean, rstd)
    of the whole row (Chan et al.'s pairwise variance combination; biased variance as in
    LayerNorm)."""
    total = sum(count for count, _ in parts)
    mean = sum(count * st[:, 0] for count, st in parts) / total
    m2 = sum(st[:, 1] + count * (st[:, 0] - mean) ** 2 for count, st in parts)
    return torch.stack([mean, torch.rsqrt(m2 / total + eps)], dim=1)


def softmax_partial_stats(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                          norm: Tensor) -> Tensor:
    """Given the global (mean, rstd) [N, 2], a slice's softmax statistics of the normalized
    logits: fp32 [N, 2] = (slice max m_i, sum over the slice of exp(y - m_i))."""
    if not _use_triton(logits):
        return _torch_softmax_partial_stats(logits, ln_weight, ln_bias, norm)
    sm = torch.empty((logits.shape[0], 2), dtype=torch.float32, device=logits.device)
    _launch_row_stats(logits, ln_weight, ln_bias, 0.0, None, norm.float().contiguous(), sm,
                      LN=False, SOFTMAX=True)
    return sm


def partial_product(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor, vte: Tensor,
                    norm: Tensor, sm: Tensor, config: Optional[dict] = None) -> Tensor:
    """Unnormalized product of a slice: fp32 [N, D] = sum_j exp(y_j - sm[:, 0]) * vte[j] over the
    slice's columns j (vte holds the slice's VTE rows, at least as many as it has columns)."""
    if not _use_triton(logits):
        return _torch_partial_product(logits, ln_weight, ln_bias, vte, norm, sm)
    out = torch.empty((logits.shape[0], vte.shape[1]), dtype=torch.float32, device=logits.device)
    _launch_product(logits, ln_weight, ln_bias, vte, norm.float().contiguous(),
                    sm.float().contiguous(), out, normalize=False, config=config)
    return out


def combine_partials(parts: Sequence[tuple[Tensor, Tensor]], dtype: torch.dtype) -> Tensor:
    """[(softmax_partial_stats, partial_product)] of slices covering the row -> [N, D] in
    `dtype`. Log-sum-exp style: rescale every slice to the global max, then normalize."""
    row_max = torch.stack([sm[:, 0] for sm, _ in parts]).amax(0)
    denom = 0.0
    acc = 0.0
    for sm, prod in parts:
        scale = torch.exp(sm[:, 0] - row_max)
        denom = denom + sm[:, 1] * scale
        acc = acc + prod * scale[:, None]
    return (acc / denom[:, None]).to(dtype)


# ----------------------------------------------------------------------------------------------
# Whole-vocabulary paths
# ----------------------------------------------------------------------------------------------
def visual_embedding_triton(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor, vte: Tensor,
                            eps: float, out: Optional[Tensor] = None,
                            config: Optional[dict] = None) -> Tensor:
    """Fused Triton path on one device (pass 1 row statistics, pass 2 normalized product).
    `out` ([N, D], any strides) may be given; `config` overrides the product kernel's blocks."""
    _check_inputs(logits, ln_weight, ln_bias, vte)
    _require_triton(logits, ln_weight, ln_bias, vte)
    n, d = logits.shape[0], vte.shape[1]
    if out is None:
        out = torch.empty((n, d), dtype=vte.dtype, device=vte.device)
    elif out.shape != (n, d):
        raise ValueError(f"out must have shape {(n, d)}, got {tuple(out.shape)}")
    if n == 0:
        return out
    norm = torch.empty((n, 2), dtype=torch.float32, device=logits.device)
    sm = torch.empty_like(norm)
    # The single-device case is the one-slice case, with LN and softmax statistics in one sweep.
    _launch_row_stats(logits, ln_weight, ln_bias, float(eps), None, norm, sm, LN=True, SOFTMAX=True)
    _launch_product(logits, ln_weight, ln_bias, vte, norm, sm, out, normalize=True, config=config)
    return out


def visual_embedding_unfused(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor, vte: Tensor,
                             eps: float) -> Tensor:
    """vLLM 0.32's built-in way, kept for comparison: full LN output, softmax output and padded
    copy all alive at once (as in its VisualTokenizer.forward), then one dense matmul."""
    vh = logits.shape[1]
    y = F.layer_norm(logits, (vh,), ln_weight.to(logits.dtype), ln_bias.to(logits.dtype), eps)
    p = torch.softmax(y, dim=-1)
    p = F.pad(p, (0, vte.shape[0] - vh), mode="constant", value=0)
    return torch.matmul(p.to(vte.dtype), vte)


def chunk_rows(vh: int, dtype: torch.dtype, budget_mb: Optional[float] = None) -> int:
    """Rows per chunk for the CPU path: one [rows, Vh] intermediate (LN output, overwritten by
    the softmax) within OVIS_VISUAL_EMBED_CHUNK_MB (default 64 MiB, read at call time)."""
    if budget_mb is None:
        budget_mb = float(os.environ.get("OVIS_VISUAL_EMBED_CHUNK_MB", DEFAULT_CHUNK_MB))
    per_row = vh * torch.empty((), dtype=dtype).element_size()
    return max(1, int(budget_mb * 2**20) // per_row)


def visual_embedding_chunked(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                             vte: "Tensor | PackedMatrix", eps: float,
                             rows: Optional[int] = None) -> Tensor:
    """Exact CPU path: the unfused ops, per chunk of `rows` rows (default from the memory
    budget, see `chunk_rows`), multiplying by VTE[:Vh] so the zero padding is never built.
    `vte` may be a PackedMatrix of exactly the Vh softmax rows (the serving path on CPU)."""
    n, vh = logits.shape
    if isinstance(vte, PackedMatrix):
        if vte.shape[0] != vh:
            raise ValueError(f"packed VTE has {vte.shape[0]} rows, logits have {vh} columns")
        product = vte.matmul
    else:
        table = vte[:vh]
        product = lambda p, out: torch.matmul(p.to(table.dtype), table, out=out)  # noqa: E731
    w, b = ln_weight.to(logits.dtype), ln_bias.to(logits.dtype)
    rows = rows or chunk_rows(vh, logits.dtype)
    out = torch.empty((n, vte.shape[1]), dtype=vte.dtype, device=vte.device)
    for start in range(0, n, rows):
        p = F.layer_norm(logits[start:start + rows], (vh,), w, b, eps)
        # Softmax written over the LN output: the same kernel as torch.softmax(y) (bit-identical;
        # softmax allows full overlap of input and output), so one [rows, Vh] tensor at a time.
        torch.softmax(p, dim=-1, out=p)
        product(p, out=out[start:start + rows])
        del p  # before the next chunk's LayerNorm, else two chunks would be alive
    return out


class PackedMatrix:
    """A constant matrix B [K, N], laid out once for oneDNN's CPU matmul: `a @ B` without
    re-packing B on every call.

    This is the GEMM vLLM's own Linear layers use on CPU (vllm._custom_ops.onednn_mm, see its
    dispatch_cpu_unquantized_gemm); vLLM's built-in Ovis gets it for its head Linear but not for
    its VTE product. Measured on the 2-vCPU CI machine, one thread, bf16: [512, 65531] @
    [65531, 3584] in 0.49 s against 0.60 s for torch.matmul, and [1960, 4608] @ [4608, 65531]
    in 2.44 s against 2.55 s for F.linear; bf16 results are bit-identical to torch's (fp32
    ones differ in summation order only). The packed copy is separate from B: drop B after.
    """

    def __init__(self, b: Tensor):
        if not PackedMatrix.supported(b):
            raise ValueError(f"cannot pack a {b.dtype} matrix on {b.device} for oneDNN")
        from vllm import _custom_ops as ops

        self.shape, self.dtype, self.device = tuple(b.shape), b.dtype, b.device
        self._handler = ops.create_onednn_mm(b, 32)

    @staticmethod
    def supported(b: Tensor) -> bool:
        """oneDNN packing is available for this matrix: CPU, bf16 or fp32, vLLM's CPU ops."""
        if b.device.type != "cpu" or b.dtype not in (torch.bfloat16, torch.float32) or b.dim() != 2:
            return False
        try:
            from vllm import _custom_ops as ops
        except ImportError:
            return False
        return bool(getattr(ops, "_supports_onednn", False))

    def matmul(self, a: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """a [..., K] (any dtype, cast to B's) @ B -> [..., N]; `out` a contiguous [M, N]."""
        k, n = self.shape
        a2 = a.to(self.dtype).reshape(-1, k)
        if a2.stride(-1) != 1:
            a2 = a2.contiguous()
        if out is None:
            out = torch.empty((a2.shape[0], n), dtype=self.dtype)
        torch.ops._C.onednn_mm(out, a2, None, self._handler.handler_tensor)
        return out.reshape(*a.shape[:-1], n)


# ----------------------------------------------------------------------------------------------
# Public entry point: validation, dispatch, custom op
# ----------------------------------------------------------------------------------------------
def _check_inputs(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor, vte: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, Vh], got shape {tuple(logits.shape)}")
    vh = logits.shape[1]
    if vh == 0:
        raise ValueError("logits must have at least one column")
    if ln_weight.shape != (vh,) or ln_bias.shape != (vh,):
        raise ValueError(f"ln_weight and ln_bias must be [{vh}], got {tuple(ln_weight.shape)} "
                         f"and {tuple(ln_bias.shape)}")
    if vte.dim() != 2 or vte.shape[0] < vh:
        raise ValueError(f"vte must be [V, D] with V >= Vh={vh}, got {tuple(vte.shape)}")
    for name, t in (("logits", logits), ("ln_weight", ln_weight), ("ln_bias", ln_bias),
                    ("vte", vte)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: bf16, fp16, fp32")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits are on {logits.device}")


def _dispatch(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor, vte: Tensor,
              eps: float) -> Tensor:
    mode = os.environ.get("OVIS_VISUAL_EMBED", "auto").lower()
    if mode == "unfused":
        return visual_embedding_unfused(logits, ln_weight, ln_bias, vte, eps)
    if mode == "triton" or (mode == "auto" and logits.is_cuda):
        return visual_embedding_triton(logits, ln_weight, ln_bias, vte, eps)
    if mode in ("auto", "chunked"):
        return visual_embedding_chunked(logits, ln_weight, ln_bias, vte, eps)
    raise ValueError(f"OVIS_VISUAL_EMBED={mode!r}: expected auto, unfused, chunked or triton")


@torch.library.custom_op("ovis::visual_embedding", mutates_args=())
def _visual_embedding_op(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor, vte: Tensor,
                         eps: float) -> Tensor:
    _check_inputs(logits, ln_weight, ln_bias, vte)
    return _dispatch(logits, ln_weight, ln_bias, vte, eps)


@_visual_embedding_op.register_fake
def _(logits, ln_weight, ln_bias, vte, eps):
    _check_inputs(logits, ln_weight, ln_bias, vte)
    return logits.new_empty((logits.shape[0], vte.shape[1]), dtype=vte.dtype)


def visual_embedding(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                     vte: "Tensor | PackedMatrix", eps: float) -> Tensor:
    """Ovis visual embeddings: softmax(LayerNorm(logits)) padded with zeros, @ VTE.

    logits [N, Vh] (bf16/fp16/fp32), ln_weight/ln_bias [Vh], vte [V, D] with V >= Vh (only rows
    [:Vh] are read), eps the LayerNorm epsilon. Returns [N, D] in vte's dtype. Any strides.
    CUDA -> fused Triton kernels, otherwise the chunked exact CPU path; OVIS_VISUAL_EMBED
    (read at each call) forces "unfused", "chunked" or "triton". A PackedMatrix of the Vh
    softmax rows goes straight to the chunked CPU path (it is not a tensor the op could take).
    """
    if isinstance(vte, PackedMatrix):
        return visual_embedding_chunked(logits, ln_weight, ln_bias, vte, eps)
    _check_inputs(logits, ln_weight, ln_bias, vte)
    return torch.ops.ovis.visual_embedding(logits, ln_weight, ln_bias, vte, float(eps))
