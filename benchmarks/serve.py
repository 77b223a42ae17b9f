"""Serving benchmark: ours vs vLLM's built-in Ovis, same checkpoint, same machine, one run.

    python -m benchmarks.serve --preset tiny --server both --concurrency 1 4 16 64
    python -m benchmarks.serve --preset wide --workload encoder-heavy --server both
    python -m benchmarks.serve --url http://host:8000 --model NAME      # an existing server
    python -m benchmarks.serve --replot benchmarks/out/serve-ovis2-wide-mixed/serve.json --chart

Requests go through the `openai` async client as streaming chat completions with base64 images
of several crop grids (1x1, 2x2, 3x3 at the checkpoint's image side) and text lengths; or, with
`--workload realistic`, four full-size images per request (four of a 12 MP phone JPEG, a
1920x1080 screenshot or a 2480x3508 greyscale scan, the kind rotating over requests), with the servers' processor and prefix
caches off so every image is decoded and preprocessed. The
metrics (requests/s, output tokens/s, TTFT / inter-token latency p50/p90/p99) are computed by
vLLM's own `vllm.benchmarks.serve.calculate_metrics` from the timings recorded here. The
server's peak resident memory (its process tree) is sampled during each run. Writes serve.json
and the chart serve.png to --out and shows progress while it runs; --chart also writes the chart
to docs/charts/serve.png, and --replot FILE redraws it from a saved serve.json without running.

How ours and the built-in are compared (`--server both`): both servers are started on the same
checkpoint with the same flags (the built-in with VLLM_PLUGINS=none) and stay up together; each
concurrency level is run `--repeats` times per server, the two servers' runs interleaved in
ABBA order on the same fresh requests (new images every repeat, so no run is served from a
cache warmed by an earlier one), with a pause between runs for the idle server's busy-wait loops
to stop. Interleaving cancels slow drift of the machine; the pairs give the run-to-run spread.
Per level the report gives each server's mean requests/s with min-max, the ratio of the means,
and a verdict: "ahead" when ours' slowest run beats the built-in's fastest (ranges apart),
"at par" when neither is, "behind" when the built-in's slowest beats ours' fastest.
`--one-at-a-time` runs the servers back to back instead (for machines without the memory for
both).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import (REPO, command_line, machine_info, machine_name, out_dir, pyplot, rss_by_process,
                               save_chart, write_json)

WORKLOADS = {
    # (grid multiples of the image side, text words, max output tokens)
    "mixed": [((1, 1), 8, 32), ((2, 2), 40, 32), ((3, 3), 16, 32), ((1, 1), 120, 32)],
    "encoder-heavy": [((3, 3), 8, 4)],
    "realistic": [],  # 4 full-size images per request (make_requests), 16 output tokens
}
IMAGES_PER_REALISTIC_REQUEST = 4
REALISTIC_SERVER_ARGS = "--mm-processor-cache-gb 0 --no-enable-prefix-caching"


@functools.lru_cache(maxsize=1)
def realistic_image_urls() -> tuple[str, ...]:
    """A phone photo (4032x3024 JPEG), a screenshot (1920x1080 PNG), a scan (2480x3508 grey PNG)."""
    from benchmarks.image_costs import photo, scan, screenshot

    return (data_url(photo(), "image/jpeg"), data_url(screenshot(), "image/png"), data_url(scan(), "image/png"))


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def make_requests(n: int, workload: str, side: int, seed: int = 0) -> list[dict]:
    if workload == "realistic":
        # Four copies of one of the three images per request, the kind rotating over requests:
        # the built-in fails a prompt whose images have different crop grids. The servers run
        # with their caches off (REALISTIC_SERVER_ARGS), so every image is decoded and
        # preprocessed again.
        urls = realistic_image_urls()
        return [{"messages": [{"role": "user", "content": [
            *({"type": "image_url", "image_url": {"url": urls[i % 3]}} for _ in range(IMAGES_PER_REALISTIC_REQUEST)),
            {"type": "text", "text": f"Request {i}. What do these pictures show?"}]}], "max_tokens": 16}
            for i in range(n)]
    rng = np.random.default_rng(seed)
    specs = WORKLOADS[workload]
    out = []
    for i in range(n):
        (rows, cols), words, max_tokens = specs[i % len(specs)]
        pixels = rng.integers(0, 256, (rows * side, cols * side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        url = data_url(buf.getvalue(), "image/png")
        text = f"Request {i}. " + " ".join(["Describe the image in detail."] * max(1, words // 5))
        out.append({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}],
            "max_tokens": max_tokens})
    return out


def write_dataset(path: Path, requests: list[dict]) -> None:
    """The requests as vLLM's custom_image JSONL (one message's content parts per line, in
    order), so `vllm bench serve --dataset-name custom_image` sends exactly what this script
    sends: the two benchmarks cross-check on one workload."""
    with path.open("w") as f:
        for req in requests:
            f.write(json.dumps({"content": req["messages"][0]["content"]}) + "\n")


class PeakMemory:
    """Peak resident set size of a process and its children, sampled in a thread."""

    def __init__(self, pid: int | None):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def __enter__(self):
        if self.pid is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(rss_by_process(self.pid).values()))
            time.sleep(0.1)

    def __exit__(self, *exc):
        self._stop.set()


async def run_level(base_url: str, model: str | list[str], requests: list[dict], concurrency: int):
    """Send `requests` at `concurrency`, streamed; `model`: one served name, or several that the
    requests take in turn (request i: model[i % len(model)])."""
    import openai
    from vllm.benchmarks.datasets import SampleRequest
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput

    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=os.environ.get("OVIS_API_KEY", "none"),
                                max_retries=0, timeout=1800)
    semaphore = asyncio.Semaphore(concurrency)

    models = [model] if isinstance(model, str) else model

    async def one(i, req) -> RequestFuncOutput:
        out = RequestFuncOutput()
        async with semaphore:
            start = time.perf_counter()
            out.start_time = start
            last = start
            try:
                stream = await client.chat.completions.create(
                    model=models[i % len(models)], messages=req["messages"], max_tokens=req["max_tokens"],
                    temperature=0, stream=True, stream_options={"include_usage": True})
                async for chunk in stream:
                    now = time.perf_counter()
                    delta = chunk.choices[0].delta if chunk.choices else None
                    # Thinking (Ovis2.5/2.6, vLLM's reasoning parser) streams as `reasoning`:
                    # tokens too, timed as vLLM's own benchmark times them.
                    if delta is not None and (delta.content or getattr(delta, "reasoning", None)):
                        if out.ttft == 0.0:
                            out.ttft = now - start
                        else:
                            out.itl.append(now - last)
                        last = now
                        out.generated_text += delta.content or ""
                    if chunk.usage:
                        out.output_tokens = chunk.usage.completion_tokens
                        out.prompt_len = chunk.usage.prompt_tokens
                out.latency = time.perf_counter() - start
                out.success = True
            except Exception as exc:  # counted as an error in the report
                out.error = f"{type(exc).__name__}: {exc}"
        return out

    start = time.perf_counter()
    outputs = await asyncio.gather(*[one(i, r) for i, r in enumerate(requests)])
    duration = time.perf_counter() - start
    await client.close()
    samples = [SampleRequest(prompt="", prompt_len=o.prompt_len, expected_output_len=r["max_tokens"])
               for o, r in zip(outputs, requests)]
    return outputs, samples, duration


def metrics_row(outputs, samples, duration) -> dict:
    from vllm.benchmarks.serve import calculate_metrics

    with contextlib.redirect_stdout(io.StringIO()):  # its "install termplotlib" tip, per run
        m, _ = calculate_metrics(samples, outputs, duration, None, [50, 90, 99], {})
    pct = lambda values: {f"p{int(p)}": v for p, v in values}
    return {"requests_per_s": m.request_throughput, "output_tokens_per_s": m.output_throughput,
            "completed": m.completed, "errors": m.failed,
            "ttft_ms": pct(m.percentiles_ttft_ms), "itl_ms": pct(m.percentiles_itl_ms),
            "first_error": next((o.error for o in outputs if o.error), "")}


def image_side(model: str) -> int:
    """The side the workloads' image grids are multiples of: an Ovis1.6/2 checkpoint's crop side;
    for Ovis2.5/2.6 (native resolution) the side of the reference's default min_pixels, 448, so a
    1x1 image takes 196 visual tokens and a 3x3 one 1764."""
    config = json.loads((Path(model) / "config.json").read_text())
    if "vit_config" in config:
        from ovis_vllm.engine.preprocess_navit import DEFAULT_MIN_PIXELS

        return math.isqrt(DEFAULT_MIN_PIXELS)
    return config["visual_tokenizer_config"]["backbone_config"]["image_size"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kind: str, model: str, extra: list[str], log_dir: Path):
    """kind 'ours' (our plugin) or 'builtin' (vLLM's built-in Ovis, VLLM_PLUGINS=none)."""
    port = free_port()
    env = dict(os.environ)
    if kind == "builtin":
        env["VLLM_PLUGINS"] = "none"
    cmd = [sys.executable, str(REPO / "server.py"), "--model", model, "--served-model-name", "bench",
           "--host", "127.0.0.1", "--port", str(port), "--seed", "0", *extra]
    log = open(log_dir / f"server-{kind}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    import httpx

    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} server exited; see {log.name}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"{kind} server did not start in time; see {log.name}")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def warm_up(base: str, model: str, workload: str, side: int) -> None:
    """First-request costs (compilation, allocator growth) out of the timings."""
    asyncio.run(run_level(base, model, make_requests(2, workload, side, seed=10**6), 2))


