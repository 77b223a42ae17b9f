"""The exact CPU path of softmax(LayerNorm(logits)) @ VTE, with the VTE packed once for oneDNN,
and vLLM's built-in (unfused) way it is compared with.

`visual_embedding_chunked` runs the very torch ops of the unfused path, in the input dtype, on
row chunks sized from a memory budget (one [rows, Vh] tensor at a time), multiplying by VTE[:Vh]
so the zero padding is never built; results match the unfused path up to matmul rounding.
Serving packs the VTE rows once (`PackedMatrix`, oneDNN) and each chunk's product runs on the
pre-laid-out table (faster than torch.matmul: benchmarks/RESULTS.md), wherever vLLM's own Linear
layers would get oneDNN for that dtype on this CPU (`onednn_unavailable`); elsewhere torch.matmul.
"""
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_CHUNK_MB = 64.0


def visual_embedding_unfused(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor, vte: Tensor,
                             eps: float) -> Tensor:
    """vLLM 0.32's built-in way, kept for comparison: full LN output, softmax output and padded
    copy all alive at once (as in its VisualTokenizer.forward), then one dense matmul."""
    vh = logits.shape[1]
    y = F.layer_norm(logits, (vh,), ln_weight.to(logits.dtype), ln_bias.to(logits.dtype), eps)
    p = torch.softmax(y, dim=-1)
    p = F.pad(p, (0, vte.shape[0] - vh), mode="constant", value=0)
    return torch.matmul(p.to(vte.dtype), vte)


def chunk_rows(vh: int, dtype: torch.dtype, chunk_mb: float = DEFAULT_CHUNK_MB) -> int:
    """Rows per chunk: one [rows, Vh] intermediate (LN output, overwritten by the softmax)
    within `chunk_mb` MiB."""
    per_row = vh * torch.empty((), dtype=dtype).element_size()
    return max(1, int(chunk_mb * 2**20) // per_row)


def visual_embedding_chunked(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                             vte: "Tensor | PackedMatrix", eps: float,
                             rows: Optional[int] = None,
                             chunk_mb: float = DEFAULT_CHUNK_MB) -> Tensor:
    """Exact CPU path: the unfused ops, per chunk of `rows` rows (default: as many as fit in
    `chunk_mb`, see `chunk_rows`). `vte` may be a PackedMatrix of exactly the Vh softmax rows
    (the serving path on CPU)."""
    n, vh = logits.shape
    if isinstance(vte, PackedMatrix):
        if vte.shape[0] != vh:
            raise ValueError(f"packed VTE has {vte.shape[0]} rows, logits have {vh} columns")
        product = vte.matmul
    else:
        table = vte[:vh]
        product = lambda p, out: torch.matmul(p.to(table.dtype), table, out=out)  # noqa: E731
    w, b = ln_weight.to(logits.dtype), ln_bias.to(logits.dtype)
    rows = rows or chunk_rows(vh, logits.dtype, chunk_mb)
    out = torch.empty((n, vte.shape[1]), dtype=vte.dtype, device=vte.device)
    for start in range(0, n, rows):
        p = F.layer_norm(logits[start:start + rows], (vh,), w, b, eps)
        # Softmax written over the LN output: the same kernel as torch.softmax(y) (bit-identical;
        # softmax allows full overlap of input and output), so one [rows, Vh] tensor at a time.
        torch.softmax(p, dim=-1, out=p)
        product(p, out=out[start:start + rows])
        del p  # before the next chunk's LayerNorm, else two chunks would be alive
    return out


def cpu_features() -> str:
    """The vector/matrix features of this CPU that the CPU paths depend on, as torch sees them:
    "AVX2 yes, AVX-512 no, AVX-512-BF16 no, AMX no"."""
    features = {"AVX2": torch.cpu._is_avx2_supported(), "AVX-512": torch.cpu._is_avx512_supported(),
                "AVX-512-BF16": torch.cpu._is_avx512_bf16_supported(),
                "AMX": torch.cpu._is_amx_tile_supported()}
    return ", ".join(f"{name} {'yes' if has else 'no'}" for name, has in features.items())


@functools.cache
def onednn_unavailable(dtype: torch.dtype) -> Optional[str]:
    """None where vLLM's oneDNN GEMM takes a `dtype` weight on this CPU, else why it does not.

    The conditions are vLLM's own for its Linear layers (dispatch_cpu_unquantized_gemm in
    vllm/model_executor/layers/utils.py): its CPU ops built with oneDNN, not a POWER CPU, and
    oneDNN creating the matmul primitive (vLLM tries, and on RuntimeError uses torch's linear).
    oneDNN cannot create a bf16 matmul on an x86 CPU without AVX-512, so there bf16 runs on
    torch, as vLLM's layers do. Asked once per dtype, with a small matrix. fp16 is never packed.
    """
    if dtype not in (torch.bfloat16, torch.float32):
        return f"{dtype} weights are not packed (bf16 and fp32 are)"
    try:
        from vllm import _custom_ops as ops
        from vllm.platforms import CpuArchEnum, current_platform
    except ImportError:
        return "vLLM's CPU ops are not installed"
    if not getattr(ops, "_supports_onednn", False):
        return "vLLM's CPU ops were built without oneDNN"
    if current_platform.get_cpu_architecture() == CpuArchEnum.POWERPC:
        return "vLLM does not use oneDNN's GEMM on POWER"
    try:
        ops.create_onednn_mm(torch.zeros(32, 32, dtype=dtype), 32)
    except RuntimeError as error:
        first_line = str(error).split(". ")[0]
        return f"oneDNN has no {dtype} matmul on this CPU ({cpu_features()}): {first_line}"
    return None


class PackedMatrix:
    """A constant matrix B [K, N], laid out once for oneDNN's CPU matmul: `a @ B` without
    re-packing B on every call.

    This is the GEMM vLLM's own Linear layers use on CPU (vllm._custom_ops.onednn_mm, see its
    dispatch_cpu_unquantized_gemm); vLLM's built-in Ovis gets it for its head Linear but not for
    its VTE product. bf16 results are bit-identical to torch's (fp32 ones differ in summation
    order only); timings are in benchmarks/RESULTS.md. The packed copy is separate from B: drop
    B after. Only where `supported` (on this CPU, in this dtype).
    """

    def __init__(self, b: Tensor):
        if not PackedMatrix.supported(b):
            raise ValueError(f"cannot pack a {b.dtype} matrix on {b.device} for oneDNN")
        from vllm import _custom_ops as ops

        self.shape, self.dtype, self.device = tuple(b.shape), b.dtype, b.device
        self._handler = ops.create_onednn_mm(b, 32)

    @staticmethod
    def supported(b: Tensor) -> bool:
        """This matrix can be packed: a 2-D CPU tensor of a dtype vLLM's oneDNN GEMM takes on
        this CPU (`onednn_unavailable`)."""
        return b.device.type == "cpu" and b.dim() == 2 and onednn_unavailable(b.dtype) is None

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
