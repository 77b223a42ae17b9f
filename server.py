"""`python server.py [any vllm serve flag ...]` from a checkout: the OpenAI-compatible Ovis server,
ovis_vllm/server.py (installed as `ovis-serve` and `python -m ovis_vllm.server`)."""

from ovis_vllm.server import main

if __name__ == "__main__":
    main()
