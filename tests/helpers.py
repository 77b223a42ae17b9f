"""What the tests share: generated images, engines, prompts and the parity check against the
independent reference (tests/ovis_reference.py). Test modules import from here, never from one
another."""

from __future__ import annotations

import base64
import contextlib
import gc
import io
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# fp32 end to end; the measured max |diff| over many seeds is ~1e-5.
PROMPT_LOGPROB_ATOL = 2e-4
GREEDY_TIE_GAP = 1e-3
MAX_NEW_TOKENS = 8
# bf16 engines against the fp32 reference. Measured: max |diff| 0.031 between a GPTQ engine and
# the same weights dequantized to a float checkpoint; another seed's weights differ by ~2.8.
BF16_LOGPROB_ATOL = 0.1
BF16_TIE_GAP = 0.2
SIDE = 76  # the test presets' image side


PARALLEL_SIZES = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")


def make_llm(model, in_process: bool = True, **kwargs):
    """An offline engine with the tests' defaults. A single-rank one runs its engine core and
    worker in this process (see in_process_engine_core): the same model code and scheduler,
    without two spawned processes that each import vLLM (~30 s per engine on a 2-core CPU).
    Multi-rank engines, and every server the tests start, keep vLLM's processes, as does an
    engine made with in_process=False: a MoE model's, whose expert-parallel group vLLM creates
    only when the first engine of a process is MoE (the in-process engines share this process's
    groups, see shutdown)."""
    from vllm import LLM

    # LLM.apply_model() pickles a test's function to the workers; tests only.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

    args = dict(model=str(model), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.5,
                max_model_len=8192, max_num_seqs=32, limit_mm_per_prompt={"image": 4}, seed=0,
                enable_prefix_caching=True)
    args.update(kwargs)
    if not in_process or any(args.get(size, 1) > 1 for size in PARALLEL_SIZES):
        return LLM(**args)
    with in_process_engine_core():
        return LLM(**args)


def start_two_rank_engine(checkpoint, **kwargs):
    """An engine over 2 ranks on vLLM's CPU backend, each rank's OpenMP pool on its own core."""
    with environ_set("VLLM_CPU_OMP_THREADS_BIND", "0|1"):
        return make_llm(checkpoint, **{"max_num_seqs": 8, "distributed_executor_backend": "mp", **kwargs})


