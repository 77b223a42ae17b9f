"""What vLLM's CPU backend cannot run on this CPU, found before an engine starts.

vLLM 0.32's CPU GPTQ layers (CPUWNA16LinearKernel) call `torch.ops._C.cpu_gemm_wna16`, which
its AVX2 build (`_C_AVX2`, loaded on CPUs without AVX-512) does not have. vLLM alone then
starts and its engine dies at the first forward pass with an AttributeError; we refuse at start
instead, naming the reason (server.py and the model both ask here).
"""
from __future__ import annotations

from ovis_vllm.kernels.cpu import cpu_features

# Quantization methods whose vLLM CPU layers need `cpu_gemm_wna16`.
WNA16_METHODS = ("gptq",)


def quant_method(hf_config) -> str | None:
    """The checkpoint's `quantization_config.quant_method`, lower case, or None."""
    quant = getattr(hf_config, "quantization_config", None) or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(method).lower() if method else None


def wna16_kernel_available() -> bool:
    """vLLM's CPU kernels loaded here have `cpu_gemm_wna16` (its AVX-512 build does)."""
    import torch

    from vllm import _custom_ops  # noqa: F401  loads vLLM's CPU kernels into torch.ops._C

    return hasattr(torch.ops._C, "cpu_gemm_wna16")


def cpu_cannot_serve(hf_config) -> str | None:
    """Why vLLM's CPU backend cannot serve this checkpoint on this CPU, or None where it can
    (and on any platform other than vLLM's CPU one)."""
    from vllm.platforms import current_platform

    method = quant_method(hf_config)
    if method not in WNA16_METHODS or not current_platform.is_cpu() or wna16_kernel_available():
        return None
    return (f"this {method.upper()} checkpoint cannot be served on this CPU ({cpu_features()}): "
            f"vLLM's CPU backend runs {method.upper()} layers with cpu_gemm_wna16, which its AVX2 "
            f"build does not have (vLLM alone starts, then fails at the first request). Serve a "
            f"floating-point checkpoint of the same model here, or this one on a CPU with AVX-512 "
            f"or on a GPU")
