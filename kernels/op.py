"""`visual_embedding`: the entry point the model calls, a torch custom op.

"ovis::visual_embedding" has a fake implementation, so torch.compile can trace it and CUDA
graphs can capture it. Which path runs is an argument, `impl`:
  "auto"     CUDA tensors -> the fused Triton kernels, anything else -> the chunked CPU path;
  "triton", "chunked", "unfused" force one (unfused: vLLM's built-in way, for comparison).
The caller decides; nothing here reads the environment (the engine takes the choice from
vLLM's --additional-config once, when the model is built).
"""
import torch
from torch import Tensor

from ovis_vllm.kernels.cpu import (
    DEFAULT_CHUNK_MB,
    PackedMatrix,
    visual_embedding_chunked,
    visual_embedding_unfused,
)
from ovis_vllm.kernels.inputs import check_inputs
from ovis_vllm.kernels.triton_kernels import visual_embedding_triton

IMPLEMENTATIONS = ("auto", "triton", "chunked", "unfused")


def check_impl(impl: str) -> None:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"visual embedding implementation {impl!r}: expected one of "
                         f"{', '.join(IMPLEMENTATIONS)}")


@torch.library.custom_op("ovis::visual_embedding", mutates_args=())
def _visual_embedding_op(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor, vte: Tensor,
                         eps: float, impl: str, chunk_mb: float) -> Tensor:
    check_inputs(logits, ln_weight, ln_bias, vte)
    if impl == "unfused":
        return visual_embedding_unfused(logits, ln_weight, ln_bias, vte, eps)
    if impl == "triton" or (impl == "auto" and logits.is_cuda):
        return visual_embedding_triton(logits, ln_weight, ln_bias, vte, eps)
    return visual_embedding_chunked(logits, ln_weight, ln_bias, vte, eps, chunk_mb=chunk_mb)


@_visual_embedding_op.register_fake
def _(logits, ln_weight, ln_bias, vte, eps, impl, chunk_mb):
    check_inputs(logits, ln_weight, ln_bias, vte)
    return logits.new_empty((logits.shape[0], vte.shape[1]), dtype=vte.dtype)


def visual_embedding(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                     vte: "Tensor | PackedMatrix", eps: float, impl: str = "auto",
                     chunk_mb: float = DEFAULT_CHUNK_MB) -> Tensor:
    """Ovis visual embeddings: softmax(LayerNorm(logits)) padded with zeros, @ VTE.

    logits [N, Vh] (bf16/fp16/fp32), ln_weight/ln_bias [Vh], vte [V, D] with V >= Vh (only rows
    [:Vh] are read), eps the LayerNorm epsilon. Returns [N, D] in vte's dtype. Any strides.
    `impl` picks the path (module docstring); `chunk_mb` is the CPU path's memory budget for one
    [rows, Vh] intermediate. A PackedMatrix of the Vh softmax rows goes straight to the chunked
    CPU path (it is not a tensor the op could take).
    """
    check_impl(impl)
    if isinstance(vte, PackedMatrix):
        if impl not in ("auto", "chunked"):
            raise ValueError(f"a packed VTE runs on the chunked CPU path, not {impl!r}")
        return visual_embedding_chunked(logits, ln_weight, ln_bias, vte, eps, chunk_mb=chunk_mb)
    check_inputs(logits, ln_weight, ln_bias, vte)
    return torch.ops.ovis.visual_embedding(logits, ln_weight, ln_bias, vte, float(eps), impl,
                                           float(chunk_mb))
