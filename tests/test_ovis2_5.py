"""Ovis2.5 and Ovis2.6 against the independent reference (tests/ovis25_reference.py), in fp32.

One generated checkpoint per preset (engine/checkpoints/ovis2_5.py, mirroring the published files at
small widths: Qwen3 tokenizer without `<image>`, the checkpoint's chat template, bilinear SigLIP
preprocessor config), one engine each, every case of a preset in one batch. Prompts are the
checkpoint's chat template rendered with thinking off (the reference's chat() default); the
reference tokenizes them its way and splices its visual atoms in. Checked: the expanded prompt
(pad ids exactly at the reference's visual positions), every prompt log-probability within 2e-4,
greedy tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import SEED
from tests.helpers import (
    GREEDY_TIE_GAP,
    MAX_NEW_TOKENS,
    PROMPT_LOGPROB_ATOL,
    make_llm,
    rand_image,
    shutdown,
    start_two_rank_engine,
    mp4_clip,
    with_extra_token,
)
from tests.ovis25_reference import EARLY_STOP_TEXT, THINK_END_TOKEN_ID, ReferenceOvis25, content_items

LIMITS = {"image": 4, "video": 1}


def _engine(tmp_path_factory, preset: str, **kwargs):
    from ovis_vllm.engine.checkpoints import write_checkpoint

    path = write_checkpoint(tmp_path_factory.mktemp(preset), preset, seed=SEED)
    return path, make_llm(path, max_num_seqs=16, limit_mm_per_prompt=LIMITS, **kwargs)


@pytest.fixture(scope="module")
def ovis25(tmp_path_factory):
    # The 9B's shape (untied lm_head); the tied 2B shape is the server test's (Ovis2.6 dense).
    path, engine = _engine(tmp_path_factory, "ovis2.5-9b")
    yield engine, ReferenceOvis25(path)
    shutdown(engine)


def video_frames(seed: int, frames: int = 3) -> list:
    # vLLM takes a video as one array, so its frames share a size (preprocessing frames of
    # different sizes is checked in test_preprocess_matches_the_reference).
    return [rand_image(320, 200, seed + i) for i in range(frames)]


def case(text: str, images=(), video=None, **mm_kwargs) -> dict:
    return {"text": text, "images": list(images), "video": video, "mm_kwargs": mm_kwargs}


def run(engine, reference, cases, max_new_tokens=MAX_NEW_TOKENS):
    """One batched generate over the cases, each rendered by the checkpoint's chat template."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_new_tokens, prompt_logprobs=1, logprobs=1)
    requests = []
    for c in cases:
        c["turns"] = [("user", content_items(c["text"]))]
        request = {"prompt": reference.render_chat(c["turns"])}
        if c["images"]:
            request["multi_modal_data"] = {"image": c["images"]}
        if c["video"] is not None:
            request["multi_modal_data"] = {"video": np.stack([np.asarray(f) for f in c["video"]])}
        if c["mm_kwargs"]:
            request["mm_processor_kwargs"] = c["mm_kwargs"]
        requests.append(request)
    return engine.generate(requests, params, use_tqdm=False)


