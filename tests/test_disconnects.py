"""Client disconnects abort their requests: before any output, mid-stream, and 0.3 s into a
request carrying a 12-megapixel photo (while it is decoded, preprocessed or just started). After
a storm of them under load, /metrics shows nothing running or waiting and no KV cache in use, and
the good requests sent during the storm got the answers they get alone. /metrics has no gauge of
the encoder cache, so the abort itself is also checked inside the scheduler: encoder-cache
entries and KV blocks freed."""

from __future__ import annotations

import asyncio
import io
import re
import time

import httpx
import pytest

from tests.helpers import SIDE, chat_prompt, data_url, make_llm, png_bytes, rand_image, running_server, shutdown

MODEL = "ovis"
LONG = 4000  # tokens a disconnected request would generate if it were not aborted (ignore_eos)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("disconnects") / "server.log"
    args = ["--model", str(tiny_checkpoint), "--served-model-name", MODEL, "--dtype", "float32",
            "--max-num-seqs", "16"]
    with running_server(args, log, env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as base:
        yield base


def body(image: bytes, text: str, max_tokens: int, mime: str = "image/png", **extra) -> dict:
    return {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, **extra,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(image, mime)}},
                {"type": "text", "text": text}]}]}


def gauges(server: str) -> dict[str, float]:
    text = httpx.get(server + "/metrics").text
    out = {}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        out[name] = sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))
    return out


def idle_gauges(server: str, within: float = 15) -> dict[str, float]:
    """The gauges once all are zero, or as they stand after `within` seconds. An aborted request
    leaves the scheduler at once; one left running generates for minutes (LONG tokens,
    ignore_eos), so a few seconds tell the two apart."""
    deadline, now = time.time() + within, gauges(server)
    while time.time() < deadline and any(now.values()):
        time.sleep(0.5)
        now = gauges(server)
    return now


async def disconnect(server: str, payload: dict, when: str) -> None:
    """Send a streaming request and drop the connection: right after sending ('before'), after
    the first streamed chunk ('mid'), or after a fixed delay ('delay:SECONDS')."""
    async with httpx.AsyncClient(base_url=server, timeout=120) as http:
        async def go():
            async with http.stream("POST", "/v1/chat/completions", json=payload) as r:
                assert r.status_code == 200, await r.aread()
                async for line in r.aiter_lines():
                    if when == "mid" and line.startswith("data: {"):
                        return
        if when == "mid":
            await go()
        else:
            delay = 0.05 if when == "before" else float(when.split(":")[1])
            task = asyncio.create_task(go())
            await asyncio.sleep(delay)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def test_disconnect_storm_leaves_nothing_running(server):
    small = [png_bytes(rand_image(w, h, 40 + i)) for i, (w, h) in
             enumerate([(SIDE, SIDE), (2 * SIDE, SIDE), (3 * SIDE, 2 * SIDE)])]
    photo = io.BytesIO()  # a phone photo's size: decoding and preprocessing take a while
    rand_image(4032, 3024, 7).save(photo, format="JPEG", quality=90)
    good = [body(small[i % 3], f"Good question {i}?", 12) for i in range(8)]
    long_run = dict(stream=True, ignore_eos=True)

    async def answer(http, payload):
        r = await http.post("/v1/chat/completions", json=payload)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    async def storm():
        async with httpx.AsyncClient(base_url=server, timeout=300) as http:
            alone = [await answer(http, p) for p in good]
            jobs = [answer(http, p) for p in good]
            for i in range(24):
                kind = ("before", "mid", "delay:0.3")[i % 3]
                payload = (body(photo.getvalue(), f"Long answer {i}.", LONG, mime="image/jpeg", **long_run)
                           if kind.startswith("delay") else body(small[i % 3], f"Long answer {i}.", LONG, **long_run))
                jobs.append(disconnect(server, payload, kind))
            results = await asyncio.gather(*jobs)
            return alone, results[:len(good)]

    alone, during = asyncio.run(storm())
    assert during == alone
    assert not any(idle_gauges(server).values())
    assert httpx.get(server + "/health").status_code == 200


