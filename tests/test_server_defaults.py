"""server.py's defaults come from the served checkpoint's member: chat template, system prompt,
stop tokens and the context length (multimodal_max_length)."""

from __future__ import annotations

import base64
import json
import os

import httpx
import openai
import pytest

from ovis_vllm.engine.chat_template import (
    GEMMA_CHAT_TEMPLATE,
    GEMMA_SYSTEM_MERGE_CHAT_TEMPLATE,
    LLAMA3_CHAT_TEMPLATE,
    QWEN_CHAT_TEMPLATE,
)
from ovis_vllm.server import build_argv
from tests.conftest import SEED
from tests.helpers import SIDE, png_bytes, rand_image, running_server
from tests.ovis_reference import ReferenceOvis


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    from ovis_vllm.engine.checkpoints import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("llama"), "ovis1.6-llama3.2-3b", seed=SEED)


def _value(argv, flag):
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_gemma_defaults(tiny_checkpoint):
    argv = build_argv(["--model", str(tiny_checkpoint)])
    assert _value(argv, "--chat-template") == GEMMA_CHAT_TEMPLATE
    assert "--max-model-len" not in argv  # Gemma2 allows 8192 = multimodal_max_length
    merged = build_argv(["--model", str(tiny_checkpoint), "--system-prompt", "merge"])
    assert _value(merged, "--chat-template") == GEMMA_SYSTEM_MERGE_CHAT_TEMPLATE


def test_slow_bf16_is_warned_about_on_cpus_without_onednn_bf16(tiny_checkpoint, monkeypatch, caplog):
    """bf16 (given, or `auto`, which vLLM resolves to bf16 on CPU for this fp32 checkpoint) on
    a CPU where oneDNN has no bf16 matmul: one warning naming --dtype float32; the dtype stays
    the user's. fp32, or a CPU with oneDNN bf16: no warning."""
    import torch

    from ovis_vllm import kernels, server

    if torch.cuda.is_available():
        pytest.skip("a CPU-platform warning")
    monkeypatch.setattr(kernels.cpu, "onednn_unavailable", lambda dtype: "patched: no bf16 matmul")
    for dtype_args, warned in [([], True), (["--dtype", "bfloat16"], True), (["--dtype", "float32"], False)]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="ovis.server"):
            argv = build_argv(["--model", str(tiny_checkpoint), *dtype_args])
        assert argv.count("--dtype") == len(dtype_args) // 2
        assert ("Pass --dtype float32" in caplog.text) == warned, (dtype_args, caplog.text)
        assert ("patched: no bf16 matmul" in caplog.text) == warned
    monkeypatch.setattr(kernels.cpu, "onednn_unavailable", lambda dtype: None)
    assert server.slow_bf16_warning(["--model", str(tiny_checkpoint)], server.load_checkpoint_config(
        ["--model", str(tiny_checkpoint)])) is None


def test_llama_defaults(llama_checkpoint):
    argv = build_argv(["--model", str(llama_checkpoint)])
    assert _value(argv, "--chat-template") == LLAMA3_CHAT_TEMPLATE
    assert _value(argv, "--max-model-len") == "8192"  # Llama 3.2 allows 131072
    # The guide's multimodal_max_length override, the vLLM way.
    overridden = build_argv(["--model", str(llama_checkpoint),
                             "--hf-overrides", json.dumps({"multimodal_max_length": 4096})])
    assert _value(overridden, "--max-model-len") == "4096"
    # What the user gives is kept.
    given = build_argv(["--model", str(llama_checkpoint), "--max-model-len", "2048",
                        "--chat-template", "{{ 'x' }}"])
    assert _value(given, "--max-model-len") == "2048" and _value(given, "--chat-template") == "{{ 'x' }}"
    with pytest.raises(SystemExit, match="has one"):  # Llama 3 has a system role
        build_argv(["--model", str(llama_checkpoint), "--system-prompt", "merge"])


def test_ovis2_defaults(tmp_path):
    from ovis_vllm.engine.checkpoints import write_checkpoint

    path = write_checkpoint(tmp_path / "ovis2", "ovis2-1b", seed=SEED)
    argv = build_argv(["--model", str(path)])
    assert _value(argv, "--chat-template") == QWEN_CHAT_TEMPLATE
    assert "--max-model-len" not in argv  # Qwen2.5 allows 32768 = multimodal_max_length


def test_thinking_defaults(tiny_checkpoint, tmp_path):
    """Ovis2.5/2.6: the qwen3 reasoning parser and the reference's thinking budget, each unless
    the user chose otherwise (a user's logits processors are kept beside ours); none of it where
    vLLM cannot take it (speculative decoding, a pooling runner). Ovis1.6/2: the processor that
    refuses a budget with the reason; no reasoning parser."""
    from ovis_vllm.engine.checkpoints import write_checkpoint

    ours = "ovis_vllm.engine.thinking:ThinkingBudget"
    path = str(write_checkpoint(tmp_path / "ovis2.5", "ovis2.5-2b", seed=SEED))
    argv = build_argv(["--model", path])
    assert _value(argv, "--reasoning-parser") == "qwen3" and _value(argv, "--logits-processors") == ours
    chosen = build_argv(["--model", path, "--reasoning-parser", "deepseek_r1", "--logits-processors", "my.mod:Proc"])
    assert _value(chosen, "--reasoning-parser") == "deepseek_r1" and chosen.count("--reasoning-parser") == 1
    i = chosen.index("--logits-processors")
    assert chosen[i + 1:i + 3] == [ours, "my.mod:Proc"] and chosen.count("--logits-processors") == 1
    equals = build_argv(["--model", path, "--logits-processors=my.mod:Proc"])
    i = equals.index("--logits-processors")
    assert equals[i + 1:i + 3] == [ours, "my.mod:Proc"]
    speculative = build_argv(["--model", path, "--speculative-config", '{"method": "ngram"}'])
    assert "--logits-processors" not in speculative and _value(speculative, "--reasoning-parser") == "qwen3"
    assert "--logits-processors" not in build_argv(["--model", path, "--runner", "pooling"])
    gemma = build_argv(["--model", str(tiny_checkpoint)])
    assert _value(gemma, "--logits-processors") == "ovis_vllm.engine.thinking:NoThinking"
    assert "--reasoning-parser" not in gemma