@contextlib.contextmanager
def environ_set(name: str, value: str):
    """One environment variable set for the block, then restored (or removed) exactly; the
    rest of os.environ, which vLLM itself writes while building an engine, is left alone."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def in_process_engine_core():
    """Engines built inside run in this process: vLLM's VLLM_ENABLE_V1_MULTIPROCESSING=0 (which
    also keeps the CPU platform on the single-process executor, without OpenMP thread binding).
    The variable is restored afterwards, so servers and subprocesses started later get vLLM's
    defaults, and vLLM's cache of environment variables (frozen by an in-process engine core)
    is dropped, so later engines read the environment afresh."""
    import vllm.envs

    try:
        with environ_set("VLLM_ENABLE_V1_MULTIPROCESSING", "0"):
            yield
    finally:
        vllm.envs.disable_envs_cache()


def shutdown(llm) -> None:
    """Stops an engine. An in-process engine core's shutdown also tears down this process's
    distributed state (world-size-1 groups), which every in-process engine shares: it is kept
    for the engines still running (the session's `llm` outlives each module's engines)."""
    from unittest import mock

    from vllm.v1.engine import core

    with mock.patch.object(core, "cleanup_dist_env_and_memory", gc.collect):
        llm.llm_engine.engine_core.shutdown()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with no pixel data behind it."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def running_server(args: list[str], log: Path, env: dict | None = None, timeout: float = 180):
    """server.py with `args` on a free loopback port; yields its base URL once /health answers,
    and stops it afterwards. Fails with the end of its log if it does not come up."""
    import httpx
    import pytest

    port = free_port()
    cmd = [sys.executable, str(ROOT / "server.py"), *args, "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=dict(os.environ, **(env or {})))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("server did not start:\n" + log.read_text()[-3000:])
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def rand_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth-ish content so crops and resizes carry signal, not just noise.
    base = rng.integers(0, 256, (max(1, height // 8 + 1), max(1, width // 8 + 1), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((width, height), Image.BILINEAR)
    noise = rng.integers(0, 40, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(np.asarray(img) // 2 + noise).convert(mode)


def chat_prompt(tokenizer, turns: list[tuple[str, str]], chat_template: str | None = None) -> str:
    """The prompt text of a conversation, with the tokenizer's template or the one given (the
    served template of a member: engine.members)."""
    messages = [{"role": r, "content": t} for r, t in turns]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         chat_template=chat_template)


def run_engine(llm, cases, max_new_tokens=MAX_NEW_TOKENS, chat_template=None, lora_request=None,
               **sampling):
    """cases: list of (turns, images). One batched generate call for all of them (`lora_request`:
    one LoRARequest or None for all, or one per case)."""
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=max_new_tokens, prompt_logprobs=1,
                            logprobs=1, **sampling)
    requests = []
    for turns, images in cases:
        req = {"prompt": chat_prompt(tokenizer, turns, chat_template)}
        if images:
            req["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
        requests.append(req)
    return llm.generate(requests, params, use_tqdm=False, lora_request=lora_request)


def assert_parity(out, reference, turns, images, atol=PROMPT_LOGPROB_ATOL, tie_gap=GREEDY_TIE_GAP,
                  **mm_kwargs):
    raw = reference.format_conversation(turns)
    embeds, ref_ids = reference.merged_embeddings(raw, images, **mm_kwargs)
    ids = list(out.prompt_token_ids)

    # Same expanded prompt: placeholders exactly where the reference has visual positions.
    assert len(ids) == len(ref_ids), (len(ids), len(ref_ids))
    for i, (a, b) in enumerate(zip(ids, ref_ids)):
        assert (a == reference.image_pad_id) if b < 0 else (a == b), f"position {i}: engine {a}, reference {b}"

    # Prompt log-probabilities of every prompt token.
    logprobs = torch.log_softmax(reference.logits(embeds), dim=-1)
    diffs = [abs(out.prompt_logprobs[i][ids[i]].logprob - logprobs[i - 1, ids[i]].item())
             for i in range(1, len(ids))]
    assert max(diffs) < atol, f"max prompt logprob diff {max(diffs):.2e}"

    # Greedy continuation.
    got = list(out.outputs[0].token_ids)
    want, step_logits = reference.greedy(embeds, len(got) if got else MAX_NEW_TOKENS)
    for k, (a, b) in enumerate(zip(got, want)):
        if a != b:
            top2 = step_logits[k].topk(2).values
            assert (top2[0] - step_logits[k][a]).item() < tie_gap, (
                f"greedy token {k}: engine {a}, reference {b} (no near-tie)")
            break
    else:
        assert got == want[: len(got)]
    return max(diffs)


def served_output(reply):
    """A chat reply with vLLM's `return_token_ids` and `prompt_logprobs`, shaped as the offline
    output that assert_parity reads."""
    from types import SimpleNamespace

    extra = reply.model_extra
    logprobs = [None if p is None else {int(t): SimpleNamespace(logprob=v["logprob"]) for t, v in p.items()}
                for p in extra["prompt_logprobs"]]
    return SimpleNamespace(prompt_token_ids=extra["prompt_token_ids"], prompt_logprobs=logprobs,
                           outputs=[SimpleNamespace(token_ids=reply.choices[0].model_extra["token_ids"])])


def tokens(outs):
    return [list(o.outputs[0].token_ids) for o in outs]


def prompt_logprobs(out):
    ids = out.prompt_token_ids
    return [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]


def vllm_packs(dtype) -> bool:
    """Whether vLLM's own CPU GEMM dispatch (dispatch_cpu_unquantized_gemm) packs a Linear weight
    of `dtype` on this machine: it then frees the weight, its torch fallback keeps it. The weight
    (4 MiB in bf16) is above vLLM's 1 MiB cutoff for its AMX small-GEMM kernel, so on any CPU
    this asks its oneDNN branch, the one the packing choice mirrors."""
    import torch
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(4096, 512).to(dtype), requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    out = layer.cpu_linear(torch.randn(3, 512).to(dtype), layer.weight, None)  # the chosen GEMM runs
    assert out.shape == (3, 4096)
    return layer.weight.numel() == 0


def with_extra_token(path):
    """The checkpoint with one token added to its tokenizer (151670 entries for an Ovis2.5
    preset), as a fine-tune that adds a token has it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens(["<|my_fine_tune_token|>"], special_tokens=True)
    tokenizer.save_pretrained(path)
    assert len(tokenizer) == 151670
    return path


def mp4_clip(frames: int, width: int, height: int, seed: int) -> bytes:
    """An mp4 (MPEG-4 part 2) of random frames, written with OpenCV as vLLM's loader reads it."""
    import tempfile

    import cv2

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 4, (width, height))
        for _ in range(frames):
            writer.write(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        writer.release()
        return open(path, "rb").read()
