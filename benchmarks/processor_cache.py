"""What vLLM's multimodal processor cache saves on a repeated image, through our server.

    python -m benchmarks.processor_cache [--preset tiny] [--requests 12] [--out DIR]

One server per setting, the same checkpoint and flags: the processor cache on (vLLM's default,
4 GiB) and off (`--mm-processor-cache-gb 0`); prefix caching off in both, so the engine computes
the image every time and only the API server's work differs. Each server gets `--requests`
sequential chat requests with the same 12 MP phone JPEG (benchmarks/image_costs.py) and 1 output
token; the first (cold) request is left out. Per setting: the median and min-max latency; the
speedup is off / on. Writes processor_cache.json to --out.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import command_line, machine_info, out_dir, write_json
from benchmarks.serve import data_url, start_server, stop_server

SETTINGS = {"cache on": [], "cache off": ["--mm-processor-cache-gb", "0"]}


def latencies(base: str, url: str, n: int) -> list[float]:
    request = {"model": "bench", "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe the image."}]}]}
    times = []
    with httpx.Client(base_url=base, timeout=600) as client:
        for _ in range(n):
            start = time.perf_counter()
            response = client.post("/v1/chat/completions", json=request)
            times.append(time.perf_counter() - start)
            response.raise_for_status()
    return times[1:]  # the first request fills the caches


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.image_costs import photo
    from ovis_vllm.engine.checkpoints import write_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--out", help="output folder (default benchmarks/out/processor_cache)")
    args = ap.parse_args(argv)
    out = out_dir(args.out, "processor_cache")
    url = data_url(photo(), "image/jpeg")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_checkpoint(Path(tmp) / args.preset, args.preset, seed=0))
        for setting, flags in SETTINGS.items():
            proc, base = start_server("ours", model, ["--dtype", "float32", "--no-enable-prefix-caching", *flags], out)
            try:
                times = latencies(base, url, args.requests)
            finally:
                stop_server(proc)
            rows.append(dict(setting=setting, median_s=statistics.median(times), min_s=min(times),
                             max_s=max(times), times_s=times))
    on, off = rows
    result = dict(command=command_line(__spec__.name, argv), machine=machine_info(), preset=args.preset,
                  requests=args.requests, rows=rows, speedup=off["median_s"] / on["median_s"])
    write_json(out / "processor_cache.json", result)
    print("| setting | median | min-max |\n|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['median_s'] * 1e3:.0f} ms | {r['min_s'] * 1e3:.0f}-{r['max_s'] * 1e3:.0f} ms |")
    print(f"repeated-image speedup of the processor cache: {result['speedup']:.2f}x")
    return result


if __name__ == "__main__":
    main()