def test_image_limit_only_on_checkpoints_we_implement(tiny_checkpoint, tmp_path):
    """Our 8-image default is for the members this plugin serves; any other checkpoint (an
    Ovis2.5-shaped one, which vLLM's built-in serves, or a text-only Llama) keeps vLLM's own
    limits, so going through server.py never refuses what vLLM alone accepts."""
    assert json.loads(_value(build_argv(["--model", str(tiny_checkpoint)]), "--limit-mm-per-prompt")) == {"image": 8}
    others = {"ovis2.5": {"architectures": ["Ovis2_5"], "model_type": "ovis2_5"},
              "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                        "num_attention_heads": 1, "num_hidden_layers": 1, "vocab_size": 128}}
    for name, config in others.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        argv = build_argv(["--model", str(tmp_path / name)])
        assert "--limit-mm-per-prompt" not in argv, (name, argv)
    given = build_argv(["--model", str(tmp_path / "llama"), "--limit-mm-per-prompt", '{"image": 2}'])
    assert _value(given, "--limit-mm-per-prompt") == '{"image": 2}'


def test_our_flags_go_to_the_environment(tiny_checkpoint, monkeypatch):
    """Taken out of vLLM's argv into variables that every process vLLM starts inherits."""
    limits = {"--image-url-max-bytes": "OVIS_IMAGE_URL_MAX_BYTES",
              "--image-url-redirects": "OVIS_IMAGE_URL_REDIRECTS",
              "--max-request-bytes": "OVIS_MAX_REQUEST_BYTES"}
    for env in limits.values():
        monkeypatch.setenv(env, "7")  # restored after the test
    argv = build_argv(["--model", str(tiny_checkpoint), "--image-url-max-bytes", "1000",
                       "--image-url-redirects=2"])
    assert not set(limits) & {a.split("=")[0] for a in argv}
    assert [os.environ[env] for env in limits.values()] == ["1000", "2", "7"]
    assert _value(argv, "--middleware") == "ovis_vllm.server.RequestBodyLimit"
    with pytest.raises(SystemExit, match="integer >= 0"):
        build_argv(["--model", str(tiny_checkpoint), "--max-request-bytes", "-1"])


def test_explicit_longer_context_is_refused(llama_checkpoint):
    with pytest.raises(SystemExit, match="exceeds this checkpoint's multimodal_max_length 8192"):
        build_argv(["--model", str(llama_checkpoint), "--max-model-len", "16384"])


@pytest.fixture(scope="module")
def llama_server(llama_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    args = ["--model", str(llama_checkpoint), "--served-model-name", "llama", "--dtype", "float32",
            "--enforce-eager", "--max-num-seqs", "4", "--seed", "0"]
    with running_server(args, log, env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as base:
        yield base, log


def test_llama_server_serves_the_reference_format(llama_server, llama_checkpoint):
    base, log = llama_server
    reference = ReferenceOvis(llama_checkpoint)
    [model] = httpx.get(base + "/v1/models").json()["data"]
    assert model["max_model_len"] == 8192
    assert "multimodal_max_length" in log.read_text()  # logged at start-up

    image = rand_image(3 * SIDE, 2 * SIDE, 5)
    url = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    for system in (None, "  Answer briefly. "):
        turns = ([("system", system)] if system else []) + [("user", "<image>\nDescribe it.")]
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "Describe it."}]}]
        tokens = httpx.post(base + "/tokenize", json={"model": "llama", "messages": messages,
                                                      "add_generation_prompt": True}).json()["tokens"]
        _, want = reference.merged_embeddings(reference.format_conversation(turns), [image])
        assert tokens == [reference.image_pad_id if t < 0 else t for t in want]

    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="llama", max_tokens=4, temperature=0,
                                           messages=messages)
    assert reply.usage.prompt_tokens == len(want)
    with pytest.raises(openai.BadRequestError, match="no image was given"):
        client.chat.completions.create(model="llama", max_tokens=4, messages=[
            {"role": "user", "content": "What does <image> mean?"}])


def test_local_files_refused_with_a_4xx_and_the_connection_kept(llama_server):
    """This server has no --allowed-local-media-path: a file:// image is the client's error (vLLM
    alone answers 500 and drops the keep-alive connection); the next request on the same
    connection is served."""
    base, _ = llama_server
    body = {"model": "llama", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}},
        {"type": "text", "text": "Describe."}]}]}
    with httpx.Client(base_url=base, timeout=120) as http:
        refused = http.post("/v1/chat/completions", json=body)
        assert refused.status_code == 400, refused.text
        assert "--allowed-local-media-path" in refused.json()["error"]["message"]
        text_only = dict(body, messages=[{"role": "user", "content": "Hello."}])
        assert http.post("/v1/chat/completions", json=text_only).status_code == 200
