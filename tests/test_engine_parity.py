"""The engine (our plugin inside vLLM) against the independent reference forward, in fp32.

Checked per prompt: the expanded prompt (placeholder positions and text ids), every prompt
log-probability, and the greedy continuation. Greedy tokens must match exactly unless the
reference itself sees a near-tie (top-2 logit gap below GREEDY_TIE_GAP) at the first
divergence, which fp32 rounding may legitimately flip.
"""

from __future__ import annotations

import pytest

from tests.helpers import (
    MAX_NEW_TOKENS,
    SIDE,
    assert_parity,
    chat_prompt,
    make_llm,
    rand_image,
    run_engine,
    shutdown,
)
from tests.ovis_reference import reference_grid

def test_text_only(llm, reference):
    turns = [("user", "Describe the image in detail. What is shown?")]
    [out] = run_engine(llm, [(turns, [])])
    assert_parity(out, reference, turns, [])


def test_multi_turn_text(llm, reference):
    turns = [("user", "  Hello there.  "), ("assistant", " The answer is yes. "),
             ("user", "Which color is the car?")]
    [out] = run_engine(llm, [(turns, [])])
    assert_parity(out, reference, turns, [])


# (width, height, grid the reference picks at side 76 with the default options)
IMAGE_SHAPES = {
    "1x1-pixel": (1, 1),
    "square": (76, 76),
    "tall-1:9": (40, 360),
    "wide-9:1": (360, 40),
    "very-large": (1600, 1200),
    "grid-2x3": (3 * SIDE, 2 * SIDE),
    "grid-3x3": (3 * SIDE, 3 * SIDE),
    "odd": (97, 61),
}


def test_single_image_aspect_ratios(llm, reference):
    cases = []
    for i, (name, (w, h)) in enumerate(IMAGE_SHAPES.items()):
        cases.append(([("user", f"<image>\nDescribe the image. ({name})")], [rand_image(w, h, i)]))
    assert reference_grid(3 * SIDE, 2 * SIDE, SIDE) == (2, 3)
    assert reference_grid(3 * SIDE, 3 * SIDE, SIDE) == (3, 3)
    outs = run_engine(llm, cases)
    for out, (turns, images) in zip(outs, cases):
        assert_parity(out, reference, turns, images)


def test_multiple_images_with_different_grids(llm, reference):
    """vLLM's built-in Ovis fails on this prompt (docs/reference.md, built-in difference 4)."""
    images = [rand_image(3 * SIDE, 3 * SIDE, 10), rand_image(50, 50, 11), rand_image(3 * SIDE, 2 * SIDE, 12)]
    cases = [
        ([("user", "<image>\n<image>\nCompare the two images.")], images[:2]),
        ([("user", "First <image> then <image> and <image>: list the differences.")], images),
    ]
    outs = run_engine(llm, cases)
    for out, (turns, imgs) in zip(outs, cases):
        assert_parity(out, reference, turns, imgs)


def test_image_with_long_text(llm, reference):
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 60)
    turns = [("user", f"{text}\n<image>\nSummarize the text and the image.")]
    [out] = run_engine(llm, [(turns, [rand_image(200, 120, 20)])])
    assert_parity(out, reference, turns, [rand_image(200, 120, 20)])


def test_placeholder_counts_for_every_grid(llm, reference):
    """Each grid with rows*cols <= 9 gets 1x1 -> T+3, k>1 -> T*(k+1) + (k+2) positions."""
    from vllm import SamplingParams

    per_crop = 9  # tiny preset: 5x5 patches padded to 6x6, 2x2 merged
    grids = [(r, c) for r in range(1, 10) for c in range(1, 10) if r * c <= 9]
    tokenizer = llm.get_tokenizer()
    prompt = chat_prompt(tokenizer, [("user", "<image>\nHi")])
    text_len = len(tokenizer(prompt, add_special_tokens=False).input_ids) - 1
    requests = [{"prompt": prompt, "multi_modal_data": {"image": rand_image(c * SIDE, r * SIDE, r * 10 + c)}}
                for r, c in grids]
    outs = llm.generate(requests, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    for (r, c), out in zip(grids, outs):
        assert reference_grid(c * SIDE, r * SIDE, SIDE) == (r, c)
        k = r * c
        expected = per_crop + 3 if k == 1 else per_crop * (k + 1) + (k + 2)
        assert out.prompt_token_ids.count(7) == expected, (r, c)
        assert len(out.prompt_token_ids) == text_len + expected


def test_per_request_processor_options(llm, reference):
    """max_partition / covering_threshold change the grid (and everything after) as in the reference."""
    from vllm import SamplingParams

    image = rand_image(3 * SIDE, 3 * SIDE, 30)
    turns = [("user", "<image>\nDescribe.")]
    prompt = chat_prompt(llm.get_tokenizer(), turns)
    opts = {"max_partition": 4, "covering_threshold": 0.5}
    [out] = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": image},
                           "mm_processor_kwargs": opts}],
                         SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS, prompt_logprobs=1),
                         use_tqdm=False)
    grid = reference_grid(3 * SIDE, 3 * SIDE, SIDE, 4, 0.5)
    assert grid != (3, 3)
    assert_parity(out, reference, turns, [image], max_partition=4, covering_threshold=0.5)


@pytest.fixture(scope="module")
def partition4_llm(tiny_checkpoint):
    engine = make_llm(tiny_checkpoint, max_num_seqs=4,
                      mm_processor_kwargs={"max_partition": 4, "covering_threshold": 0.5})
    yield engine
    shutdown(engine)


def test_per_server_processor_options(partition4_llm, reference):
    """--mm-processor-kwargs set for the whole server change grids as the reference would."""
    cases = [([("user", "<image>\nDescribe.")], [rand_image(w, h, 50 + i)])
             for i, (w, h) in enumerate([(3 * SIDE, 3 * SIDE), (900, 100), (3 * SIDE, 2 * SIDE)])]
    outs = run_engine(partition4_llm, cases)
    for out, (turns, images) in zip(outs, cases):
        grid = reference_grid(*images[0].size, SIDE, 4, 0.5)
        assert grid[0] * grid[1] <= 4
        assert out.prompt_token_ids.count(7) == (9 + 3 if grid == (1, 1) else 9 * (grid[0] * grid[1] + 1) + grid[0] * grid[1] + 2)
        assert_parity(out, reference, turns, images, max_partition=4, covering_threshold=0.5)


@pytest.mark.parametrize("stop_id", [1, 107])  # <eos>, <end_of_turn>
def test_generation_stops_at_gemma_stop_tokens(llm, stop_id):
    from vllm import SamplingParams

    prompt = chat_prompt(llm.get_tokenizer(), [("user", "Say something.")])
    params = SamplingParams(temperature=0, max_tokens=5, logit_bias={stop_id: 100.0})
    [out] = llm.generate([prompt], params, use_tqdm=False)
    assert list(out.outputs[0].token_ids) == [stop_id]
    assert out.outputs[0].finish_reason == "stop"
