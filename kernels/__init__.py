"""The fused probabilistic visual embedding of Ovis: softmax(LayerNorm(logits)) @ VTE.

Per visual token (row) the model computes, over the Vh = V - 5 head logits x:
    y = LayerNorm(x) (weight, bias, eps)      p = softmax(y)      e = [p, 0,0,0,0,0] @ VTE
The 5 padded probabilities are exactly zero, so only VTE[:Vh] contributes and is ever read.
vLLM's built-in path materializes three [N, V]-sized tensors (LN output, softmax output, padded
copy) before one dense matmul; none of the paths here does.

    op.py              `visual_embedding`, the custom op the model calls, path chosen by argument
    triton_kernels.py  the two-pass fused Triton kernels (CUDA) and their launchers
    cpu.py             the exact chunked CPU path, oneDNN packing (`PackedMatrix`), the unfused way
    vocab_parallel.py  the same with the visual vocabulary split across tensor-parallel ranks
    inputs.py          what every path accepts
    reference.py       the float64 reference (tests and benchmarks)
"""
from ovis_vllm.kernels.cpu import (
    DEFAULT_CHUNK_MB,
    PackedMatrix,
    chunk_rows,
    cpu_features,
    onednn_unavailable,
    visual_embedding_chunked,
    visual_embedding_unfused,
)
from ovis_vllm.kernels.inputs import NUM_INDICATORS
from ovis_vllm.kernels.op import IMPLEMENTATIONS, check_impl, visual_embedding
from ovis_vllm.kernels.triton_kernels import visual_embedding_triton
from ovis_vllm.kernels.vocab_parallel import vocab_parallel_visual_embedding

__all__ = [
    "DEFAULT_CHUNK_MB",
    "IMPLEMENTATIONS",
    "NUM_INDICATORS",
    "PackedMatrix",
    "check_impl",
    "chunk_rows",
    "cpu_features",
    "onednn_unavailable",
    "visual_embedding",
    "visual_embedding_chunked",
    "visual_embedding_triton",
    "visual_embedding_unfused",
    "vocab_parallel_visual_embedding",
]
