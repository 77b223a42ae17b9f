"""LoRA adapters on every member, and merged fine-tunes, against the independent reference.

The adapters are PEFT adapters as ms-swift writes them for Ovis (engine/checkpoints/lora_adapters.py: rank,
alpha, an LLM-anchored target regex), with random A and B so that they change the answers. The
oracle of a request through an adapter is the reference (tests/ovis_reference.py) run on the
checkpoint with that adapter merged in fp64 (PEFT's merge_and_unload), in fp32: every prompt
log-probability within PROMPT_LOGPROB_ATOL and the same greedy tokens, for several adapters and
the base model in one batch.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from types import SimpleNamespace

import httpx
import openai
import pytest

from ovis_vllm.engine.checkpoints.lora_adapters import merge_lora_adapter, write_lora_adapter
from ovis_vllm.engine.members import member_of
from tests.conftest import SEED
from tests.helpers import (
    SIDE,
    assert_parity,
    data_url,
    make_llm,
    png_bytes,
    prompt_logprobs,
    rand_image,
    run_engine,
    running_server,
    served_output,
    shutdown,
)
from tests.ovis_reference import ReferenceOvis

MAX_RANK = 8
# ms-swift's defaults (r 8, alpha 32, all linear layers of the LLM), and PEFT's own defaults for
# attention-only adapters at another rank and alpha.
ADAPTERS = {"all-linear": dict(rank=8, alpha=32),
            "qv": dict(rank=4, alpha=8, layers=("q_proj", "v_proj"))}


def lora_request(name: str, path):
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, list(ADAPTERS).index(name) + 1, str(path))


def write_adapters(base, root, seed):
    """{name: (adapter dir, merged checkpoint, reference on it)} for ADAPTERS."""
    out = {}
    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        adapter = write_lora_adapter(base, root / name, seed=seed + i, **kwargs)
        merged = merge_lora_adapter(base, adapter, root / f"{name}-merged")
        out[name] = SimpleNamespace(adapter=adapter, merged=merged, reference=ReferenceOvis(merged))
    return out


def _turns(text):
    return [("user", text)]


CASES = [
    (_turns("<image>\nDescribe the image."), [rand_image(3 * SIDE, 2 * SIDE, 1)]),
    (_turns("<image>\n<image>\nCompare them."), [rand_image(50, 50, 2), rand_image(300, 40, 3)]),
    (_turns("Say something about cats."), []),
]


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory):
    return write_adapters(tiny_checkpoint, tmp_path_factory.mktemp("adapters"), SEED)


@pytest.fixture(scope="module")
def lora_llm(tiny_checkpoint):
    engine = make_llm(tiny_checkpoint, max_num_seqs=16, enable_lora=True, max_lora_rank=MAX_RANK,
                      max_loras=2)
    yield engine
    shutdown(engine)


def test_adapters_and_base_in_one_batch_equal_their_merged_reference(lora_llm, adapters, reference):
    """Ovis1.6-Gemma2 (the embedded default's member): 3 prompts x (base, 2 adapters) in one
    batch, interleaved; each equals the reference on its own weights, and the adapters change
    the answers."""
    choices = [(None, reference)] + [(lora_request(n, a.adapter), a.reference) for n, a in adapters.items()]
    batch = [(case, choice) for case in CASES for choice in choices]
    outs = run_engine(lora_llm, [case for case, _ in batch],
                      lora_request=[request for _, (request, _) in batch])
    for out, ((turns, images), (_, ref)) in zip(outs, batch):
        assert_parity(out, ref, turns, images)
    base, *adapted = [prompt_logprobs(out) for out in outs[:len(choices)]]  # the first prompt
    for logprobs in adapted:
        assert max(abs(a - b) for a, b in zip(base, logprobs)) > 0.05


def test_merged_fine_tune_is_served_like_the_adapter(lora_llm, adapters):
    """A merged fine-tune is an ordinary checkpoint of the same architecture: served as is, it
    equals its reference and the adapter it was merged from."""
    fine_tune = adapters["all-linear"]
    engine = make_llm(fine_tune.merged, max_num_seqs=4)
    try:
        outs = run_engine(engine, CASES)
    finally:
        shutdown(engine)
    through_adapter = run_engine(lora_llm, CASES, lora_request=lora_request("all-linear", fine_tune.adapter))
    for out, via_adapter, (turns, images) in zip(outs, through_adapter, CASES):
        assert_parity(out, fine_tune.reference, turns, images)
        assert max(abs(a - b) for a, b in zip(prompt_logprobs(out), prompt_logprobs(via_adapter))) < 2e-4


def test_ovis2_adapters(tmp_path):
    """Ovis2 (AIMv2 + Qwen2.5, whose q/k/v carry biases): both adapters and the base model in
    one batch. (Ovis1.6-Llama3.2 is checked through the server below.)"""
    from ovis_vllm.engine.checkpoints import write_checkpoint

    path = write_checkpoint(tmp_path / "ovis2", "ovis2-1b", seed=SEED)
    template = member_of(json.loads((path / "config.json").read_text())).conversation.chat_template
    adapters = write_adapters(path, tmp_path, SEED + 7)
    engine = make_llm(path, max_num_seqs=8, enable_lora=True, max_lora_rank=MAX_RANK, max_loras=2,
                      max_model_len=4096)
    try:
        choices = [(None, ReferenceOvis(path))] + [(lora_request(n, a.adapter), a.reference)
                                                   for n, a in adapters.items()]
        outs = run_engine(engine, [CASES[0]] * len(choices), chat_template=template,
                          lora_request=[request for request, _ in choices])
    finally:
        shutdown(engine)
    for out, (_, ref) in zip(outs, choices):
        assert_parity(out, ref, *CASES[0])


def test_builtin_fallback_refuses_lora_with_the_reason():
    """A checkpoint handed to vLLM's built-in Ovis (here Ovis1.5-shaped) under --enable-lora: our
    message, not vLLM's "Ovis does not support LoRA", which would name our class."""
    from ovis_vllm.engine.checkpoints.ovis import PRESETS, ovis_config
    from ovis_vllm.engine.model import Ovis

    config = ovis_config(PRESETS["ovis1.6-gemma2-9b"])
    config["visual_tokenizer_config"]["hidden_stride"] = 1
    vllm_config = SimpleNamespace(model_config=SimpleNamespace(hf_config=config), lora_config=object())
    with pytest.raises(ValueError, match="built-in Ovis has no LoRA support: serve this checkpoint "
                                         "without --enable-lora"):
        Ovis(vllm_config=vllm_config)


# ---- the server ----------------------------------------------------------------------------

SERVED = "ovis-llama"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """An Ovis1.6-Llama3.2 checkpoint with its adapters, and adapters that must be refused."""
    from safetensors.torch import load_file, save_file

    from ovis_vllm.engine.checkpoints import write_checkpoint

    root = tmp_path_factory.mktemp("llama-lora")
    path = write_checkpoint(root / "base", "ovis1.6-llama3.2-3b", seed=SEED)
    good = write_adapters(path, root, SEED + 11)
    other = write_checkpoint(root / "other", "ovis1.6-gemma2-27b", seed=SEED)  # other widths
    unknown = shutil.copytree(good["qv"].adapter, root / "unknown-module")
    weights = load_file(unknown / "adapter_model.safetensors")
    save_file({k.replace(".q_proj.", ".qq_proj."): v for k, v in weights.items()},
              unknown / "adapter_model.safetensors")
    no_weights = shutil.copytree(good["qv"].adapter, root / "no-weights")
    (no_weights / "adapter_model.safetensors").unlink()
    bad = {  # name: (adapter, status, what the error names)
        "vision": (write_lora_adapter(path, root / "vision", seed=1, vision=True), 400,
                   "visual_tokenizer.backbone.vision_model.encoder.layers.0.mlp.fc1"),
        "other-base": (write_lora_adapter(other, root / "other-base", seed=2), 400,
                       "trained on another base model"),
        "rank-16": (write_lora_adapter(path, root / "rank-16", seed=3, rank=16), 400,
                    "greater than max_lora_rank 8"),
        "no-weights": (no_weights, 400, "doesn't contain tensors"),
        "unknown-module": (unknown, 400, "qq_proj"),
        "no-directory": (root / "does-not-exist", 404, "No adapter found"),
    }
    return SimpleNamespace(path=path, good=good, bad=bad)


@pytest.fixture(scope="module")
def lora_server(llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("lora-server") / "server.log"
    adapter = llama.good["all-linear"].adapter
    args = ["--model", str(llama.path), "--served-model-name", SERVED, "--dtype", "float32",
            "--enforce-eager", "--max-num-seqs", "8", "--max-model-len", "4096", "--seed", "0",
            "--enable-lora", "--max-lora-rank", str(MAX_RANK), "--max-loras", "2",
            "--lora-modules", f"all-linear={adapter}"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    with running_server(args, log, env=env) as base:
        yield base


def _messages(turns, images):
    (_, text), = turns
    content = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(image))}} for image in images]
    return [{"role": "user", "content": content + [{"type": "text", "text": text.replace("<image>\n", "")}]}]


