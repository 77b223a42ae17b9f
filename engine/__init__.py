"""Ovis for vLLM: a general plugin that registers our reference-exact Ovis implementation.

vLLM calls `register()` in every process it starts (API server, engine core, workers); it only
records lazy `module:class` paths, so calling it again is harmless. It registers
- our Ovis model and processor for the "Ovis" architecture (engine/model.py: Ovis1.6, Ovis2) and
  for "Ovis2_5", "Ovis2_6ForCausalLM", "Ovis2_6_MoeForCausalLM" (engine/model_ovis2_5.py);
  checkpoints we do not implement are handed to vLLM's built-in class there;
- config classes for the Ovis2.5/2.6 checkpoints (engine/configs.py), so they load without
  --trust-remote-code;
- our renderer for vLLM's "hf" renderer mode (engine/renderer.py): it tokenizes Ovis prompts the
  reference's way and behaves exactly as vLLM's for every other model;
- our media connector for `image_url` inputs (VLLM_MEDIA_CONNECTOR=ovis, unless set) and our
  video loader (VLLM_VIDEO_LOADER_BACKEND=ovis, unless set: vLLM's, plus the reference guides'
  frame sampling as an option, engine/video.py);
- for every model it serves, the repair of vLLM's multimodal processor cache
  (engine/processor_cache.py): refused requests leave no stale entry, and cache drift is
  resent once by the server instead of answered with HTTP 500;
- LoRA adapter checks (engine/lora.py): an adapter of the visual tokenizer is refused, naming its
  modules, and one the engine cannot load gets HTTP 400 from /v1/load_lora_adapter, not 500.
To run vLLM's built-in Ovis instead (for comparisons), start vLLM with `VLLM_PLUGINS=none`.
Each process logs once that the plugin is active, with its version and the vLLM it supports
(and a warning where another vLLM is installed).
"""

OVIS_ARCHITECTURE = "Ovis"
OVIS_MODEL_PATH = "ovis_vllm.engine.model:Ovis"
OVIS2_5_MODEL_PATH = "ovis_vllm.engine.model_ovis2_5:Ovis2_5"


def register() -> None:
    import os

    _log_like_vllm()

    from vllm import ModelRegistry
    from vllm.renderers.registry import RENDERER_REGISTRY

    # Image URLs decoded as the reference sees them, under a URL policy (engine/media.py).
    os.environ.setdefault("VLLM_MEDIA_CONNECTOR", "ovis")
    from .configs import register_configs
    from .members import OVIS2_5_ARCHITECTURES

    register_configs()
    ModelRegistry.register_model(OVIS_ARCHITECTURE, OVIS_MODEL_PATH)
    for architecture in OVIS2_5_ARCHITECTURES:
        ModelRegistry.register_model(architecture, OVIS2_5_MODEL_PATH)
    # Set directly: RendererRegistry.register() would log an "overwritten" warning per process.
    RENDERER_REGISTRY.renderers["hf"] = ("ovis_vllm.engine.renderer", "OvisHfRenderer")
    from . import media  # noqa: F401  registers the "ovis" media connector (VLLM_MEDIA_CONNECTOR=ovis)
    # vLLM's video loader with the reference guides' frame sampling as options (engine/video.py).
    os.environ.setdefault("VLLM_VIDEO_LOADER_BACKEND", "ovis")
    from . import video  # noqa: F401  registers the "ovis" video loader
    from .processor_cache import install as keep_processor_cache_true

    keep_processor_cache_true()  # no 5xx after refused requests (engine/processor_cache.py)
    from .lora import install as check_lora_adapters

    check_lora_adapters()  # adapters that would not apply are refused with 400 (engine/lora.py)
    _log_active_once()


_logged = False


def _log_like_vllm() -> None:
    """Our modules' logs (logger names under `ovis_vllm`) go through vLLM's `vllm` logger: its
    handlers, level and format, as they are when a line is logged. vLLM configures only that
    logger, and in the process that builds an engine it does so after plugins load, so a copy of
    its handlers taken here would be empty there and an INFO line of ours would go nowhere."""
    import logging

    logging.getLogger("ovis_vllm").parent = logging.getLogger("vllm")


def _log_active_once() -> None:
    global _logged
    if _logged:
        return
    _logged = True
    import vllm
    from vllm.logger import init_logger

    from ovis_vllm import SUPPORTED_VLLM_VERSION, __version__, vllm_version_problem

    logger = init_logger(__name__)
    logger.info("ovis-vllm %s plugin active (made for vLLM %s; vLLM %s installed): the %r "
                "architecture is served by %s, Ovis2.5/2.6 by %s", __version__, SUPPORTED_VLLM_VERSION,
                vllm.__version__, OVIS_ARCHITECTURE, OVIS_MODEL_PATH, OVIS2_5_MODEL_PATH)
    if problem := vllm_version_problem():
        logger.warning(problem)
