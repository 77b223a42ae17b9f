"""benchmarks/gpu_check.py (`make gpu-check`) on a machine without CUDA: everything but the GPU run.

The no-CUDA stop, the order of the steps, the RESULTS.md section from sample results, and the
kernel benchmark's GEMM floor at toy sizes on CPU. Seconds in all.
"""

import datetime
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_check, visual_embed
from benchmarks.common import REPO


def fake_tools(folder, nvidia_smi_exit, gpu_line="GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"):
    """A PATH with only a fake nvidia-smi and a fake bash that records how it was called."""
    folder.mkdir()
    (folder / "nvidia-smi").write_text(f"#!/bin/sh\necho '{gpu_line}'\nexit {nvidia_smi_exit}\n")
    (folder / "bash").write_text(f'#!/bin/sh\necho "$OVIS_VLLM_BUILD $*" > {folder}/bash-called\nexit 3\n')
    for tool in ("nvidia-smi", "bash"):
        (folder / tool).chmod(0o755)
    return folder


@pytest.mark.parametrize("nvidia_smi", ["absent", "fails"])
def test_stops_without_cuda_before_installing(tmp_path, nvidia_smi):
    tools = tmp_path / "bin"
    tools.mkdir() if nvidia_smi == "absent" else fake_tools(tools, nvidia_smi_exit=9)
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path / "out")],
                         cwd=REPO, env={"PATH": str(tools)}, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "needs a CUDA GPU" in run.stderr and "Nothing was installed" in run.stderr
    assert not (tools / "bash-called").exists() and not (tmp_path / "out").exists()


def test_with_a_gpu_the_install_comes_first(tmp_path, monkeypatch, capsys):
    tools = fake_tools(tmp_path / "bin", nvidia_smi_exit=0)
    monkeypatch.setenv("PATH", str(tools))
    monkeypatch.setattr(gpu_check, "INSTALL_STAMP", tmp_path / "no-venv-yet")
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    assert (tools / "bash-called").read_text().strip() == "cuda scripts/install.sh"
    assert "the install failed" in capsys.readouterr().err


def test_refuses_a_venv_with_the_cpu_build(tmp_path, monkeypatch, capsys):
    tools = fake_tools(tmp_path / "bin", nvidia_smi_exit=0)
    monkeypatch.setenv("PATH", str(tools))
    stamp = tmp_path / ".ovis-installed"
    stamp.write_text("cpu 0123456789abcdef\n")
    monkeypatch.setattr(gpu_check, "INSTALL_STAMP", stamp)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    assert "remove .venv" in capsys.readouterr().err and not (tools / "bash-called").exists()


def test_second_stage_stops_when_torch_sees_no_cuda(tmp_path, capsys):
    assert not torch.cuda.is_available()
    assert gpu_check.main(["--installed", "--out", str(tmp_path)]) == 2
    assert "does not see CUDA" in capsys.readouterr().err


