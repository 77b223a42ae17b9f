"""GPU acceptance in one command (`make gpu-check`), for a machine with a CUDA GPU.

Installs the CUDA build of vLLM into .venv (scripts/install.sh with OVIS_VLLM_BUILD=cuda), then
runs the CUDA-only tests, the visual-embedding kernel benchmark in bf16 with its GEMM floor and
block sweep, and the wide serving benchmark (ours vs vLLM's built-in), and appends a dated
section (GPU, commit, commands, tables, ratios) to benchmarks/RESULTS.md. Meant to finish in
under 10 minutes on one H100; each step has its own time limit.

Without CUDA (no nvidia-smi, or it lists no GPU) it stops at once, before installing anything.

    python3 -m benchmarks.gpu_check          # what `make gpu-check` runs
    python3 -m benchmarks.gpu_check --plan   # print the steps and their commands, run nothing

It starts under any Python 3 (no venv yet) and, once the install is done, runs itself again
inside .venv (--installed), where torch and the benchmark modules can be imported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import OUT, REPO, machine_info

VENV_PYTHON = ".venv/bin/python"
INSTALL_STAMP = REPO / ".venv" / ".ovis-installed"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
KERNEL_SIZES = "196,1960,7840"  # one crop, one 9-crop image, four such images
SERVE_ARGS = ["--preset", "wide", "--workload", "mixed", "--concurrency", "1", "4", "16",
              "--requests", "32", "--repeats", "2",
              # Both servers share the one GPU: vLLM's default would give the first 90% of it.
              "--server-args", "--gpu-memory-utilization 0.4"]


def plan(out: Path = OUT / "gpu-check") -> list[dict]:
    """The steps in order: name, command (run from the repo root), extra environment, time limit."""
    return [
        dict(name="install", cmd=["bash", "scripts/install.sh"], env={"OVIS_VLLM_BUILD": "cuda"}, limit_s=300),
        # The tests that skip without CUDA (the Triton kernels on the GPU, in bf16 at real sizes;
        # the thinking budget on Model Runner V2).
        dict(name="CUDA tests", cmd=[VENV_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                     "tests/test_visual_embed.py", "tests/test_thinking_budget.py", "-k", "cuda"],
             env={}, limit_s=240),
        dict(name="kernel benchmark", cmd=[VENV_PYTHON, "-m", "benchmarks.visual_embed", "--device", "cuda",
                                           "--dtypes", "bf16", "--sizes", KERNEL_SIZES, "--sweep",
                                           "--out", str(out / "kernel")], env={}, limit_s=180),
        dict(name="serving benchmark", cmd=[VENV_PYTHON, "-m", "benchmarks.serve", *SERVE_ARGS,
                                            "--out", str(out / "serve")], env={}, limit_s=420),
    ]


def shell_line(step: dict) -> str:
    return " ".join([f"{k}={v}" for k, v in step["env"].items()] + [shlex.quote(c) for c in step["cmd"]])


def cuda_problem() -> str | None:
    """Why this machine cannot run the GPU check, or None when nvidia-smi lists a GPU."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found"
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi did not run ({exc})"
    if listed.returncode != 0 or "GPU" not in listed.stdout:
        return f"nvidia-smi lists no GPU (exit {listed.returncode}: {(listed.stdout + listed.stderr).strip()[:200]})"
    return None


def stop(message: str) -> int:
    print(f"gpu-check: {message}", file=sys.stderr)
    return 2