def timed_run(label, base, pid, model, requests, concurrency) -> dict:
    with PeakMemory(pid) as mem:
        outputs, samples, duration = asyncio.run(run_level(base, model, requests, concurrency))
    row = metrics_row(outputs, samples, duration)
    row.update(server=label, concurrency=concurrency, requests=len(requests),
               peak_rss_MiB=mem.peak / 2**20 if pid else None)
    return row


def summarize(label: str, concurrency: int, runs: list[dict]) -> dict:
    rates = [r["requests_per_s"] for r in runs]
    mean_rate = float(np.mean(rates))
    keys = ("output_tokens_per_s", "completed")
    summary = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    summary.update(
        server=label, concurrency=concurrency, requests=runs[0]["requests"],
        requests_per_s=mean_rate, requests_per_s_min=min(rates),
        requests_per_s_max=max(rates), spread=(max(rates) - min(rates)) / mean_rate if mean_rate else 0.0,
        errors=sum(r["errors"] for r in runs),
        first_error=next((r["first_error"] for r in runs if r["first_error"]), ""),
        # Latency percentiles pooled the simple way: the median over repeats of each percentile.
        ttft_ms={p: float(np.median([r["ttft_ms"][p] for r in runs])) for p in runs[0]["ttft_ms"]},
        itl_ms={p: float(np.median([r["itl_ms"][p] for r in runs])) for p in runs[0]["itl_ms"]},
        peak_rss_MiB=max((r["peak_rss_MiB"] or 0) for r in runs) or None, runs=runs)
    return summary