def test_plan(tmp_path, capsys):
    steps = gpu_check.plan(tmp_path)
    assert [s["name"] for s in steps] == ["install", "CUDA tests", "kernel benchmark", "serving benchmark"]
    install, tests, kernel, serve = (gpu_check.shell_line(s) for s in steps)
    assert install == "OVIS_VLLM_BUILD=cuda bash scripts/install.sh"
    assert "pytest" in tests and "tests/test_visual_embed.py tests/test_thinking_budget.py -k cuda" in tests
    assert "-m benchmarks.visual_embed --device cuda --dtypes bf16" in kernel and "--sweep" in kernel
    assert "-m benchmarks.serve --preset wide" in serve and "'--gpu-memory-utilization 0.4'" in serve
    assert sum(s["limit_s"] for s in steps) <= 20 * 60
    assert gpu_check.main(["--plan", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("\n") == 4


def test_run_step_keeps_the_log_and_the_summary(tmp_path):
    tests = dict(name="CUDA tests", cmd=[sys.executable, "-c", "print('4 passed, 90 deselected in 1.2s')\nprint()"],
                 env={}, limit_s=60)
    done = gpu_check.run_step(tests, tmp_path)
    assert done["rc"] == 0 and done["summary"] == "4 passed, 90 deselected in 1.2s"
    assert "4 passed" in (tmp_path / "CUDA-tests.log").read_text()
    slow = dict(name="serving benchmark", cmd=[sys.executable, "-c", "import time; time.sleep(30)"], env={}, limit_s=1)
    done = gpu_check.run_step(slow, tmp_path)
    assert done["rc"] != 0 and done["summary"] == "stopped at its time limit" and done["seconds"] < 10


def kernel_row(n, method, ms, frac):
    return dict(n=n, dtype="bf16", method=method, median_s=ms / 1e3, times_s=[ms / 1e3], tflops=1.0,
                peak_extra_mb=10.0, frac_of_gemm=frac, time_vs_unfused=1.0, mem_vs_unfused=1.0,
                rel_diff_vs_unfused=0.0)


SAMPLE_KERNEL = dict(
    command="python -m benchmarks.visual_embed --device cuda --dtypes bf16 --sweep", V=65536, D=3584, repeats=20,
    results=[kernel_row(1960, "unfused", 2.0, 0.5), kernel_row(1960, "chunked", 3.0, 0.33),
             kernel_row(1960, "triton", 1.25, 0.8), kernel_row(1960, "gemm", 1.0, 1.0)],
    sweep=[dict(n=1960, config=dict(BLOCK_M=128, SPLIT=1), median_s=1.3e-3),
           dict(n=1960, config=dict(BLOCK_M=64, SPLIT=2), median_s=1.2e-3)])


def serve_row(server, rate):
    return dict(server=server, concurrency=4, requests=32, requests_per_s=rate, requests_per_s_min=rate * 0.98,
                requests_per_s_max=rate * 1.02, output_tokens_per_s=rate * 32, errors=0, peak_rss_MiB=3000.0,
                ttft_ms={"p50": 40.0, "p90": 60.0, "p99": 70.0}, itl_ms={"p50": 5.0, "p90": 6.0, "p99": 9.0})


SAMPLE_SERVE = dict(
    command="python -m benchmarks.serve --preset wide", rows=[serve_row("ours", 12.0), serve_row("builtin", 10.0)],
    ratios=[dict(concurrency=4, requests_per_s=1.2, pair_min=1.18, pair_max=1.22, spread=0.04,
                 worst_over_best=1.15, verdict="ahead", peak_rss=0.8)])


def test_results_section_from_sample_results(tmp_path):
    steps = [dict(name=s["name"], command=gpu_check.shell_line(s), rc=0, seconds=60.0, summary="ok")
             for s in gpu_check.plan(tmp_path)]
    machine = dict(gpu="NVIDIA H100 80GB HBM3", cpu="Intel Xeon", cpus=16, python="3.11.7", torch="2.13.0")
    when = datetime.datetime(2026, 12, 1, 9, 30)
    section = gpu_check.results_section(when, machine, "abc1234", steps, SAMPLE_KERNEL, SAMPLE_SERVE)
    assert section.startswith("## GPU check, 2026-12-01 09:30 UTC, NVIDIA H100 80GB HBM3\n")
    assert "commit abc1234, 4.0 minutes in all" in section and "16 CPUs" in section
    assert "| install | `OVIS_VLLM_BUILD=cuda bash scripts/install.sh` | ok | 60 s |" in section
    assert "| 1960 | bf16 | triton | 1.2 ms |" in section  # the kernel table
    assert "| 1960 | 1.250 ms | 1.000 ms | 1.25x |" in section  # triton against the bf16 GEMM floor
    assert "N=1960: 1.200 ms with {'BLOCK_M': 64, 'SPLIT': 2}" in section  # the sweep's best
    assert "| ours | 4 | 12.000 (11.760-12.240) |" in section and "| 4 | 1.200 | 1.180-1.220 |" in section

    # A failed benchmark still gets its section, saying so.
    failed = gpu_check.results_section(when, machine, "abc1234", steps, None, None)
    assert "No kernel results" in failed and "No serving results" in failed

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nearlier text\n")
    gpu_check.append_section(section, results)
    assert results.read_text() == "# Benchmark results\n\nearlier text\n\n" + section


def test_gemm_floor_on_cpu():
    """The kernel benchmark's rows at toy sizes: gemm is the same [N, Vh] x [Vh, D] product."""
    from tqdm import tqdm

    v, d = 64 + visual_embed.kernels.NUM_INDICATORS, 16
    logits, w, b, vte = visual_embed.make_inputs(8, torch.float32, torch.device("cpu"), v=v, d=d)
    assert torch.equal(visual_embed.gemm_floor(logits, vte)(), logits @ vte[:64])
    with tqdm(disable=True) as progress:
        rows = visual_embed.run_case(8, "fp32", torch.device("cpu"), 2, 1, progress, chunk_mb=0.001, v=v, d=d)
    by_method = {r["method"]: r for r in rows}
    assert {"unfused", "chunked", "gemm"} <= set(by_method)
    assert by_method["gemm"]["frac_of_gemm"] == 1.0
    for r in rows:
        assert r["frac_of_gemm"] == pytest.approx(by_method["gemm"]["median_s"] / r["median_s"])
        assert r.get("rel_diff_vs_unfused", 0) < 1e-5
    assert "| 8 | fp32 | gemm |" in visual_embed.markdown_table(rows)


@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
def test_kernel_benchmark_marks_the_path_this_cpu_serves(dtype_name):
    """Every dtype runs on any CPU (bf16 on AVX2 died at packing); `served` is the packed method
    where vLLM's oneDNN takes the dtype here, else the chunked one."""
    from tqdm import tqdm

    v, d = 64 + visual_embed.kernels.NUM_INDICATORS, 16
    with tqdm(disable=True) as progress:
        rows = visual_embed.run_case(8, dtype_name, torch.device("cpu"), 1, 1, progress, v=v, d=d)
    why = visual_embed.kernels.onednn_unavailable(visual_embed.DTYPES[dtype_name])
    assert [r["method"] for r in rows if r["served"]] == ["chunked" if why else "packed"]
    assert ("packed" in {r["method"] for r in rows}) == (why is None)
    assert "(served)" in visual_embed.markdown_table(rows)


def test_the_cuda_tests_step_selects_the_cuda_tests():
    """`-k cuda` in the plan picks exactly the tests that skip without CUDA, and some."""
    tests = next(s for s in gpu_check.plan() if s["name"] == "CUDA tests")
    collect = [sys.executable, *tests["cmd"][1:], "--collect-only"]
    listed = subprocess.run(collect, cwd=REPO, capture_output=True, text=True, timeout=120).stdout.splitlines()
    selected = [line for line in listed if "::" in line]
    assert len(selected) >= 4 and all("::test_cuda_" in line for line in selected)