def _load(base, name, path):
    return httpx.post(base + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                      timeout=120)


async def _ask_all(base, models, turns, images):
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="-", max_retries=0, timeout=300)
    async with client:
        return await asyncio.gather(*[client.chat.completions.create(
            model=model, messages=_messages(turns, images), max_tokens=8, temperature=0,
            extra_body={"prompt_logprobs": 1, "return_token_ids": True}) for model in models])


def test_adapters_by_name_at_once_through_the_api(lora_server, llama):
    """Ovis1.6-Llama3.2: one adapter from --lora-modules, one loaded at run time, and the base
    model, asked at once with the official client: each equals the reference on its weights."""
    qv = llama.good["qv"].adapter
    assert _load(lora_server, "qv", qv).status_code == 200
    client = openai.OpenAI(base_url=lora_server + "/v1", api_key="-", max_retries=0)
    assert {m.id for m in client.models.list().data} == {SERVED, "all-linear", "qv"}
    references = {SERVED: ReferenceOvis(llama.path)} | {n: a.reference for n, a in llama.good.items()}
    turns, images = CASES[0]
    replies = asyncio.run(_ask_all(lora_server, list(references) * 2, turns, images))
    for reply, (name, ref) in zip(replies, list(references.items()) * 2):
        assert reply.model == name
        assert_parity(served_output(reply), ref, turns, images)


