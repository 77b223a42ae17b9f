"""Ovis for vLLM: a general plugin that registers our reference-exact Ovis implementation.

vLLM calls `register()` in every process it starts (API server, engine core, workers); it only
records a lazy `module:class` path, so calling it again is harmless. To run vLLM's built-in Ovis
instead (for comparisons), start vLLM with `VLLM_PLUGINS=none`. The plugin also selects our
media connector (VLLM_MEDIA_CONNECTOR=ovis, unless set) for `image_url` inputs.
"""

OVIS_ARCHITECTURE = "Ovis"
OVIS_MODEL_PATH = "engine.model:Ovis"


def register() -> None:
    import os

    from vllm import ModelRegistry

    # Image URLs decoded as the reference sees them, under a URL policy (engine/media.py).
    os.environ.setdefault("VLLM_MEDIA_CONNECTOR", "ovis")
    ModelRegistry.register_model(OVIS_ARCHITECTURE, OVIS_MODEL_PATH)
    from . import media  # noqa: F401  registers the "ovis" media connector (VLLM_MEDIA_CONNECTOR=ovis)