def assert_matches_reference(out, reference, c, atol=PROMPT_LOGPROB_ATOL):
    pads = {reference.tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")}
    raw = reference.format_conversation(c["turns"])
    embeds, ref_ids = reference.merged_embeddings(raw, c["images"], c["video"], **c["mm_kwargs"])
    ids = list(out.prompt_token_ids)
    assert len(ids) == len(ref_ids), (len(ids), len(ref_ids))
    for i, (a, b) in enumerate(zip(ids, ref_ids)):
        assert (a in pads) if b < 0 else (a == b), f"position {i}: engine {a}, reference {b}"
    logprobs = torch.log_softmax(reference.logits(embeds), dim=-1)
    diffs = [abs(out.prompt_logprobs[i][ids[i]].logprob - logprobs[i - 1, ids[i]].item())
             for i in range(1, len(ids))]
    assert max(diffs) < atol, f"max prompt logprob diff {max(diffs):.2e}"
    got = list(out.outputs[0].token_ids)
    want, step_logits = reference.greedy(embeds, len(got))
    for k, (a, b) in enumerate(zip(got, want)):
        if a != b:
            top2 = step_logits[k].topk(2).values
            assert (top2[0] - step_logits[k][a]).item() < GREEDY_TIE_GAP, f"greedy token {k}: {a} vs {b}"
            break
    return max(diffs)


@pytest.mark.parametrize("size", [(500, 300), (10, 2000), (32, 1792), (4000, 3000), (17, 17)])
def test_preprocess_matches_the_reference(tmp_path_factory, size):
    """Patches and grid bit for bit, images and a video whose frames differ in size."""
    from ovis_vllm.engine.checkpoints.ovis2_5 import PREPROCESSOR_CONFIG
    from ovis_vllm.engine.preprocess_navit import preprocess_frames
    from tests.ovis25_reference import reference_preprocess

    image = rand_image(*size, SEED % 1000, mode="RGBA")
    video = [image, rand_image(size[1] + 7, size[0] + 3, SEED % 1000 + 1)]
    for frames in ([image], video):
        kwargs = dict(min_pixels=448 * 448, max_pixels=1792 * 1792)
        want, want_grid = reference_preprocess(image=frames[0] if len(frames) == 1 else None,
                                               video=frames if len(frames) > 1 else None,
                                               image_processor_config=PREPROCESSOR_CONFIG, **kwargs)
        got, grid = preprocess_frames(frames, patch_size=16, hidden_stride=2, **kwargs)
        assert tuple(want_grid[0].tolist()) == grid
        assert torch.equal(got, want.float())


def test_images_and_video_match_the_reference(ovis25):
    engine, reference = ovis25
    s = SEED % 1000
    cases = [
        case("<image>\nDescribe the image.", [rand_image(500, 300, s)]),
        # Two sizes in one prompt, and extreme aspect ratios (56:1 both ways).
        case("Compare <image> and <image> please.", [rand_image(333, 222, s + 1), rand_image(64, 900, s + 2)]),
        case("<image> <image>", [rand_image(1792, 32, s + 3), rand_image(32, 1792, s + 4)]),
        # Sides below 32 (scaled up first).
        case("<image>\nTiny.", [rand_image(10, 600, s + 5)]),
        # Transparency: the reference drops alpha (vLLM alone composites onto white).
        case("<image>\nRGBA.", [rand_image(200, 150, s + 7, mode="RGBA")]),
        # min/max pixels per request, at their edges: min == max, and a max below the image
        # (scaled down to it; the default max, 1792*1792 = 3136 visual tokens, is the same path).
        case("<image>\nBounds.", [rand_image(640, 480, s + 8)], min_pixels=256 * 256, max_pixels=256 * 256),
        case("<image>\nBounds.", [rand_image(640, 480, s + 9)], min_pixels=32 * 32, max_pixels=100 * 100),
        case("<video>\nWhat happens?", video=video_frames(s + 10)),
        case("No image here, only text."),
    ]
    outs = run(engine, reference, cases)
    diffs = [assert_matches_reference(out, reference, c) for out, c in zip(outs, cases)]
    print("max prompt logprob diff per case:", [f"{d:.1e}" for d in diffs])
    # The images moved the log-probabilities: the check can fail.
    assert outs[0].prompt_logprobs[-1] != outs[5].prompt_logprobs[-1]


def test_image_and_video_together_are_refused(ovis25):
    engine, reference = ovis25
    prompt = reference.render_chat([("user", content_items("<image> <video>"))])
    frames = np.stack([np.asarray(rand_image(64, 64, 1))] * 2)
    with pytest.raises(ValueError, match="images or one video"):
        engine.generate({"prompt": prompt, "multi_modal_data": {"image": rand_image(64, 64, 0), "video": frames}},
                        use_tqdm=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_pixels": 4000 * 4000}, "allow larger images"),
    ({"min_pixels": 512 * 512, "max_pixels": 256 * 256}, "above max_pixels"),
    ({"max_pixels": 0}, "integer >= 1"),
    ({"max_partition": 4}, "unknown Ovis2.5 mm_processor_kwargs"),
])
def test_bad_pixel_bounds_are_refused(ovis25, kwargs, message):
    engine, reference = ovis25
    prompt = reference.render_chat([("user", content_items("<image>"))])
    with pytest.raises(ValueError, match=message):
        engine.generate({"prompt": prompt, "multi_modal_data": {"image": rand_image(64, 64, 0)},
                         "mm_processor_kwargs": kwargs}, use_tqdm=False)


def test_tensor_parallel_matches_the_reference(tmp_path_factory):
    """Over 2 ranks (vLLM splits NaViT and Qwen3; ours the head and VTE along the visual
    vocabulary, engine/visual_vocab.py), on the tied 2B shape."""
    from ovis_vllm.engine.checkpoints import write_checkpoint

    path = write_checkpoint(tmp_path_factory.mktemp("ovis2.5-tp2"), "ovis2.5-2b", seed=SEED)
    engine = start_two_rank_engine(path, tensor_parallel_size=2, limit_mm_per_prompt=LIMITS)
    try:
        reference = ReferenceOvis25(path)
        s = SEED % 1000
        cases = [case("Compare <image> and <image>.", [rand_image(333, 222, s), rand_image(64, 900, s + 1)]),
                 case("<video>\nWhat happens?", video=video_frames(s + 2)),
                 case("No image here, only text.")]
        for out, c in zip(run(engine, reference, cases), cases):
            assert_matches_reference(out, reference, c)
    finally:
        shutdown(engine)


