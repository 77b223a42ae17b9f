"""No 5xx after refused requests: vLLM's multimodal processor cache in the API server (P0) stays
true to the engine's (P1), and drift that still happens is resent by the server itself
(engine/processor_cache.py).

vLLM 0.32 alone (VLLM_PLUGINS=none) answers the first good request below with HTTP 500: the
refused requests left P0 listing an image P1 never received, so it was sent without its data.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.helpers import SIDE, data_url, png_bytes, rand_image, running_server

MODEL = "ovis"


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("processor-cache") / "server.log"
    args = ["--model", str(tiny_checkpoint), "--served-model-name", MODEL, "--dtype", "float32",
            "--max-model-len", "2048", "--enforce-eager", "--trust-request-mm-kwargs"]
    with running_server(args, log, env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as base:
        yield base, log


def image_url(seed: int) -> str:
    return data_url(png_bytes(rand_image(2 * SIDE, SIDE, seed)))


def body(urls: list[str], **kw) -> dict:
    content = [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
               {"type": "text", "text": "Describe the image."}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 6,
            "temperature": 0, **kw}


# Refused after the prompt (and so its image) was processed: each is a 400 naming the problem.
REFUSALS = [
    ({"max_tokens": 100_000}, "max_tokens"),                   # longer than the context allows
    ({"min_tokens": 9, "max_tokens": 3}, "min_tokens"),        # sampling parameters
    ({"logprobs": True, "top_logprobs": 21}, "logprobs"),      # over the server's max_logprobs
    ({"prompt_logprobs": 50}, "logprobs"),
]
# The good requests: greedy, n=3 sampled with a seed and logprobs, streamed.
GOOD = [{}, {"n": 3, "temperature": 0.7, "seed": 7, "logprobs": True, "top_logprobs": 2}, {"stream": True}]


def answer(client: httpx.Client, request: dict) -> list[str]:
    response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, (response.status_code, response.text)
    if not request.get("stream"):
        return [c["message"]["content"] for c in response.json()["choices"]]
    text = ""
    for line in response.text.splitlines():
        assert '"error"' not in line, line
        if line.startswith("data: {"):
            delta = json.loads(line[6:])["choices"]
            text += "".join(c["delta"].get("content") or "" for c in delta)
    return [text]


def test_refused_requests_leave_no_stale_image(server):
    base, log = server
    stale, fresh = image_url(101), image_url(102)
    with httpx.Client(base_url=base, timeout=120) as client:
        for extra, problem in REFUSALS:
            for urls in ([stale], [stale, stale]):
                response = client.post("/v1/chat/completions", json=body(urls, **extra))
                assert response.status_code == 400 and problem in response.text, (extra, response.text)
        # Each good request first with the image the refusals carried, then two images of which
        # one is stale; then all of them again, when every cache is consistent ("alone").
        cases = [body([stale], **g) for g in GOOD] + [body([fresh, stale], **g) for g in GOOD]
        first = [answer(client, case) for case in cases]
        again = [answer(client, case) for case in cases]
    assert first == again
    assert all(len(a) == 3 for a in first[1::3])  # n=3
    assert "cache drift" not in log.read_text()


async def drift_and_resend(checkpoint) -> tuple[list, list]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(checkpoint), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.5,
        max_model_len=2048, max_num_seqs=4, seed=0))
    try:
        image = rand_image(3 * SIDE, SIDE, 103)
        # The tiny preset's (Gemma) conversation format, as the served chat template writes it.
        prompt = {"prompt": "<start_of_turn>user\n<image>\nDescribe the image.<end_of_turn>\n<start_of_turn>model\n",
                  "multi_modal_data": {"image": image}}
        params = SamplingParams(max_tokens=6, temperature=0.8, seed=3, n=2,
                                output_kind=RequestOutputKind.FINAL_ONLY)  # one output, both samples

        async def run(request_id: str) -> list:
            (engine_input,) = await llm.renderer.render_cmpl_async([prompt])
            outputs = [o async for o in llm.generate(engine_input, params, request_id)]
            return [(c.finish_reason, c.token_ids) for c in outputs[-1].outputs]

        alone = await run("alone")
        await llm.engine_core.reset_mm_cache_async()  # P1 forgets the image, P0 still lists it
        resent = await run("after-eviction")
        return alone, resent
    finally:
        llm.shutdown()


def test_drift_is_resent_by_the_server(tiny_checkpoint, monkeypatch):
    """The engine's cache is emptied behind the API server's back: the next request with the same
    image is sent without its data, the engine reports the miss, and the server resends it once
    with the data: the caller gets the same answer (n=2), no error."""
    from ovis_vllm.engine import processor_cache

    resends = []
    monkeypatch.setattr(processor_cache.logger, "warning", lambda msg, *args: resends.append(msg % args))
    alone, resent = asyncio.run(drift_and_resend(tiny_checkpoint))
    assert len(alone) == 2 and all(reason != "error" for reason, _ in alone)
    assert resent == alone
    assert len(resends) == 1 and "after-eviction" in resends[0] and "resending them once" in resends[0]
