"""Serving features with images keep the reference's answers: batching, chunked prefill,
prefix/encoder caching, and bad input that fails only its own request."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.helpers import (
    SIDE,
    assert_parity,
    chat_prompt,
    make_llm,
    png_bytes,
    prompt_logprobs,
    rand_image,
    run_engine,
    shutdown,
    tokens,
)

GRID_IMAGES = [(SIDE, SIDE), (2 * SIDE, SIDE), (2 * SIDE, 2 * SIDE), (3 * SIDE, 3 * SIDE),
               (30, 300), (500, 90)]


def mixed_cases(n: int):
    cases = []
    for i in range(n):
        w, h = GRID_IMAGES[i % len(GRID_IMAGES)]
        images = [rand_image(w, h, 100 + i)]
        text = f"<image>\nRequest {i}: describe the image." + " Please answer." * (i % 4)
        if i % 5 == 4:  # a few with two images of different grids
            images.append(rand_image(SIDE, 2 * SIDE, 200 + i))
            text = "<image>\n" + text
        cases.append(([("user", text)], images))
    return cases


def test_batched_equals_one_at_a_time(llm):
    cases = mixed_cases(16)
    batched = run_engine(llm, cases)
    single = [run_engine(llm, [case])[0] for case in cases]
    assert tokens(batched) == tokens(single)
    for b, s in zip(batched, single):
        assert max(abs(x - y) for x, y in zip(prompt_logprobs(b), prompt_logprobs(s))) < 1e-4


@pytest.fixture(scope="module")
def chunked_llm(tiny_checkpoint):
    # A 3x3 image takes 101 placeholder positions in the tiny preset: a 32-token budget splits
    # every image's span over several prefill steps. The visual embedding, too, runs in chunks
    # of a few rows (a budget set through --additional-config).
    engine = make_llm(tiny_checkpoint, enable_chunked_prefill=True, max_num_batched_tokens=32,
                      max_num_seqs=4, additional_config={"ovis_visual_embed_chunk_mb": 0.01})
    yield engine
    shutdown(engine)


def visual_embed_settings(model):  # module level: it is pickled to the worker
    return model.visual_vocab.impl, model.visual_vocab.chunk_mb


def test_chunked_prefill_smaller_than_an_image(llm, chunked_llm, reference):
    assert chunked_llm.apply_model(visual_embed_settings) == [("auto", 0.01)]
    cases = mixed_cases(6)
    assert any(o.prompt_token_ids.count(7) > 32 for o in run_engine(llm, cases[:4], max_new_tokens=1))
    want = run_engine(llm, cases)
    got = run_engine(chunked_llm, cases)
    assert tokens(got) == tokens(want)
    for out, (turns, images) in zip(got, cases):
        assert_parity(out, reference, turns, images)


def test_repeated_images_hit_the_caches(llm):
    from vllm import SamplingParams

    # No prompt_logprobs here: vLLM recomputes (never reads the cache for) such requests.
    params = SamplingParams(temperature=0, max_tokens=8)
    images = [rand_image(3 * SIDE, 3 * SIDE, 300), rand_image(3 * SIDE, 3 * SIDE, 301)]
    turns = [("user", "<image>\n<image>\nDescribe both images in detail.")]
    request = {"prompt": chat_prompt(llm.get_tokenizer(), turns), "multi_modal_data": {"image": images}}
    [first] = llm.generate([request], params, use_tqdm=False)
    [second] = llm.generate([request], params, use_tqdm=False)
    # Same images, another question: the images' positions are still a cached prefix.
    other = chat_prompt(llm.get_tokenizer(), [("user", "<image>\n<image>\nWhat is shown?")])
    [third] = llm.generate([{"prompt": other, "multi_modal_data": {"image": images}}], params,
                           use_tqdm=False)
    [fresh] = run_engine(llm, [(turns, images)])  # prompt_logprobs: computed from scratch
    block = llm.llm_engine.vllm_config.cache_config.block_size
    images_end = max(i for i, t in enumerate(first.prompt_token_ids) if t == 7) + 1
    assert images_end >= block  # a full KV block lies inside the shared image prefix
    assert tokens([first]) == tokens([second]) == tokens([fresh])
    assert (second.num_cached_tokens or 0) >= block * (images_end // block)
    assert (third.num_cached_tokens or 0) >= block * (images_end // block)


def bad_requests(tokenizer):
    one = chat_prompt(tokenizer, [("user", "<image>\nDescribe.")])
    truncated = Image.open(io.BytesIO(png_bytes(rand_image(64, 64, 1))[:200]))
    yield "truncated image", {"prompt": one, "multi_modal_data": {"image": truncated}}, "could not be decoded"
    yield "zero-size image", {"prompt": one, "multi_modal_data": {"image": Image.new("RGB", (0, 0))}}, "zero size"
    five = chat_prompt(tokenizer, [("user", "<image>" * 5 + "\nToo many.")])
    yield "too many images", {"prompt": five, "multi_modal_data": {"image": [rand_image(8, 8, i) for i in range(5)]}}, "At most 4 image"
    yield "missing image", {"prompt": chat_prompt(tokenizer, [("user", "<image>\n<image>\nTwo?")]),
                            "multi_modal_data": {"image": rand_image(8, 8, 0)}}, "2 <image> marker(s) but 1 image(s)"
    yield "max_partition above the server's", {"prompt": one, "multi_modal_data": {"image": rand_image(8, 8, 0)},
                                                "mm_processor_kwargs": {"max_partition": 16}}, "above this server's 9"
    long = chat_prompt(tokenizer, [("user", "word " * 9000)])
    yield "prompt over the context", {"prompt": long}, "maximum context length is 8192"
    # Text that fits, until the 3x3 image's 101 placeholders replace its one marker token.
    def length(text):
        return len(tokenizer(chat_prompt(tokenizer, [("user", text)]), add_special_tokens=False).input_ids)
    per_word = (length("<image>\nword" + " word" * 200) - length("<image>\nword")) / 200
    near = "<image>\nword" + " word" * int((8192 - 50 - length("<image>\nword")) / per_word)
    assert 8192 - 100 < length(near) < 8192
    yield "image pushes the prompt over the context", {
        "prompt": chat_prompt(tokenizer, [("user", near)]),
        "multi_modal_data": {"image": rand_image(3 * SIDE, 3 * SIDE, 5)}}, "longer than the maximum model length of 8192"


def test_bad_input_fails_only_that_request(llm, reference):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    good = ([("user", "<image>\nDescribe the image.")], [rand_image(2 * SIDE, SIDE, 400)])
    [want] = run_engine(llm, [good])
    for name, request, message in bad_requests(llm.get_tokenizer()):
        with pytest.raises((ValueError, VLLMValidationError)) as info:
            llm.generate([request], SamplingParams(max_tokens=1), use_tqdm=False)
        assert message in str(info.value), (name, str(info.value))
        [again] = run_engine(llm, [good])
        assert tokens([again]) == tokens([want]), name
    assert_parity(want, reference, *good)


def packing_state(model):  # module level: it is pickled to the worker
    head, vte = model.visual_tokenizer.head[0], model.vte
    return head.packed is not None, head.weight.numel(), vte.packed is not None, vte.rows.numel()


def test_cpu_engine_packs_head_and_vte_for_onednn(llm):
    """On CPU the two big visual GEMMs run on weights packed once for oneDNN, and the unpacked
    copies are freed (else the packing would cost ~1 GiB at real widths)."""
    import torch

    from ovis_vllm.kernels import PackedMatrix

    if torch.cuda.is_available() or not PackedMatrix.supported(torch.zeros(1, 1)):
        pytest.skip("packing is the CPU path with vLLM's oneDNN ops")
    assert llm.apply_model(packing_state) == [(True, 0, True, 0)]


@pytest.mark.parametrize("extra, message", [
    ({"ovis_visual_embed": "fused"}, "implementation 'fused'"),
    ({"ovis_visual_embed_chunk_mb": 0}, "positive number of MiB"),
    ({"ovis_visual_embed_chunk_mb": "64"}, "positive number of MiB"),
])
def test_visual_embed_options_are_checked_at_start_up(extra, message):
    from types import SimpleNamespace

    from ovis_vllm.engine.visual_vocab import visual_embed_options

    assert visual_embed_options(SimpleNamespace(additional_config={})) == ("auto", 64.0)
    assert visual_embed_options(SimpleNamespace(additional_config={
        "ovis_visual_embed": "unfused", "ovis_visual_embed_chunk_mb": 8})) == ("unfused", 8.0)
    with pytest.raises(ValueError, match=message):
        visual_embed_options(SimpleNamespace(additional_config=extra))
