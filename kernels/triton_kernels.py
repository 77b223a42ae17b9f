"""Triton kernels of softmax(LayerNorm(logits)) @ VTE, and their launchers.

Two passes, never materializing the [N, Vh] probabilities:
  pass 1 `_row_stats_kernel`: per row, the LayerNorm mean/rstd (Chan's parallel variance) and the
      softmax max and sum-exp of the normalized logits (the second sweep mostly hits L2);
  pass 2 `_product_kernel`: a GEMM over the vocabulary whose A tile exp(LN(x) - max) is built
      on the fly from the logits, fp32 accumulation, divided by the sum-exp at the end.
Run on a slice of the vocabulary, the same kernels give the pieces of the vocabulary-parallel
split (kernels/vocab_parallel.py): `_ln_moments_kernel` for the slice's LayerNorm moments,
`_row_stats_kernel` given the whole row's (mean, rstd), `_product_kernel` unnormalized.

Optional inputs are compile-time flags (`triton.heuristics` on a None argument), so every
pointer has one role and nothing is passed as a dummy.

CUDA only; on CPU under TRITON_INTERPRET=1 (set before this module is imported: triton.jit picks
the interpreter at decoration time), which is how the tests run them without a GPU.
"""
from typing import Optional

import torch
from torch import Tensor

from ovis_vllm.kernels.inputs import check_inputs

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # a CPU-only install: the torch paths still work
    HAS_TRITON = False