def test_unloaded_adapter_is_a_404_and_others_keep_serving(lora_server, llama):
    qv = llama.good["qv"].adapter
    if _load(lora_server, "qv-2", qv).status_code != 200:
        pytest.fail("could not load the adapter")
    unload = httpx.post(lora_server + "/v1/unload_lora_adapter", json={"lora_name": "qv-2"})
    assert unload.status_code == 200, unload.text
    client = openai.OpenAI(base_url=lora_server + "/v1", api_key="-", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="qv-2"):
        client.chat.completions.create(model="qv-2", messages=_messages(*CASES[2]), max_tokens=2)
    for model in (SERVED, "all-linear"):
        assert client.chat.completions.create(model=model, messages=_messages(*CASES[2]), max_tokens=2).choices


@pytest.mark.parametrize("name", ["vision", "other-base", "rank-16", "no-weights", "unknown-module",
                                  "no-directory"])
def test_bad_adapter_is_a_clear_4xx_and_the_server_keeps_serving(lora_server, llama, name):
    """vLLM alone: 500 for all but the missing directory, and the vision adapter loaded and
    served without its vision part."""
    path, status, named = llama.bad[name]
    response = _load(lora_server, name, path)
    assert response.status_code == status, response.text
    assert named in response.json()["error"]["message"], response.text
    client = openai.OpenAI(base_url=lora_server + "/v1", api_key="-", max_retries=0)
    assert name not in {m.id for m in client.models.list().data}
    turns, images = CASES[0]
    for model in (SERVED, "all-linear"):
        reply = client.chat.completions.create(model=model, messages=_messages(turns, images),
                                               max_tokens=2, temperature=0)
        assert reply.choices[0].finish_reason == "length"
