"""Ovis for vLLM: a general plugin that registers our reference-exact Ovis implementation.

vLLM calls `register()` in every process it starts (API server, engine core, workers); it only
records a lazy `module:class` path, so calling it again is harmless. To run vLLM's built-in Ovis
instead (for comparisons), start vLLM with `VLLM_PLUGINS=none`.
"""

OVIS_ARCHITECTURE = "Ovis"
OVIS_MODEL_PATH = "engine.model:Ovis"


def register() -> None:
    from vllm import ModelRegistry

    ModelRegistry.register_model(OVIS_ARCHITECTURE, OVIS_MODEL_PATH)