@pytest.mark.parametrize("ranks", [1, 2])
def test_moe_matches_the_reference(tmp_path_factory, ranks):
    """Ovis2.6-30B-A3B: Qwen3-MoE LLM, no post_layernorm tensors; on one rank and tensor
    parallel over 2. (With vLLM's expert parallelism on top, vLLM 0.32's CPU fused MoE crashes a
    worker with SIGSEGV at the first request, cpu_fused_moe.cpp:242, as it does for a plain
    Qwen3-MoE checkpoint with this plugin off: not run here; docs/reference.md.)"""
    from ovis_vllm.engine.checkpoints import write_checkpoint

    if ranks == 1:
        path, engine = _engine(tmp_path_factory, "ovis2.6-moe", in_process=False)
    else:
        path = write_checkpoint(tmp_path_factory.mktemp("ovis2.6-moe-tp2"), "ovis2.6-moe", seed=SEED)
        engine = start_two_rank_engine(path, tensor_parallel_size=2, limit_mm_per_prompt=LIMITS)
    try:
        reference = ReferenceOvis25(path)
        s = SEED % 1000
        cases = [case("<image>\nDescribe.", [rand_image(300, 200, s)]),
                 case("<video>\nWhat happens?", video=video_frames(s + 1))]
        for out, c in zip(run(engine, reference, cases), cases):
            assert_matches_reference(out, reference, c)
    finally:
        shutdown(engine)


@pytest.fixture(scope="module")
def ovis25_server(tmp_path_factory):
    from ovis_vllm.engine.checkpoints import write_checkpoint
    from tests.helpers import running_server

    # Ovis2.6 dense (its own architecture name and model_type), with a tokenizer of one more token
    # than the release's (vLLM's built-in dies on that: tests/test_builtin_differences_ovis2_5.py).
    path = with_extra_token(write_checkpoint(tmp_path_factory.mktemp("ovis2.6-server"), "ovis2.6-2b",
                                             seed=SEED + 1))
    log = tmp_path_factory.mktemp("logs") / "server.log"
    # No --trust-remote-code: our config classes read the checkpoint.
    with running_server([str(path), "--dtype", "float32", "--max-num-seqs", "4", "--enforce-eager"],
                        log) as base:
        yield base, path, log


def test_server_answers_the_reference_through_the_openai_client(ovis25_server):
    """Ovis2.6 dense served by server.py. Chat with 9 images (vLLM alone allows that many; the plugin's Ovis1.6/2 cap of 8 does not
    apply here) and a system turn, through the official client: the checkpoint's chat template,
    vLLM's content handling and our renderer give the reference's prompt and log-probabilities."""
    import openai

    from tests.helpers import data_url, png_bytes, served_output

    base, path, log = ovis25_server
    reference = ReferenceOvis25(path)
    images = [rand_image(64 + 16 * i, 96, SEED % 1000 + i) for i in range(9)]
    content = [{"type": "text", "text": "Which of these differ?"}] + [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(im))}} for im in images]
    client = openai.OpenAI(base_url=base + "/v1", api_key="none")
    reply = client.chat.completions.create(
        model=str(path), max_tokens=4, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}],
        extra_body={"prompt_logprobs": 1, "return_token_ids": True,
                    "chat_template_kwargs": {"enable_thinking": False}})
    turns = [("system", "Be brief."),
             ("user", [{"type": "text", "text": "Which of these differ?"}] + [{"type": "image"}] * 9)]
    assert_matches_reference(served_output(reply), reference,
                             {"turns": turns, "images": images, "video": None, "mm_kwargs": {}})
    assert "trust-remote-code" not in log.read_text()


