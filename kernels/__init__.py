"""Custom kernels for serving Ovis."""
from kernels.visual_embed import (
    PackedMatrix,
    chunk_rows,
    combine_ln_stats,
    combine_partials,
    ln_partial_stats,
    partial_product,
    softmax_partial_stats,
    visual_embedding,
    visual_embedding_chunked,
    visual_embedding_triton,
    visual_embedding_unfused,
)

__all__ = [
    "PackedMatrix",
    "chunk_rows",
    "combine_ln_stats",
    "combine_partials",
    "ln_partial_stats",
    "partial_product",
    "softmax_partial_stats",
    "visual_embedding",
    "visual_embedding_chunked",
    "visual_embedding_triton",
    "visual_embedding_unfused",
]