def compare(ours: dict, base: dict) -> dict:
    """Ratios of ours to the built-in at one level, and the verdict against the spread."""
    pairs = [o["requests_per_s"] / b["requests_per_s"] for o, b in zip(ours["runs"], base["runs"])]
    if ours["requests_per_s_min"] > base["requests_per_s_max"]:
        verdict = "ahead"
    elif base["requests_per_s_min"] > ours["requests_per_s_max"]:
        verdict = "behind"
    else:
        verdict = "at par"
    return {"concurrency": ours["concurrency"],
            "requests_per_s": ours["requests_per_s"] / base["requests_per_s"],
            "pair_min": min(pairs), "pair_max": max(pairs),
            "spread": max(ours["spread"], base["spread"]),
            "worst_over_best": ours["requests_per_s_min"] / base["requests_per_s_max"],
            "verdict": verdict,
            "peak_rss": (ours["peak_rss_MiB"] or 0) / (base["peak_rss_MiB"] or 1)}


def bench(servers: dict, model: str, args, side: int, progress) -> list[dict]:
    """servers: label -> (base URL, pid). Every level and repeat gets fresh requests, the same
    for every server; with two servers their runs are interleaved A B B A A B ..."""
    rows = []
    labels = list(servers)
    for concurrency in args.concurrency:
        n = max(args.requests, concurrency)
        runs = {label: [] for label in labels}
        for repeat in range(args.repeats):
            requests = make_requests(n, args.workload, side, seed=1000 * concurrency + repeat)
            for label in (labels if repeat % 2 == 0 else labels[::-1]):
                base, pid = servers[label]
                if len(labels) > 1:
                    time.sleep(args.pause)  # the other server's busy-wait loops wind down
                runs[label].append(timed_run(label, base, pid, model, requests, concurrency))
                progress.update(1)
        rows += [summarize(label, concurrency, runs[label]) for label in labels]
    return rows


