"""Soak: a bounded mixed run against one server, through the official `openai` client.

    python -m benchmarks.soak --minutes 10                     # starts server.py (tiny preset)
    python -m benchmarks.soak --preset ovis2-wide --minutes 10
    python -m benchmarks.soak --url http://host:8000 --model NAME --minutes 10

`--concurrency` workers send, until the time is up, a seeded random mix of
  good       chat with one or two images, greedy: the answer must equal the one it got alone
  stream     the same, streamed: the joined chunks must equal it
  n2         n=2 sampled with a seed: both choices must equal the ones it got alone
  bad        a request the server must refuse with a 4xx (bad base64, bytes that are not an
             image, <image> with no image, too many images, unknown model, max_tokens < 1)
  disconnect a streamed request whose connection is dropped after the first chunk
  cancel     a good request cancelled by the client after a random 0-0.5 s
and counts good_ok, good_wrong, bad_4xx, http_5xx, lost (a request that got no HTTP answer, or
a bad one answered 2xx), disconnects and cancels. At the end the server must be idle
(/metrics: nothing running or waiting). The server's resident memory is sampled every 15 s, per
process (server.py, VLLM::EngineCore, VLLM::Worker, ...): the drift is the end minus the first
sample after the first minute, in all and per process. Exits non-zero unless good_wrong,
http_5xx and lost are 0 and the server is idle. Writes soak.json to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import re
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.common import command_line, machine_info, out_dir, rss_by_process, write_json
from benchmarks.serve import PeakMemory, start_server, stop_server

KINDS = {"good": 5, "stream": 3, "n2": 2, "bad": 3, "disconnect": 2, "cancel": 2}  # weights
IDLE_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")


def image_url(side_w: int, side_h: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (side_h, side_w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, *urls: str) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                         {"type": "text", "text": text}]}]


def good_requests(side: int) -> list[dict]:
    grids = [(1, 1), (2, 1), (2, 2), (3, 3)]
    out = []
    for i in range(32):  # distinct images, so the processor and encoder work, not only caches
        urls = [image_url(side * grids[i % 4][0], side * grids[i % 4][1], i)]
        if i % 3 == 2:
            urls.append(image_url(side, side, 100 + i))
        out.append({"messages": user(f"Question {i}: what is in the picture?", *urls),
                    "max_tokens": 16, "temperature": 0})
    return out


def bad_requests(model: str, side: int) -> list[dict]:
    ok = image_url(side, side, 999)
    return [
        {"model": model, "messages": user("x", "data:image/png;base64,@@@not-base64@@@")},
        {"model": model, "messages": user("x", "data:image/png;base64," + base64.b64encode(b"GIF? no").decode())},
        {"model": model, "messages": user("<image>\nwhere is the image?")},
        {"model": model, "messages": user("x", *[ok] * 9)},  # over the server's 8 images
        {"model": "no-such-model", "messages": user("x", ok)},
        {"model": model, "messages": user("x", ok), "max_tokens": 0},
    ]


def mib_by_process(pid: int) -> dict[str, float]:
    return {name: rss / 2**20 for name, rss in rss_by_process(pid).items()}


def gauges(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=30).text
    return {name: sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))
            for name in IDLE_GAUGES}


async def soak(base: str, model: str, api_key: str, minutes: float, concurrency: int, side: int,
               seed: int, pid: int | None) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=api_key, max_retries=0, timeout=600)
    http = httpx.AsyncClient(base_url=base, timeout=600, headers={"Authorization": f"Bearer {api_key}"})
    good, bad = good_requests(side), bad_requests(model, side)

    async def chat(req, **kw):
        return await client.chat.completions.create(model=model, **{**req, **kw})

    # What each good request gets alone, first: the answers every later copy must equal.
    alone = [(await chat(r)).choices[0].message.content for r in good]
    sampled = [[c.message.content for c in sorted((await chat(r, n=2, temperature=1.0, seed=7)).choices,
                                                  key=lambda c: c.index)] for r in good]
    counts = dict(good_ok=0, good_wrong=0, bad_4xx=0, http_5xx=0, lost=0, disconnects=0, cancels=0)
    failures: list[str] = []
    rng = random.Random(seed)
    deadline = time.time() + minutes * 60

    def fail(kind: str, what: str, counter: str):
        counts[counter] += 1
        if len(failures) < 20:
            failures.append(f"{kind}: {what}")

    async def one(kind: str, i: int):
        req = good[i % len(good)]
        if kind == "good":
            got = (await chat(req)).choices[0].message.content
            counts["good_ok" if got == alone[i % len(good)] else "good_wrong"] += 1
        elif kind == "stream":
            parts = [c.choices[0].delta.content or "" async for c in await chat(req, stream=True) if c.choices]
            counts["good_ok" if "".join(parts) == alone[i % len(good)] else "good_wrong"] += 1
        elif kind == "n2":
            r = await chat(req, n=2, temperature=1.0, seed=7)
            got = [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
            counts["good_ok" if got == sampled[i % len(good)] else "good_wrong"] += 1
        elif kind == "bad":
            r = await http.post("/v1/chat/completions", json=bad[i % len(bad)])
            if 400 <= r.status_code < 500:
                counts["bad_4xx"] += 1
            elif r.status_code >= 500:
                fail(kind, f"{r.status_code} {r.text[:200]}", "http_5xx")
            else:
                fail(kind, f"accepted: {r.status_code}", "lost")
        elif kind == "disconnect":
            async with http.stream("POST", "/v1/chat/completions", json={
                    "model": model, **req, "max_tokens": 512, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        break  # leaving the block drops the connection
            counts["disconnects"] += 1
        elif kind == "cancel":
            task = asyncio.create_task(chat(req))
            await asyncio.sleep(rng.random() * 0.5)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            counts["cancels"] += 1

    async def worker():
        i = 0
        while time.time() < deadline:
            kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
            i += 1
            try:
                await one(kind, rng.randrange(1 << 20))
            except openai.APIStatusError as exc:
                fail(kind, f"{exc.status_code} {exc.message[:200]}",
                     "http_5xx" if exc.status_code >= 500 else "lost")
            except (openai.APIConnectionError, httpx.HTTPError) as exc:
                fail(kind, repr(exc)[:200], "lost")

    async def sample_memory():  # the server's resident memory, per process, every 15 s of the run
        while time.time() < deadline:
            timeline.append((round(minutes * 60 - (deadline - time.time())), mib_by_process(pid)))
            await asyncio.sleep(min(15, max(0.1, deadline - time.time())))

    timeline: list[tuple[int, dict[str, float]]] = []
    await asyncio.gather(*[worker() for _ in range(concurrency)],
                         *([sample_memory()] if pid else []))
    await http.aclose()
    await client.close()
    return {"counts": counts, "failures": failures, "rss_timeline_MiB": timeline}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--url", help="soak this running server instead of starting one")
    ap.add_argument("--model", help="checkpoint path (started server) or served name (--url)")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--preset", choices=["tiny", "wide", "ovis2-wide"], default="tiny",
                    help="generate this checkpoint when --model is not given")
    ap.add_argument("--image-side", type=int, default=None,
                    help="crop side of the images sent (default: the checkpoint's; 384 with --url)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-args", default="--dtype float32",
                    help="vLLM flags for the started server (fp32 by default: greedy answers then do "
                         "not depend on how requests happen to be batched, so any difference is a bug)")
    ap.add_argument("--out", help="output folder (default benchmarks/out/soak)")
    args = ap.parse_args(argv)
    out = out_dir(args.out, "soak")
    proc = None
    if args.url:
        base, model, pid, side = args.url, args.model or "bench", None, args.image_side or 384
    else:
        model_dir = args.model
        if model_dir is None:
            from ovis_vllm.engine.checkpoints import write_checkpoint

            model_dir = str(write_checkpoint(out / f"ckpt-{args.preset}", args.preset, seed=0))
        side = args.image_side or json.loads((Path(model_dir) / "config.json").read_text())[
            "visual_tokenizer_config"]["backbone_config"]["image_size"]
        proc, base = start_server("ours", model_dir, args.server_args.split(), out)
        model, pid = "bench", proc.pid
    try:
        started = time.time()
        with PeakMemory(pid) as peak:
            result = asyncio.run(soak(base, model, args.api_key, args.minutes, args.concurrency, side,
                                      args.seed, pid))
        result["seconds"] = round(time.time() - started, 1)
        # Aborted requests leave at once; a few seconds for the last ones to finish normally.
        deadline, now = time.time() + 30, gauges(base)
        while time.time() < deadline and any(now.values()):
            time.sleep(1)
            now = gauges(base)
        result["left_running"] = now
        rss_end = mib_by_process(pid)
    finally:
        if proc is not None:
            stop_server(proc)
    if pid:
        # Drift: from the first sample after the first minute (allocators and caches warm up in
        # it) to the end; a run shorter than two minutes uses its first sample.
        timeline = result["rss_timeline_MiB"]
        settled = next((mib for t, mib in timeline if t >= 60), None) if args.minutes >= 2 else None
        settled = settled if settled is not None else timeline[0][1]
        total = lambda mib: sum(mib.values())  # noqa: E731
        result["server_rss_MiB"] = {"settled": round(total(settled)), "end": round(total(rss_end)),
                                    "peak": round(peak.peak / 2**20),
                                    "drift": round(total(rss_end) - total(settled)),
                                    "drift_by_process": {name: round(mib - settled.get(name, 0))
                                                         for name, mib in rss_end.items()}}
    result.update(command=command_line(__spec__.name, argv), machine=machine_info(), args=vars(args))
    write_json(out / "soak.json", result)
    c = result["counts"]
    print(f"\nsoak, {result['seconds']:.0f} s at concurrency {args.concurrency}: "
          + ", ".join(f"{k} {v}" for k, v in c.items()))
    if pid:
        print("server memory (MiB):", result["server_rss_MiB"])
    print("left running/waiting at the end:", now)
    for line in result["failures"]:
        print("  failure:", line)
    print(f"wrote {out / 'soak.json'}")
    result["passed"] = c["good_wrong"] == c["http_5xx"] == c["lost"] == 0 and not any(now.values())
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