def run_step(step: dict, log_dir: Path) -> dict:
    """Run one step from the repo root, its output shown and kept in <log_dir>/<name>.log."""
    print(f"==> {step['name']}: {shell_line(step)}", flush=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / (step["name"].replace(" ", "-") + ".log")
    start = time.monotonic()
    last_line = ""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(step["cmd"], cwd=REPO, env={**os.environ, **step["env"]}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # SIGTERM, so that the serving benchmark still stops the servers it started.
        timer = threading.Timer(step["limit_s"], proc.terminate)
        timer.start()
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            last_line = line.strip() or last_line
        rc = proc.wait()
        timer.cancel()
    seconds = time.monotonic() - start
    timed_out = seconds >= step["limit_s"]
    return dict(name=step["name"], command=shell_line(step), rc=rc, seconds=seconds, log=str(log_path),
                summary=step_summary(step["name"], rc, timed_out, last_line))


def step_summary(name: str, rc: int, timed_out: bool, last_line: str) -> str:
    if timed_out:
        return "stopped at its time limit"
    if name == "CUDA tests" and last_line:  # pytest -q ends with its count: "4 passed, 90 deselected in 12.3s"
        return last_line.strip("= ")
    return "ok" if rc == 0 else f"failed (exit {rc})"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def kernel_part(kernel: dict | None) -> list[str]:
    if kernel is None:
        return ["No kernel results (the step failed; see its log)."]
    from benchmarks.visual_embed import markdown_table

    rows = kernel["results"]
    floor = {r["n"]: r["median_s"] for r in rows if r["method"] == "gemm"}
    lines = [f"`{kernel['command']}` (V={kernel['V']}, D={kernel['D']}, {kernel['repeats']} timed calls per "
             "method). gemm = a plain torch.matmul of the same [N, Vh] x [Vh, D] product in bf16, the floor; "
             "\"of GEMM floor\" = t_gemm / t.", "", markdown_table(rows), "",
             "| N | triton | bf16 GEMM floor | triton / floor (time) |", "|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['median_s'] * 1e3:.3f} ms | {floor[r['n']] * 1e3:.3f} ms "
              f"| {r['median_s'] / floor[r['n']]:.2f}x |" for r in rows if r["method"] == "triton"]
    if kernel.get("sweep"):
        lines += ["", "Block sweep (product kernel), fastest config per N:", ""]
        for n in sorted({s["n"] for s in kernel["sweep"]}):
            best = min((s for s in kernel["sweep"] if s["n"] == n), key=lambda s: s["median_s"])
            lines.append(f"- N={n}: {best['median_s'] * 1e3:.3f} ms with {best['config']}")
    return lines


def serve_part(serve: dict | None) -> list[str]:
    if serve is None:
        return ["No serving results (the step failed; see its log)."]
    from benchmarks.serve import markdown_tables

    return [f"`{serve['command']}`", "", markdown_tables(serve)]


def results_section(when: datetime.datetime, machine: dict, commit: str, steps: list[dict],
                    kernel: dict | None, serve: dict | None) -> str:
    """The dated RESULTS.md section of one GPU check, from its steps and the benchmarks' JSON."""
    gpu = machine.get("gpu", "no GPU seen by torch")
    versions = ", ".join(f"{k} {machine[k]}" for k in ("python", "torch", "vllm", "triton") if k in machine)
    lines = [f"## GPU check, {when:%Y-%m-%d %H:%M} UTC, {gpu}", "",
             f"`make gpu-check` (benchmarks/gpu_check.py) at commit {commit}, "
             f"{sum(s['seconds'] for s in steps) / 60:.1f} minutes in all. Machine: {gpu}; "
             f"{machine['cpu']}, {machine['cpus']} CPUs; {versions}.", "",
             "| step | command | result | time |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | `{s['command']}` | {s['summary']} | {s['seconds']:.0f} s |" for s in steps]
    lines += ["", "### Visual embedding kernel, bf16", "", *kernel_part(kernel), "",
              "### Serving: wide preset, mixed workload, ours vs vLLM's built-in", "", *serve_part(serve)]
    return "\n".join(lines) + "\n"


def append_section(section: str, results: Path = RESULTS) -> None:
    text = results.read_text()
    results.write_text(text.rstrip("\n") + "\n\n" + section)


def after_install(out: Path) -> int:
    """Inside .venv: every step after the install, then the RESULTS.md section."""
    import torch

    if not torch.cuda.is_available():
        return stop("torch in .venv does not see CUDA after the install (is it the CUDA build?)")
    started = datetime.datetime.now(datetime.timezone.utc)
    kernel_json, serve_json = out / "kernel" / "visual_embed.json", out / "serve" / "serve.json"
    for earlier in (kernel_json, serve_json):  # a failed step must not report an earlier run's figures
        earlier.unlink(missing_ok=True)
    steps = [json.loads((out / "install.json").read_text())]
    steps += [run_step(step, out) for step in plan(out)[1:]]
    section = results_section(started, machine_info(), git_commit(), steps, read_json(kernel_json), read_json(serve_json))
    append_section(section)
    print(section)
    print(f"appended to {RESULTS}")
    return 0 if all(s["rc"] == 0 for s in steps) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", action="store_true", help="print the steps and their commands, run nothing")
    ap.add_argument("--out", type=Path, default=OUT / "gpu-check", help="logs and benchmark JSON")
    ap.add_argument("--installed", action="store_true", help=argparse.SUPPRESS)  # the second stage
    args = ap.parse_args(argv)
    args.out = args.out.resolve()  # the second stage starts in the repo root
    if args.plan:
        for step in plan(args.out):
            print(f"{step['name']} (limit {step['limit_s']} s): {shell_line(step)}")
        return 0
    if args.installed:
        return after_install(args.out)

    problem = cuda_problem()
    if problem:
        return stop(f"needs a CUDA GPU: {problem}. Nothing was installed or run.")
    if INSTALL_STAMP.exists() and INSTALL_STAMP.read_text().startswith("cpu"):
        return stop(".venv holds the CPU build of vLLM; remove .venv and run again. Nothing was installed or run.")
    install = run_step(plan(args.out)[0], args.out)
    if install["rc"] != 0:
        return stop(f"the install failed ({install['summary']}); see {install['log']}")
    (args.out / "install.json").write_text(json.dumps(install))
    venv_python = str(REPO / VENV_PYTHON)
    os.chdir(REPO)  # the second stage imports `benchmarks` from the repo root
    os.execv(venv_python, [venv_python, "-m", "benchmarks.gpu_check", "--installed", "--out", str(args.out)])


if __name__ == "__main__":
    sys.exit(main())
