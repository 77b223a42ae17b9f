"""What every path of the visual embedding accepts, checked in one place."""
import torch
from torch import Tensor

NUM_INDICATORS = 5  # VTE rows reserved for the image indicators, never hit by the softmax
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_inputs(logits: Tensor, ln_weight: Tensor, ln_bias: Tensor, vte: Tensor) -> None:
    """logits [N, Vh], ln_weight/ln_bias [Vh], vte [V >= Vh, D]; bf16/fp16/fp32, one device."""
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
