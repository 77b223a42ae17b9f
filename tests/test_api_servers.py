"""server.py --api-server-count 2 runs vLLM's serve command: two API-server processes share the
port, and each runs our plugin (media connector, URL policy, renderer) and request body cap."""

from __future__ import annotations

import contextlib

import httpx
import psutil
import pytest

from tests.helpers import SIDE, data_url, png_bytes, rand_image, running_server

MODEL = "ovis-two-fronts"
MAX_REQUEST_BYTES = 1 << 20
IMAGE = data_url(png_bytes(rand_image(2 * SIDE, SIDE, 21)))


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    args = ["--model", str(tiny_checkpoint), "--served-model-name", MODEL, "--dtype", "float32",
            "--enforce-eager", "--max-num-seqs", "4", "--seed", "0", "--api-server-count", "2",
            "--max-request-bytes", str(MAX_REQUEST_BYTES)]
    log = tmp_path_factory.mktemp("api-servers") / "server.log"
    with running_server(args, log, env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as base:
        yield base, log


def ask(http: httpx.Client, content) -> httpx.Response:
    return http.post("/v1/chat/completions", json={
        "model": MODEL, "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": content}]})


def image_question(url: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe."}]


def test_each_api_server_process_runs_the_plugin(server):
    base, _ = server
    answers = []
    with contextlib.ExitStack() as stack:
        # A new connection per client, all kept open: the processes take turns accepting them.
        for _ in range(16):
            http = stack.enter_context(httpx.Client(base_url=base, timeout=120))
            local = ask(http, image_question("file:///etc/passwd"))  # vLLM alone: HTTP 500
            assert local.status_code == 400 and "--allowed-local-media-path" in local.text, local.text
            private = ask(http, image_question("http://127.0.0.1:9/x.png"))  # our URL policy
            assert private.status_code == 400 and "non-public address" in private.text, private.text
            marker = ask(http, "What is <image>?")  # our renderer
            assert marker.status_code == 400 and "no image was given" in marker.text, marker.text
            big = ask(http, "x" * MAX_REQUEST_BYTES)  # our middleware, configured from server.py
            assert big.status_code == 413 and "--max-request-bytes" in big.text, big.text
            good = ask(http, image_question(IMAGE))
            assert good.status_code == 200, good.text
            answers.append((good.json()["choices"][0]["message"]["content"],
                            good.json()["usage"]["prompt_tokens"]))
        port = int(base.rsplit(":", 1)[1])
        serving = {c.pid for c in psutil.net_connections("tcp")
                   if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED}
    assert len(set(answers)) == 1, answers
    assert len(serving) == 2, serving  # two API-server processes held the clients' connections


def test_the_log_names_the_plugin_and_the_visual_embedding_path(server):
    """Every vLLM process says the plugin is active (two API servers, the engine core, its
    worker), and the model says once which visual-embedding path and GEMMs it runs, and why."""
    import torch

    from ovis_vllm import SUPPORTED_VLLM_VERSION, __version__
    from ovis_vllm.kernels import onednn_unavailable

    _, log = server
    text = log.read_text()
    assert text.count(f"ovis-vllm {__version__} plugin active (made for vLLM {SUPPORTED_VLLM_VERSION}") >= 4
    assert "supports vLLM" not in text  # no version warning: the installed vLLM is the supported one
    packed = "oneDNN, packed" if onednn_unavailable(torch.float32) is None else "torch"
    line = f"Ovis visual embedding: chunked CPU path, torch.float32; head GEMM on {packed}, VTE product on {packed}"
    assert text.count(line) == 1, [t for t in text.splitlines() if "visual embedding" in t]