def markdown_tables(result: dict) -> str:
    """The run as RESULTS.md shows it: one row per server and level, then ours / built-in."""
    lines = ["| server | conc | req/s (min-max) | out tok/s | TTFT p50/p90/p99 ms | ITL p50/p99 ms | errors | peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["server"] != "ours", r["concurrency"])):
        t, i = r["ttft_ms"], r["itl_ms"]
        lines.append(f"| {r['server'].replace('builtin', 'built-in')} | {r['concurrency']} | {r['requests_per_s']:.3f} "
                     f"({r['requests_per_s_min']:.3f}-{r['requests_per_s_max']:.3f}) | {r['output_tokens_per_s']:.1f} "
                     f"| {t['p50']:.0f}/{t['p90']:.0f}/{t['p99']:.0f} | {i['p50']:.1f}/{i['p99']:.1f} | {r['errors']} "
                     f"| {r['peak_rss_MiB'] or 0:.0f} |")
    if result.get("ratios"):
        lines += ["", "| conc | ours / built-in req/s | pairs min-max | run-to-run spread "
                      "| ours' slowest / built-in's fastest | verdict | peak memory ratio |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['concurrency']} | {r['requests_per_s']:.3f} | {r['pair_min']:.3f}-{r['pair_max']:.3f} "
                  f"| {r['spread']:.1%} | {r['worst_over_best']:.3f} | {r['verdict']} | {r['peak_rss']:.3f} |"
                  for r in result["ratios"]]
    return "\n".join(lines)


def plot(result: dict, path: Path, chart: bool = False) -> list[Path]:
    """Requests/s and TTFT p50 per concurrency level, one line per server."""
    args, rows = result["args"], result["rows"]
    what = f"{args['url']} ({args['workload']})" if args["url"] else f"{args['preset']} preset, {args['workload']} workload"
    machine = f" on {machine_name(result['machine'])}" if "machine" in result else ""  # older saved runs have none
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label in sorted({r["server"] for r in rows}):
        sel = [r for r in rows if r["server"] == label]
        conc = [r["concurrency"] for r in sel]
        axes[0].errorbar(conc, [r["requests_per_s"] for r in sel], marker="o", label=label, capsize=3,
                         yerr=[[r["requests_per_s"] - r["requests_per_s_min"] for r in sel],
                               [r["requests_per_s_max"] - r["requests_per_s"] for r in sel]])
        axes[1].plot(conc, [r["ttft_ms"]["p50"] for r in sel], marker="o", label=label)
    ours = {r["concurrency"]: r["requests_per_s"] for r in rows if r["server"] == "ours"}
    for ratio in result.get("ratios", []):  # ours / built-in, next to ours' point
        axes[0].annotate(f"{ratio['requests_per_s']:.3f}x ({ratio['verdict']})", (ratio["concurrency"],
                         ours[ratio["concurrency"]]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    levels = sorted({r["concurrency"] for r in rows})
    for ax, title in zip(axes, ["requests/s (min-max over repeats)", "TTFT p50 (ms)"]):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"Ovis serving, ours vs vLLM's built-in: {what}{machine}")
    return save_chart(fig, path, chart)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", choices=["ours", "builtin", "both"], default="both")
    ap.add_argument("--url", help="benchmark this running server instead of starting one")
    ap.add_argument("--model", help="checkpoint path (started servers) or served name (--url)")
    ap.add_argument("--preset", choices=["tiny", "wide", "ovis2-wide", "ovis2.5-9b", "ovis2.5-wide"],
                    default="wide",
                    help="generate this checkpoint when --model is not given (wide: Ovis1.6-Gemma2-9B's "
                         "widths, ovis2-wide: Ovis2-8B's, ovis2.5-wide: Ovis2.5-9B's, one layer each; "
                         "ovis2.5-9b: its layout at small widths)")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="mixed")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=16, help="requests per level (at least the concurrency)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per level and server")
    ap.add_argument("--pause", type=float, default=3.0,
                    help="seconds between two servers' runs (vLLM's idle busy-wait lasts ~1 s)")
    ap.add_argument("--one-at-a-time", action="store_true",
                    help="run the two servers back to back instead of both up, interleaved")
    ap.add_argument("--server-args", default="", help="extra vLLM flags for started servers")
    ap.add_argument("--out", help="output folder (default benchmarks/out/serve-PRESET-WORKLOAD)")
    ap.add_argument("--chart", action="store_true", help="also write the chart to docs/charts/serve.png")
    ap.add_argument("--write-dataset", metavar="JSONL",
                    help="only write the requests of the first level's first repeat (as --url runs "
                         "them) in vLLM's custom_image format, for vllm bench serve; runs nothing")
    ap.add_argument("--replot", metavar="SERVE_JSON",
                    help="only redraw the chart of a saved run (into its folder), running nothing")
    args = ap.parse_args(argv)
    if args.replot:
        path = Path(args.replot)
        result = json.loads(path.read_text())
        print("wrote", *plot(result, path.with_name("serve.png"), args.chart))
        return result
    if args.write_dataset:
        side = int(os.environ.get("OVIS_IMAGE_SIDE", "384"))
        concurrency = args.concurrency[0]
        requests = make_requests(max(args.requests, concurrency), args.workload, side, seed=1000 * concurrency)
        write_dataset(Path(args.write_dataset), requests)
        print(f"wrote {len(requests)} requests ({args.workload}, side {side}, max_tokens "
              f"{sorted({r['max_tokens'] for r in requests})}) to {args.write_dataset}")
        return {"requests": requests}
    from tqdm import tqdm

    out = out_dir(args.out, f"serve-{'url' if args.url else args.preset}-{args.workload}")
    rows: list[dict] = []
    n_servers = 2 if args.server == "both" and not args.url else 1
    progress = tqdm(total=len(args.concurrency) * args.repeats * n_servers, desc="benchmark runs")
    if args.url:
        side = int(os.environ.get("OVIS_IMAGE_SIDE", "384"))
        warm_up(args.url, args.model or "bench", args.workload, side)
        rows += bench({"target": (args.url, None)}, args.model or "bench", args, side, progress)
    else:
        model = args.model
        if model is None:
            from ovis_vllm.engine.checkpoints import write_checkpoint

            model = str(write_checkpoint(out / f"ckpt-{args.preset}", args.preset, seed=0))
        side = image_side(model)
        kinds = ["ours", "builtin"] if args.server == "both" else [args.server]
        server_args = args.server_args.split()
        if args.workload == "realistic":
            server_args += REALISTIC_SERVER_ARGS.split()
        groups = [[k] for k in kinds] if args.one_at_a_time else [kinds]
        for group in groups:
            procs = {}
            try:
                for kind in group:  # same checkpoint and flags
                    procs[kind] = start_server(kind, model, server_args, out)
                servers = {}
                for kind, (proc, base) in procs.items():
                    warm_up(base, "bench", args.workload, side)
                    servers[kind] = (base, proc.pid)
                rows += bench(servers, "bench", args, side, progress)
            finally:
                for proc, _ in procs.values():
                    stop_server(proc)
    progress.close()

    print(f"\n{'server':8} {'conc':>4} {'req/s':>8} {'(min-max)':>15} {'out tok/s':>9} "
          f"{'TTFT p50/p90/p99 ms':>22} {'ITL p50/p99 ms':>16} {'errors':>6} {'peak MiB':>8}")
    for r in sorted(rows, key=lambda r: (r["server"] != "ours", r["concurrency"])):
        t, i = r["ttft_ms"], r["itl_ms"]
        print(f"{r['server']:8} {r['concurrency']:>4} {r['requests_per_s']:>8.2f} "
              f"{r['requests_per_s_min']:>7.2f}-{r['requests_per_s_max']:<7.2f} {r['output_tokens_per_s']:>9.1f} "
              f"{t['p50']:>7.0f}/{t['p90']:.0f}/{t['p99']:.0f} {i['p50']:>8.1f}/{i['p99']:.1f} "
              f"{r['errors']:>6} {r['peak_rss_MiB'] or 0:>8.0f}")
    result = {"command": command_line(__spec__.name, argv), "machine": machine_info(), "args": vars(args), "rows": rows}
    if args.server == "both" and not args.url:
        ratios = [compare(o, next(b for b in rows if b["server"] == "builtin"
                                  and b["concurrency"] == o["concurrency"]))
                  for o in rows if o["server"] == "ours"]
        print("\nours / built-in")
        for r in ratios:
            print(f"  concurrency {r['concurrency']:>3}: requests/s {r['requests_per_s']:.3f} "
                  f"(pairs {r['pair_min']:.3f}-{r['pair_max']:.3f}, run-to-run spread up to "
                  f"{r['spread']:.1%}, ours' slowest / built-in's fastest {r['worst_over_best']:.3f}: "
                  f"{r['verdict']}), peak memory {r['peak_rss']:.3f}")
        result["ratios"] = ratios
    write_json(out / "serve.json", result)
    print("wrote", out / "serve.json", *plot(result, out / "serve.png", args.chart))
    return result


if __name__ == "__main__":
    # A plain `kill` must still run the `finally` that stops the servers this script started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