def test_gauges_see_a_live_request_and_its_disconnect(server):
    """The check above can fail: a connected streaming request shows as running with KV cache
    in use, and dropping its connection takes both back to zero."""
    payload = body(png_bytes(rand_image(SIDE, SIDE, 5)), "Talk.", LONG, stream=True, ignore_eos=True)

    async def hold_then_drop():
        async with httpx.AsyncClient(base_url=server, timeout=120) as http:
            async with http.stream("POST", "/v1/chat/completions", json=payload) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        return gauges(server)  # leaving the block drops the connection

    live = asyncio.run(hold_then_drop())
    assert live["vllm:num_requests_running"] == 1 and live["vllm:kv_cache_usage_perc"] > 0, live
    assert not any(idle_gauges(server).values())


def abort_mid_prefill(checkpoint: str) -> dict:
    """Image requests aborted with an encoder output held mid-prefill, on an engine whose
    scheduler is in this process (make_llm). Returns what the scheduler held before and after
    the abort, and the tokens of a request sent after it."""
    from vllm import SamplingParams

    # A token budget below one image's span: each prefill takes several steps.
    llm = make_llm(checkpoint, max_num_batched_tokens=64, enable_chunked_prefill=True,
                   enable_prefix_caching=False, max_num_seqs=8)
    try:
        engine = llm.llm_engine
        scheduler = engine.engine_core.engine_core.scheduler
        encoder_cache = scheduler.encoder_cache_manager

        def state() -> dict:
            return {"requests_holding_encoder_outputs": sum(map(bool, encoder_cache.request_cached_ids.values())),
                    "encoder_entries_referenced": sum(map(bool, encoder_cache.cached.values())),
                    "encoder_slots_not_freeable": encoder_cache.cache_size - encoder_cache.num_freeable_slots,
                    "kv_usage": scheduler.kv_cache_manager.usage,
                    "unfinished": engine.has_unfinished_requests()}

        params = SamplingParams(temperature=0, max_tokens=LONG, ignore_eos=True)
        for i in range(6):
            engine.add_request(f"r{i}", image_request(llm, i), params)
        # An image's encoder output stays cached until its prefill has consumed it: step until
        # one is held, the other requests waiting or part-way.
        for _ in range(10):
            engine.step()
            if any(encoder_cache.request_cached_ids.values()):
                break
        before = state()
        engine.abort_request([f"r{i}" for i in range(6)])
        after = state()
        tokens_after = llm.generate([image_request(llm, 0)], SamplingParams(temperature=0, max_tokens=8),
                                    use_tqdm=False)[0].outputs[0].token_ids
        return {"before": before, "after": after, "tokens_after": list(tokens_after)}
    finally:
        shutdown(llm)


def image_request(llm, i: int) -> dict:
    """Offline request i: one image (a 2x2 or 3x2 grid) in the checkpoint's chat template."""
    prompt = chat_prompt(llm.get_tokenizer(), [("user", f"<image>\nDescribe picture {i} at length.")])
    return {"prompt": prompt, "multi_modal_data": {"image": rand_image((2 + i % 2) * SIDE, 2 * SIDE, 60 + i)}}


def test_abort_frees_encoder_cache_and_kv_blocks(tiny_checkpoint, llm):
    """What a disconnect does inside the engine (the server aborts the request), looked at in
    the scheduler itself: image requests aborted while an image's encoder output is cached
    mid-prefill leave no encoder-cache entry referenced and no KV block in use, and the next
    request gets the answer it gets alone."""
    from vllm import SamplingParams

    seen = abort_mid_prefill(str(tiny_checkpoint))
    before, after = seen["before"], seen["after"]
    assert before["requests_holding_encoder_outputs"] >= 1 and before["encoder_slots_not_freeable"] > 0, before
    assert before["kv_usage"] > 0 and before["unfinished"], before
    assert after == {"requests_holding_encoder_outputs": 0, "encoder_entries_referenced": 0,
                     "encoder_slots_not_freeable": 0, "kv_usage": 0.0, "unfinished": False}, after
    alone = llm.generate([image_request(llm, 0)], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert seen["tokens_after"] == list(alone[0].outputs[0].token_ids)