def test_video_url_answers_the_reference(ovis25_server):
    """A video through the API (`video_url`, an mp4 data URL) gets the reference's prompt and
    log-probabilities on the frames vLLM's video loader decodes from it: the reference takes
    frames, decoding and sampling them is the server's (vLLM's default: up to 32 frames)."""
    import openai
    from PIL import Image
    from vllm.multimodal.media import ImageMediaIO, VideoMediaIO

    from tests.helpers import data_url, served_output

    base, path, _ = ovis25_server
    reference = ReferenceOvis25(path)
    clip = mp4_clip(5, 96, 64, SEED % 1000)
    decoded, _ = VideoMediaIO(ImageMediaIO(), num_frames=32).load_bytes(clip).media
    frames = [Image.fromarray(f) for f in decoded]
    assert len(frames) == 5
    client = openai.OpenAI(base_url=base + "/v1", api_key="none")
    content = [{"type": "video_url", "video_url": {"url": data_url(clip, "video/mp4")}},
               {"type": "text", "text": "What happens?"}]
    reply = client.chat.completions.create(
        model=str(path), max_tokens=4, temperature=0, messages=[{"role": "user", "content": content}],
        extra_body={"prompt_logprobs": 1, "return_token_ids": True,
                    "chat_template_kwargs": {"enable_thinking": False}})
    turns = [("user", [{"type": "video"}, {"type": "text", "text": "What happens?"}])]
    assert_matches_reference(served_output(reply), reference,
                             {"turns": turns, "images": [], "video": frames, "mm_kwargs": {}})


# ---- thinking ---------------------------------------------------------------------------------
THINKING_MAX_TOKENS = 90  # room for the budget, TRANSITION (about 60 tokens in the mirrored tokenizer) and an answer


@pytest.fixture(scope="module")
def thinking(ovis25_server):
    """The server, an openai client, the reference, a thinking prompt (the template's default)
    with its embeddings, and a logit bias on `</think>` under which greedy decoding closes the
    thinking at once (random weights never close it on their own: the bias beats `</think>`'s
    gap to the best first token by 1)."""
    import openai

    base, path, _ = ovis25_server
    reference = ReferenceOvis25(path)
    text = "Think it over."
    embeds, _ = reference.merged_embeddings(reference.format_conversation([("user", text)], enable_thinking=True))
    _, step_logits = reference.greedy(embeds, 1)
    bias = (step_logits[0].max() - step_logits[0][THINK_END_TOKEN_ID]).item() + 1.0
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
    return client, path, reference, [{"role": "user", "content": text}], embeds, bias


def ask(client, path, messages, stream=False, **extra_body):
    """Greedy, without generation_config.json's repetition penalty (which the server applies by
    default, and the reference's generate too: the reference here decodes plain greedy)."""
    return client.chat.completions.create(
        model=str(path), messages=messages, max_tokens=THINKING_MAX_TOKENS, temperature=0, stream=stream,
        extra_body={"return_token_ids": True, "repetition_penalty": 1.0, **extra_body})


def split_at_think_end(tokenizer, ids: list[int]) -> tuple[str | None, str | None]:
    """(reasoning, answer) as vLLM's qwen3 reasoning parser splits an output: everything before
    the first `</think>` is reasoning (the model's `<think>` may be missing), the rest, without
    `</think>` tokens, the answer; without `</think>` the whole output is reasoning (empty
    parts are None)."""
    if THINK_END_TOKEN_ID not in ids:
        return tokenizer.decode(ids), None
    end = ids.index(THINK_END_TOKEN_ID)
    answer = [t for t in ids[end + 1:] if t != THINK_END_TOKEN_ID]
    return tokenizer.decode(ids[:end]) or None, tokenizer.decode(answer) or None


# budget, whether `</think>` is biased (then the model closes its thinking as its first token),
# whether the reference appends its transition.
BUDGET_CASES = {"inside the thinking": (3, False, True), "at its end": (1, True, False),
                "after it": (4, True, False), "zero": (0, True, True), "none": (None, True, False)}


@pytest.mark.parametrize("where", BUDGET_CASES)
def test_thinking_budget_is_the_reference_two_phase_generation(thinking, where):
    """`thinking_token_budget` through the API gives the tokens of the reference's two-phase
    generation (phase 1 up to the budget; its transition appended only when phase 1 did not
    close the thinking; phase 2 prefilled again), greedy: a budget that runs out inside the
    thinking, one that ends on the model's own `</think>`, one past it, and 0 (the transition
    at once, before the `</think>` the model would write); no budget is plain greedy. The
    thinking arrives in `reasoning`, the answer in `content`."""
    client, path, reference, messages, embeds, bias = thinking
    budget, biased, appends = BUDGET_CASES[where]
    logit_bias = {THINK_END_TOKEN_ID: bias} if biased else None
    if budget is None:
        want, _ = reference.greedy(embeds, THINKING_MAX_TOKENS, logit_bias)
    else:
        want = reference.generate_with_thinking_budget(embeds, budget, THINKING_MAX_TOKENS, logit_bias)
    transition = reference.tokenizer(EARLY_STOP_TEXT, add_special_tokens=False).input_ids
    assert (budget is not None and want[budget:budget + len(transition)] == transition) == appends
    assert (want[0] == THINK_END_TOKEN_ID) == (biased and budget != 0), "the cases do not cover what they name"

    body = {} if budget is None else {"thinking_token_budget": budget}
    if biased:
        body["logit_bias"] = {str(THINK_END_TOKEN_ID): bias}
    choice = ask(client, path, messages, **body).choices[0]
    assert choice.model_extra["token_ids"] == want[:THINKING_MAX_TOKENS]
    reasoning, answer = split_at_think_end(reference.tokenizer, want[:THINKING_MAX_TOKENS])
    assert (choice.message.model_extra.get("reasoning"), choice.message.content) == (reasoning, answer)


