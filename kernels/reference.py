"""Float64 reference of Ovis's probabilistic visual embedding (tests and benchmarks only).

Follows the model's definition literally (see docs/reference.md): LayerNorm over the Vh = V-5
head logits, softmax, pad the probability vector with zeros to width V, multiply by the whole
visual embedding table (VTE). Everything is done in float64, so its own rounding error
(~1e-16 relative) is negligible next to any bf16/fp16/fp32 implementation under test.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def visual_embedding_reference(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                               vte: Tensor, eps: float) -> Tensor:
    """[N, Vh] logits -> [N, D] float64 visual embeddings (on the inputs' device)."""
    vh = logits.shape[-1]
    x = logits.double()
    y = F.layer_norm(x, (vh,), ln_weight.double(), ln_bias.double(), eps)
    p = torch.softmax(y, dim=-1)
    p = F.pad(p, (0, vte.shape[0] - vh))  # the indicator rows get probability exactly 0
    return p @ vte.double()


def row_stats_reference(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                        eps: float) -> dict[str, Tensor]:
    """Float64 row statistics the fused kernels compute: LayerNorm mean/rstd and the softmax
    max / sum of exp(y - max) of the normalized logits y."""
    x = logits.double()
    mean = x.mean(-1)
    var = x.var(-1, unbiased=False)
    rstd = torch.rsqrt(var + eps)
    y = (x - mean[:, None]) * rstd[:, None] * ln_weight.double() + ln_bias.double()
    row_max = y.max(-1).values
    sumexp = torch.exp(y - row_max[:, None]).sum(-1)
    return {"mean": mean, "rstd": rstd, "max": row_max, "sumexp": sumexp}
