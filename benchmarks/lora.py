"""Serving many LoRA adapters at once: requests/s with 1, 4 and 16 adapters mixed in one workload
against the base model alone, in the same run.

    python -m benchmarks.lora [--preset tiny] [--requests 32] [--concurrency 16] [--repeats 3]

Two servers on the same checkpoint and flags, one after the other:
- `base, LoRA off`: the base model on a server without --enable-lora (what serving it alone costs);
- a server with --enable-lora, --max-loras 16 and 16 adapters (engine/checkpoints/lora_adapters.py: rank 8,
  alpha 32 on every linear layer of the LLM, as ms-swift trains them) from --lora-modules, asked
  for the base model, then 1, 4 and 16 adapters, request i naming adapter i mod k.
Every setting gets the same requests (benchmarks/serve.py's mixed workload: one image of 1x1 to
3x3 crops, 32 output tokens); each is run --repeats times, alternating. Prints a table and writes
lora.json and lora.png to --out; the ratio is each setting's requests/s over `base, LoRA off`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from benchmarks.common import command_line, machine_info, machine_name, out_dir, pyplot, save_chart, write_json
from benchmarks.serve import make_requests, run_level, start_server, stop_server, summarize, timed_run

ADAPTER_COUNTS = (1, 4, 16)


def plot(result: dict, path: Path, chart: bool = False) -> list[Path]:
    plt = pyplot()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    rates = [r["requests_per_s"] for r in rows]
    errors = [[r["requests_per_s"] - r["requests_per_s_min"] for r in rows],
              [r["requests_per_s_max"] - r["requests_per_s"] for r in rows]]
    ax.bar([r["server"] for r in rows], rates, yerr=errors, capsize=4, color="tab:blue")
    ax.set_ylabel("requests/s (min-max over repeats)")
    ax.set_title(f"LoRA adapters mixed in one workload, {result['preset']} preset, concurrency "
                 f"{result['concurrency']}\n{machine_name(result['machine'])}", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    return save_chart(fig, path, chart)


def main(argv: list[str] | None = None) -> dict:
    from ovis_vllm.engine.checkpoints import write_checkpoint
    from ovis_vllm.engine.checkpoints.lora_adapters import write_lora_adapter

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="output folder (default benchmarks/out/lora)")
    ap.add_argument("--chart", action="store_true", help="also write the chart to docs/charts/lora.png")
    args = ap.parse_args(argv)
    out = out_dir(args.out, "lora")
    model = write_checkpoint(out / f"ckpt-{args.preset}", args.preset, seed=0)
    adapters = [f"adapter-{i}" for i in range(max(ADAPTER_COUNTS))]
    for i, name in enumerate(adapters):
        write_lora_adapter(model, out / name, seed=i)
    side = json.loads((model / "config.json").read_text())["visual_tokenizer_config"]["backbone_config"]["image_size"]
    requests = make_requests(max(args.requests, args.concurrency), "mixed", side, seed=0)
    flags = ["--dtype", args.dtype, "--max-num-seqs", str(args.concurrency)]
    lora_flags = ["--enable-lora", "--max-lora-rank", "8", "--max-loras", str(len(adapters)),
                  "--max-cpu-loras", str(len(adapters)), "--lora-modules",
                  *(f"{name}={out / name}" for name in adapters)]
    servers = {"off": flags, "on": flags + lora_flags}
    settings = {"base, LoRA off": ("off", ["bench"]), "base, LoRA on": ("on", ["bench"])} | {
        f"{k} adapter{'s' if k > 1 else ''}": ("on", adapters[:k]) for k in ADAPTER_COUNTS}
    runs: dict[str, list[dict]] = {label: [] for label in settings}
    for server, server_flags in servers.items():
        proc, base = start_server(f"lora-{server}", str(model), server_flags, out)
        try:
            mine = [label for label, (s, _) in settings.items() if s == server]
            for label in mine:  # warm-up: compilation, every adapter into its slot
                asyncio.run(run_level(base, settings[label][1], requests[:len(settings[label][1])],
                                      args.concurrency))
            for repeat in range(args.repeats):
                for label in (mine if repeat % 2 == 0 else mine[::-1]):
                    runs[label].append(timed_run(label, base, proc.pid, settings[label][1], requests,
                                                 args.concurrency))
        finally:
            stop_server(proc)
    rows = [summarize(label, args.concurrency, runs[label]) for label in settings]
    alone = rows[0]["requests_per_s"]
    for row in rows:
        row["ratio_to_base_alone"] = row["requests_per_s"] / alone
    result = dict(command=command_line(__spec__.name, argv), machine=machine_info(), preset=args.preset,
                  dtype=args.dtype, concurrency=args.concurrency, requests=len(requests), rows=rows)
    write_json(out / "lora.json", result)
    print("| setting | requests/s (min-max) | ratio to base alone | TTFT p50 | errors | peak RSS |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['requests_per_s']:.2f} ({r['requests_per_s_min']:.2f}-"
              f"{r['requests_per_s_max']:.2f}) | {r['ratio_to_base_alone']:.2f} | "
              f"{r['ttft_ms']['p50']:.0f} ms | {r['errors']} | {r['peak_rss_MiB'] or 0:.0f} MiB |")
    print("wrote", out / "lora.json", *plot(result, out / "lora.png", args.chart))
    return result


if __name__ == "__main__":
    main()