def test_thinking_streams_as_it_answers(thinking):
    """Streamed, the reasoning and answer deltas add up to the unstreamed reply's."""
    client, path, _, messages, _, _ = thinking
    body = {"thinking_token_budget": 3}
    whole = ask(client, path, messages, **body).choices[0].message
    stream = ask(client, path, messages, stream=True, **body)
    reasoning, answer = [], []
    for chunk in stream:
        for choice in chunk.choices:
            reasoning.append((choice.delta.model_extra or {}).get("reasoning") or "")
            answer.append(choice.delta.content or "")
    assert "".join(reasoning) == whole.model_extra["reasoning"] and whole.model_extra["reasoning"]
    assert "".join(answer) == whole.content and whole.content


def test_serve_benchmark_times_thinking_tokens(thinking):
    """benchmarks/serve.py times streamed thinking (`reasoning` deltas) as tokens, as vLLM's
    own benchmark does (before, a reply still thinking had no first token at all)."""
    import asyncio

    from benchmarks.serve import run_level

    client, path, _, messages, _, _ = thinking
    requests = [{"messages": messages, "max_tokens": 5}]
    [out], _, _ = asyncio.run(run_level(str(client.base_url).removesuffix("/v1/"), str(path), requests, 1))
    assert out.success and out.output_tokens == 5, out.error
    # One interval per later token (a `</think>` alone would stream as neither field).
    assert 0 < out.ttft < out.latency and len(out.itl) >= 3, (out.ttft, out.itl)


@pytest.mark.parametrize("switch", [{"chat_template_kwargs": {"enable_thinking": False}},
                                    {"reasoning_effort": "none"}])
def test_thinking_off_as_the_template_does_it(thinking, switch):
    """enable_thinking false and reasoning_effort "none" both give the template's empty think
    block at the prompt's end; the reply is the reference's greedy answer, all in `content`,
    and a budget changes nothing (the reference budgets only a thinking turn)."""
    client, path, reference, messages, _, _ = thinking
    raw = reference.format_conversation([("user", messages[0]["content"])], enable_thinking=False)
    embeds, ids = reference.merged_embeddings(raw)
    want, _ = reference.greedy(embeds, THINKING_MAX_TOKENS)
    for budget in ({}, {"thinking_token_budget": 0}):
        reply = ask(client, path, messages, **switch, **budget)
        assert reply.model_extra["prompt_token_ids"] == ids
        assert reply.choices[0].model_extra["token_ids"] == want
        assert reply.choices[0].message.model_extra.get("reasoning") is None
        assert reply.choices[0].message.content == reference.tokenizer.decode(want)


def test_the_references_name_for_the_budget(thinking):
    """`thinking_budget`, the reference's name, is the same budget; both at once is a 400."""
    import openai

    client, path, _, messages, _, _ = thinking
    ours = ask(client, path, messages, thinking_budget=3).choices[0].model_extra["token_ids"]
    assert ours == ask(client, path, messages, thinking_token_budget=3).choices[0].model_extra["token_ids"]
    assert ours != ask(client, path, messages).choices[0].model_extra["token_ids"]
    with pytest.raises(openai.BadRequestError, match="not both"):
        ask(client, path, messages, thinking_budget=3, thinking_token_budget=3)


@pytest.mark.parametrize("budget", [-2, 1.5, "many", True])
def test_bad_thinking_budget_is_a_400(thinking, budget):
    """A budget that is not an integer >= 0 (vLLM's -1, "unlimited", is no budget) is a 400
    naming the field, and the server goes on answering."""
    import openai

    client, path, _, messages, _, _ = thinking
    with pytest.raises(openai.BadRequestError, match="thinking_token_budget"):
        ask(client, path, messages, thinking_token_budget=budget)
    assert ask(client, path, messages, thinking_token_budget=1).choices[0].model_extra["token_ids"]
