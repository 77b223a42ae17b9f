"""Benchmark of the Ovis visual embedding softmax(LayerNorm(logits)) @ VTE at Ovis1.6 or Ovis2.5 sizes.

Methods, all in one run on the same inputs:
  unfused  vLLM 0.32's built-in way (full LN, softmax and padded copies, then one matmul)
  chunked  our exact CPU path (row chunks within --chunk-mb MiB)
  packed   the same with the VTE packed once for oneDNN (kernels.PackedMatrix), as served on a CPU
           where vLLM's oneDNN takes the dtype (kernels.onednn_unavailable: not bf16 without
           AVX-512, where `chunked` is what serves); packing is done before timing, like weight
           loading, and replaces the VTE copy
  triton   our fused kernels (CUDA only)
  gemm     a plain torch.matmul of the same [N, Vh] x [Vh, D] product in the same dtype: the floor
           (lower bound on time) for unpacked weights
The method this machine serves with is marked `served`. For each: median wall time, TFLOP/s (nominal 2*N*V*D for every method, so the figures compare
directly), fraction of the GEMM floor (t_gemm / t), peak extra memory during one call (including
the [N, D] output; the inputs exist before), and the relative difference to the unfused result.

Peak memory: CUDA: torch.cuda.max_memory_allocated() minus the allocation before the call.
CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the
resident set before the call, with glibc told to mmap every block >= 64 KiB so that freed
tensors really leave the resident set between measurements. Measured on a call after warmup.

    python -m benchmarks.visual_embed                 # full: N in 196,1960,7840; bf16 + fp32
    python -m benchmarks.visual_embed --quick         # N=196, bf16, 2 repeats
    python -m benchmarks.visual_embed --sizes 196,1960 --dtypes bf16,fp32 --repeats 3
    python -m benchmarks.visual_embed --generation ovis2.5   # NaViT: 1, 2, 4 images of 1792x1792
Writes visual_embed.json and visual_embed.png (Ovis2.5: visual_embed_ovis2_5.*) to --out (default
benchmarks/out/); --chart also writes the chart to docs/charts/.
"""
import argparse
import ctypes
import statistics
import sys
import time

import torch

from ovis_vllm import kernels
from benchmarks.common import command_line, machine_info, machine_name, out_dir, pyplot, save_chart, write_json

V, D, EPS = 65536, 3584, 1e-6
# Per generation: LLM width D (Ovis1.6-Gemma2-9B: 3584; Ovis2.5-9B: 4096), indicator rows, the
# default N (Ovis1.6: 1, 10 and 40 crops of 196 tokens; Ovis2.5: 1, 2 and 4 images of 1792x1792,
# 3136 visual rows each).
GENERATIONS = {"ovis1.6": (3584, 5, "196,1960,7840", "visual_embed"),
               "ovis2.5": (4096, 4, "3136,6272,12544", "visual_embed_ovis2_5")}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------------- memory probes
def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _cpu_setup_allocator() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: big blocks mmapped, returned on free
    libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD


def measure_peak_mb(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        base = _status_mb("VmRSS")
        out = fn()
        peak = (_status_mb("VmHWM") - base) * 2**20
    del out
    return peak / 2**20


def time_fn(fn, device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


# --------------------------------------------------------------------------------- the cases
def make_inputs(n: int, dtype: torch.dtype, device: torch.device, seed: int = 0, v: int = V, d: int = D,
                indicators: int = kernels.NUM_INDICATORS):
    g = torch.Generator(device=device).manual_seed(seed)
    vh = v - indicators
    logits = (torch.randn(n, vh, generator=g, device=device) * 3).to(dtype)
    w = (0.5 + 2 * torch.rand(vh, generator=g, device=device)).to(dtype)
    b = (0.5 * torch.randn(vh, generator=g, device=device)).to(dtype)
    vte = (0.02 * torch.randn(v, d, generator=g, device=device)).to(dtype)
    return logits, w, b, vte


def gemm_floor(logits, vte):
    """The same [N, Vh] x [Vh, D] product as a plain matmul: no LayerNorm, no softmax."""
    table = vte[: logits.shape[1]]
    return lambda: torch.matmul(logits, table)


def methods_for(device: torch.device, args, chunk_mb: float):
    logits, w, b, vte = args
    m = {
        "unfused": lambda: kernels.visual_embedding_unfused(logits, w, b, vte, EPS),
        "chunked": lambda: kernels.visual_embedding_chunked(logits, w, b, vte, EPS, chunk_mb=chunk_mb),
    }
    if kernels.PackedMatrix.supported(vte):
        packed = kernels.PackedMatrix(vte[: logits.shape[1]])
        m["packed"] = lambda: kernels.visual_embedding_chunked(logits, w, b, packed, EPS, chunk_mb=chunk_mb)
    if device.type == "cuda":
        m["triton"] = lambda: kernels.visual_embedding_triton(logits, w, b, vte, EPS)
    m["gemm"] = gemm_floor(logits, vte)
    return m


def served_method(methods: dict, device: torch.device) -> str:
    """What the model runs here by default (impl "auto"): Triton on CUDA, else packed where
    this CPU packs the dtype, else chunked."""
    return "triton" if device.type == "cuda" else "packed" if "packed" in methods else "chunked"


def run_case(n, dtype_name, device, repeats, warmup, progress, chunk_mb=kernels.DEFAULT_CHUNK_MB, v=V, d=D,
             indicators=kernels.NUM_INDICATORS):
    """Every method on the same inputs; one row per method. v and d default to Ovis1.6's sizes."""
    args = make_inputs(n, DTYPES[dtype_name], device, v=v, d=d, indicators=indicators)
    methods = methods_for(device, args, chunk_mb)
    flops = 2 * n * v * d  # nominal, as in the module docstring
    rows, outputs, times = [], {}, {name: [] for name in methods}
    for name, fn in methods.items():
        progress.set_postfix_str(f"N={n} {dtype_name} {name} warmup")
        for _ in range(warmup):
            fn()
        if name != "gemm":
            outputs[name] = fn().double()
    # Round-robin repeats: a shared, noisy machine's drift hits every method alike.
    for _ in range(repeats):
        for name, fn in methods.items():
            progress.set_postfix_str(f"N={n} {dtype_name} {name}")
            times[name] += time_fn(fn, device, 1)
    for name, fn in methods.items():
        peak = measure_peak_mb(fn, device)
        med = statistics.median(times[name])
        rows.append(dict(n=n, dtype=dtype_name, method=name, median_s=med, times_s=times[name],
                         tflops=flops / med / 1e12, peak_extra_mb=peak))
        progress.update(1)
    for r in rows:
        r["served"] = r["method"] == served_method(methods, device)
    ref = outputs["unfused"]
    gemm_t = next(r["median_s"] for r in rows if r["method"] == "gemm")
    base = next(r for r in rows if r["method"] == "unfused")
    for r in rows:
        r["frac_of_gemm"] = gemm_t / r["median_s"]
        r["time_vs_unfused"] = r["median_s"] / base["median_s"]
        # At toy sizes (tests) the resident set may not grow at all.
        r["mem_vs_unfused"] = r["peak_extra_mb"] / base["peak_extra_mb"] if base["peak_extra_mb"] else float("nan")
        if r["method"] in outputs:
            r["rel_diff_vs_unfused"] = ((outputs[r["method"]] - ref).norm() / ref.norm()).item()
    return rows


def sweep_triton(sizes, device, repeats):
    """CUDA only: time a few product-kernel configs per size (for retuning _product_config)."""
    configs = [dict(BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd, num_warps=nw, num_stages=ns, SPLIT=sp)
               for bm, bv, bd, nw, ns in [(128, 64, 256, 8, 3), (128, 64, 128, 8, 3),
                                          (128, 32, 256, 8, 4), (64, 64, 256, 4, 3),
                                          (128, 64, 128, 4, 4), (64, 64, 128, 4, 4)]
               for sp in (1, 2, 4)]
    out = []
    for n in sizes:
        args = make_inputs(n, torch.bfloat16, device)
        for cfg in configs:
            fn = lambda: kernels.visual_embedding_triton(*args, EPS, config=cfg)
            try:
                fn()
                med = statistics.median(time_fn(fn, device, repeats))
            except Exception as e:  # e.g. out of shared memory
                print(f"config {cfg} failed: {type(e).__name__}", file=sys.stderr)
                continue
            out.append(dict(n=n, config=cfg, median_s=med))
        best = min((r for r in out if r["n"] == n), key=lambda r: r["median_s"])
        print(f"N={n}: best {best['config']} {best['median_s'] * 1e3:.3f} ms")
    return out


# --------------------------------------------------------------------------------- reporting
def markdown_table(rows) -> str:
    lines = ["| N | dtype | method | median | TFLOP/s | of GEMM floor | peak extra MiB "
             "| time vs unfused | mem vs unfused | rel diff vs unfused |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = r.get("rel_diff_vs_unfused")
        method = f"**{r['method']}** (served)" if r.get("served") else r["method"]
        lines.append(
            f"| {r['n']} | {r['dtype']} | {method} | {r['median_s'] * 1e3:.1f} ms "
            f"| {r['tflops']:.3f} | {r['frac_of_gemm']:.2f} | {r['peak_extra_mb']:.0f} "
            f"| {r['time_vs_unfused']:.2f}x | {r['mem_vs_unfused']:.3f} "
            f"| {'' if diff is None else f'{diff:.1e}'} |")
    return "\n".join(lines)


def plot(rows, path, title, chart=False):
    plt = pyplot()
    cases = sorted({(r["n"], r["dtype"]) for r in rows}, key=lambda c: (c[1], c[0]))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(methods)
    panels = [("time_vs_unfused", "median_s", 1e3, "ms", "time / unfused time"),
              ("mem_vs_unfused", "peak_extra_mb", 1, "MiB", "peak extra memory / unfused (log)")]
    for ax, (ratio, absolute, scale, unit, ylabel) in zip(axes, panels):
        for i, m in enumerate(methods):
            get = {(r["n"], r["dtype"]): r for r in rows if r["method"] == m}
            xs = [j + i * width for j, c in enumerate(cases) if c in get]
            got = [get[c] for c in cases if c in get]
            bars = ax.bar(xs, [r[ratio] for r in got], width, label=m)
            ax.bar_label(bars, [f"{r[absolute] * scale:.0f}" for r in got], fontsize=7)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels([f"N={n}\n{dt}" for n, dt in cases])
        ax.set_ylabel(ylabel)
        ax.set_title(f"bar labels: absolute {unit}", fontsize=9)
        ax.legend(fontsize=8, loc="upper center", ncols=len(methods))  # in the headroom, off the bars
    axes[0].set_ylim(top=axes[0].get_ylim()[1] * 1.2)
    axes[1].set_yscale("log")
    axes[1].set_ylim(top=axes[1].get_ylim()[1] * 4)
    fig.suptitle(title)
    return save_chart(fig, path, chart)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--generation", choices=sorted(GENERATIONS), default="ovis1.6",
                   help="sizes of Ovis1.6-Gemma2-9B (default) or Ovis2.5-9B")
    p.add_argument("--sizes", help="comma-separated N (visual tokens; default per --generation)")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 3 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="N=196, bf16, 2 repeats")
    p.add_argument("--sweep", action="store_true", help="CUDA: also time product-kernel configs")
    p.add_argument("--chunk-mb", type=float, default=kernels.DEFAULT_CHUNK_MB,
                   help="row-chunk memory budget (MiB) of the chunked and packed methods")
    p.add_argument("--out", help="output folder (default benchmarks/out/)")
    p.add_argument("--chart", action="store_true", help="also write docs/charts/visual_embed.png")
    a = p.parse_args(argv)

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available()
                          else a.device if a.device != "auto" else "cpu")
    d, indicators, default_sizes, name = GENERATIONS[a.generation]
    sizes = [196] if a.quick else [int(s) for s in (a.sizes or default_sizes).split(",")]
    dtypes = ["bf16"] if a.quick else a.dtypes.split(",")
    repeats = 2 if a.quick else a.repeats or (20 if device.type == "cuda" else 3)
    if device.type == "cpu":
        _cpu_setup_allocator()
    out = out_dir(a.out)

    from tqdm import tqdm
    # unfused, chunked, gemm + triton (CUDA) or packed (CPU, where oneDNN takes the dtype)
    n_methods = sum(4 if device.type == "cuda" or kernels.onednn_unavailable(DTYPES[dt]) is None else 3
                    for dt in dtypes)
    rows = []
    with tqdm(total=len(sizes) * n_methods, desc="visual_embed") as progress:
        for dtype_name in dtypes:
            for n in sizes:
                rows += run_case(n, dtype_name, device, repeats, a.warmup, progress, a.chunk_mb, d=d,
                                 indicators=indicators)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    result = dict(command=command_line(__spec__.name, argv), device=device.type, machine=machine_info(), V=V, D=d,
                  generation=a.generation, chunk_mb=a.chunk_mb, repeats=repeats, warmup=a.warmup, results=rows)
    if a.sweep and device.type == "cuda":
        result["sweep"] = sweep_triton(sizes, device, repeats)
    write_json(out / f"{name}.json", result)
    charts = plot(rows, out / f"{name}.png",
                  f"{a.generation} visual embedding, V={V}, D={d} on {machine_name(result['machine'])}", a.chart)
    print(markdown_table(rows))
    print("wrote", out / f"{name}.json", *charts)
    return result


if __name__ == "__main__":
    main()