if HAS_TRITON:
    # exp(z) = exp2(z * log2(e)): exp2 is the hardware instruction. A kernel may only read
    # constexpr globals.
    LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)

    @triton.jit
    def _ln_moments(x_rows, row_mask, Vh, stride_xv, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
        """(mean, M2) of each row's Vh logits, merged block by block (Chan et al.). A plain sum
        of squares would cancel catastrophically in fp32 when |mean| >> std."""
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
        return mean, m2

    @triton.jit
    def _normalized_tile(x_rows, cols, col_mask, row_mask, w_ptr, b_ptr, mean, rstd,
                         stride_xv, stride_w, stride_b):
        """fp32 LayerNorm output y of a [rows, cols] tile of logits (0 where masked)."""
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_rows + cols[None, :] * stride_xv, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols * stride_w, mask=col_mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols * stride_b, mask=col_mask, other=0.0).to(tl.float32)
        return (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]

    @triton.jit
    def _ln_moments_kernel(
        x_ptr, moments_ptr,  # moments: [N, 2] fp32 out (mean, M2) of this slice
        N, Vh, stride_xm, stride_xv,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm  # int64: N * Vh may pass 2^31
        mean, m2 = _ln_moments(x_rows, row_mask, Vh, stride_xv, BLOCK_M, BLOCK_V)
        tl.store(moments_ptr + rows * 2, mean, mask=row_mask)
        tl.store(moments_ptr + rows * 2 + 1, m2, mask=row_mask)

    @triton.heuristics({"NORM_GIVEN": lambda args: args["norm_in_ptr"] is not None})
    @triton.jit
    def _row_stats_kernel(
        x_ptr, w_ptr, b_ptr,
        norm_in_ptr,   # [N, 2] fp32 (mean, rstd) of the whole row, or None: computed here
        norm_out_ptr,  # [N, 2] fp32 out (mean, rstd), or None when given
        sm_ptr,        # [N, 2] fp32 out (max, sum exp(y - max)) over this program's columns
        N, Vh, eps,
        stride_xm, stride_xv, stride_w, stride_b,
        NORM_GIVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
        if NORM_GIVEN:  # a vocabulary slice: the row's statistics come from all slices
            mean = tl.load(norm_in_ptr + rows * 2, mask=row_mask, other=0.0)
            rstd = tl.load(norm_in_ptr + rows * 2 + 1, mask=row_mask, other=0.0)
        else:  # this program sees the whole row
            mean, m2 = _ln_moments(x_rows, row_mask, Vh, stride_xv, BLOCK_M, BLOCK_V)
            rstd = tl.rsqrt(m2 / Vh + eps)
            tl.store(norm_out_ptr + rows * 2, mean, mask=row_mask)
            tl.store(norm_out_ptr + rows * 2 + 1, rstd, mask=row_mask)

        # Online max / sum-exp (running sum rescaled when the max grows).
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_M], tl.float32)
        for v0 in range(0, Vh, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < Vh
            y = _normalized_tile(x_rows, cols, col_mask, row_mask, w_ptr, b_ptr, mean, rstd,
                                 stride_xv, stride_w, stride_b)
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
            y = _normalized_tile(x_rows, cols, col_mask, row_mask, w_ptr, b_ptr, mean, rstd,
                                 stride_xv, stride_w, stride_b)
            mask = row_mask[:, None] & col_mask[None, :]
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
INTERPRETED = HAS_TRITON and type(_product_kernel).__name__ == "InterpretedFunction"


def triton_usable(*tensors: Tensor) -> bool:
    """Triton can run on these tensors: CUDA, or any tensor under the interpreter."""
    return HAS_TRITON and (INTERPRETED or all(t.is_cuda for t in tensors))


def require_triton(*tensors: Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    if not triton_usable(*tensors):
        raise ValueError("the Triton path needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------
def stats_config() -> dict:
    if INTERPRETED:
        return dict(BLOCK_M=4, BLOCK_V=64, num_warps=1)
    # Row statistics are memory-bound: a few rows per program, wide loads along the row.
    return dict(BLOCK_M=2, BLOCK_V=2048, num_warps=8)


def product_blocks(dtype: torch.dtype) -> dict:
    """Block sizes of the product kernel. Not timed on a GPU yet (benchmarks/visual_embed.py
    --sweep does); chosen from ahead-of-time sm_90 compiles: no register spills and VTE tiles
    pipelined with cp.async. fp32 (tests only) needs smaller tiles."""
    if INTERPRETED:
        return dict(BLOCK_M=16, BLOCK_V=64, BLOCK_D=32, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_V=32, BLOCK_D=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_V=32, BLOCK_D=256, num_warps=8, num_stages=4)


def product_config(n: int, d: int, dtype: torch.dtype, device: torch.device) -> dict:
    cfg = product_blocks(dtype)
    cfg["SPLIT"] = 1
    if device.type == "cuda":
        # Few rows (one crop: N=196) give too few tiles to fill the GPU: split the vocabulary.
        tiles = triton.cdiv(n, cfg["BLOCK_M"]) * triton.cdiv(d, cfg["BLOCK_D"])
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        cfg["SPLIT"] = max(1, min(8, sms // tiles))
    return cfg


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def ln_moments(logits: Tensor) -> Tensor:
    """fp32 [N, 2] (mean, M2) of each row of `logits` (a vocabulary slice)."""
    n, vh = logits.shape
    moments = torch.empty((n, 2), dtype=torch.float32, device=logits.device)
    cfg = stats_config()
    _ln_moments_kernel[(triton.cdiv(n, cfg["BLOCK_M"]),)](
        logits, moments, n, vh, logits.stride(0), logits.stride(1), **cfg)
    return moments


def row_stats(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float,
              norm: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(norm, sm), fp32 [N, 2] each: the LayerNorm (mean, rstd) and the softmax (max, sum-exp)
    of the normalized logits over the columns of `logits`. With `norm` given (the whole row's
    statistics, for a vocabulary slice) it is used, not computed."""
    n, vh = logits.shape
    sm = torch.empty((n, 2), dtype=torch.float32, device=logits.device)
    norm_out = None if norm is not None else torch.empty_like(sm)
    cfg = stats_config()
    _row_stats_kernel[(triton.cdiv(n, cfg["BLOCK_M"]),)](
        logits, ln_weight, ln_bias, norm, norm_out, sm,
        n, vh, eps, logits.stride(0), logits.stride(1), ln_weight.stride(0), ln_bias.stride(0),
        **cfg)
    return (norm if norm is not None else norm_out), sm


def product(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor, vte: Tensor, norm: Tensor,
            sm: Tensor, out: Tensor, normalize: bool, config: Optional[dict] = None) -> None:
    """normalize=True: out [N, D] (any float dtype) = the softmax product. normalize=False:
    out [N, D] fp32 = sum_j exp(y_j - max) * VTE[j] (unnormalized partial product)."""
    n, vh = logits.shape
    d = vte.shape[1]
    cfg = dict(config or product_config(n, d, vte.dtype, logits.device))
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
        NORMALIZE=normalize and split == 1, DOT_FP32=INTERPRETED or vte.dtype == torch.float32,
        **cfg)
    if split > 1:
        acc = target.sum(0)
        if normalize:
            acc = acc / sm[:, 1:2]
        out.copy_(acc)


def visual_embedding_triton(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor, vte: Tensor,
                            eps: float, out: Optional[Tensor] = None,
                            config: Optional[dict] = None) -> Tensor:
    """Fused Triton path on one device (pass 1 row statistics, pass 2 normalized product).
    `out` ([N, D], any strides) may be given; `config` overrides the product kernel's blocks."""
    check_inputs(logits, ln_weight, ln_bias, vte)
    require_triton(logits, ln_weight, ln_bias, vte)
    n, d = logits.shape[0], vte.shape[1]
    if out is None:
        out = torch.empty((n, d), dtype=vte.dtype, device=vte.device)
    elif out.shape != (n, d):
        raise ValueError(f"out must have shape {(n, d)}, got {tuple(out.shape)}")
    if n == 0:
        return out
    norm, sm = row_stats(logits, ln_weight, ln_bias, float(eps))
    product(logits, ln_weight, ln_bias, vte, norm, sm, out, normalize=True, config=config)
    return out
