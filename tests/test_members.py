"""Every implemented member on the "Ovis" architecture against the independent reference, in fp32.

One generated checkpoint per member preset (engine/checkpoints/ovis.py), each mirroring the published
files at small widths, with a tokenizer of the base LLM's kind that has no `<image>` token and
BPE merges across the marker's edges. Prompts are rendered with the member's served chat
template (engine/members.py) and checked against AIDC-AI's formatter as the reference runs it:
token ids, every prompt log-probability, greedy tokens.
"""

from __future__ import annotations

import pytest

from ovis_vllm.engine.members import member_of
from tests.conftest import SEED
from tests.helpers import (
    SIDE,
    assert_parity,
    chat_prompt,
    make_llm,
    rand_image,
    run_engine,
    shutdown,
)
from tests.ovis_reference import ReferenceOvis

MEMBER_PRESETS = ["ovis1.6-gemma2-9b", "ovis1.6-gemma2-27b", "ovis1.6-llama3.2-3b", "ovis2-1b",
                  "ovis2-8b"]


@pytest.fixture(scope="module", params=MEMBER_PRESETS)
def member(request, tmp_path_factory):
    """(preset, checkpoint, served chat template, engine, reference), one engine at a time."""
    import json

    from ovis_vllm.engine.checkpoints import write_checkpoint

    preset = request.param
    path = write_checkpoint(tmp_path_factory.mktemp(preset), preset, seed=SEED)
    row = member_of(json.loads((path / "config.json").read_text()))
    limits = {"image": 4} | ({"video": 1} if row.video_pad_token else {})
    engine = make_llm(path, max_num_seqs=8, limit_mm_per_prompt=limits)
    yield preset, path, row.conversation.chat_template, engine, ReferenceOvis(path)
    shutdown(engine)


# Markers where BPE would merge across them: the start of a message, glued to text, several in a
# row, after a newline, in several turns.
MARKER_CASES = [
    [("user", "<image>\nDescribe the image.")],
    [("user", "Image 1:<image>Describe")],
    [("user", "<image><image>\nCompare them.")],
    [("user", "<image>\nWhat is it?"), ("assistant", "A cat."), ("user", "And this one?\n<image>")],
]


def _images(turns, seed):
    """One image per marker, of different crop grids."""
    sizes = [(3 * SIDE, 3 * SIDE), (50, 50), (3 * SIDE, 2 * SIDE), (300, 40)]
    count = sum(text.count("<image>") for _, text in turns)
    return [rand_image(*sizes[i % len(sizes)], seed + i) for i in range(count)]


def test_reference_tokenization_and_parity(member):
    preset, _, template, engine, reference = member
    cases = [(turns, _images(turns, 10 * i)) for i, turns in enumerate(MARKER_CASES)]
    cases.append(([("user", "Text only, no image.")], []))
    if reference.formatter.default_system_prompt is not None:  # Llama 3, Qwen: a system role
        cases.append(([("system", "  Answer briefly. "), ("user", "<image>\nWhat is shown?")],
                      [rand_image(2 * SIDE, SIDE, 90)]))
        # A system turn after the first: a turn of its own in the reference's role table.
        cases.append(([("user", "<image>\nWhat is it?"), ("assistant", "A cat."),
                       ("system", " Now answer in French. "), ("user", "And now?")],
                      [rand_image(SIDE, 2 * SIDE, 91)]))
    outs = run_engine(engine, cases, chat_template=template)
    for out, (turns, images) in zip(outs, cases):
        assert_parity(out, reference, turns, images)


def test_video_runs_as_its_frames(member):
    """Ovis2 runs a video as its guide does: frames as images with max_partition 1, in the
    prompt '\n'.join(['<image>'] * frames) + '\n' + text. The engine takes the frames as one
    video where the chat puts `<video>`, and gets the reference's prompt, log-probabilities and
    greedy tokens. Ovis1.6, which has no video, refuses one."""
    import numpy as np
    from PIL import Image
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    _, _, template, engine, reference = member
    rng = np.random.default_rng(SEED)
    video = rng.integers(0, 256, (3, 60, 100, 3), dtype=np.uint8)  # 3 frames, not square
    prompt = chat_prompt(engine.get_tokenizer(), [("user", "<video>\nWhat happens?")], template)
    request = {"prompt": prompt, "multi_modal_data": {"video": video}}
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1, logprobs=1)
    if reference.formatter.__class__.__name__ != "QwenConversationFormatter":  # Ovis1.6
        with pytest.raises(VLLMValidationError, match="At most 0 video"):
            engine.generate(request, params, use_tqdm=False)
        return
    out = engine.generate(request, params, use_tqdm=False)[0]
    frames = [Image.fromarray(frame) for frame in video]
    turns = [("user", "\n".join(["<image>"] * len(frames)) + "\nWhat happens?")]
    assert_parity(out, reference, turns, frames, max_partition=1)


def test_whole_text_tokenization_would_differ(member):
    """The tokenizer merges across the marker's edges, so the test above can fail: tokenizing the
    whole rendered prompt gives other ids than the reference's chunked tokenization."""
    _, _, template, engine, reference = member
    tokenizer = engine.get_tokenizer()
    differing = 0
    for turns in MARKER_CASES:
        text = chat_prompt(tokenizer, turns, template)
        chunked = [t for t in reference.format_conversation(turns) if t != -200]
        whole = tokenizer(text, add_special_tokens=False).input_ids
        differing += whole != chunked
    assert differing >= 3, differing


def test_literal_marker_without_image_is_refused(member):
    """The reference raises on `<image>` with no image; so does the engine (HTTP 400 served)."""
    _, _, template, engine, _ = member
    prompt = chat_prompt(engine.get_tokenizer(), [("user", "What does <image> mean?")], template)
    with pytest.raises(ValueError, match="no image was given"):
        engine.generate([prompt], use_tqdm=False)


def test_pad_token_as_text_is_refused(member):
    _, _, template, engine, reference = member
    pad = engine.get_tokenizer().convert_ids_to_tokens(reference.image_pad_id)
    prompt = chat_prompt(engine.get_tokenizer(), [("user", f"<image>\n{pad} Describe.")], template)
    with pytest.raises(ValueError, match="image pad token"):
        engine.generate([{"prompt": prompt, "multi_modal_data": {"image": rand_image(SIDE, SIDE, 1)}}],
                        use_tqdm=False)


def test_add_special_tokens_wraps_the_reference_ids(member):
    """A prompt tokenized with add_special_tokens (as completions requests may be) gets the
    reference's ids inside the tokenizer's own special-token wrapping."""
    from vllm import SamplingParams

    _, _, _, engine, reference = member
    tokenizer = engine.get_tokenizer()
    prompt = "Image 1:<image>Describe"
    request = {"prompt": prompt, "multi_modal_data": {"image": rand_image(SIDE, SIDE, 3)}}
    [out] = engine.generate([request], SamplingParams(max_tokens=1), use_tqdm=False,
                            tokenization_kwargs={"add_special_tokens": True})
    wrapped = tokenizer("a", add_special_tokens=True).input_ids
    prefix = wrapped[:wrapped.index(tokenizer("a", add_special_tokens=False).input_ids[0])]
    pieces = [tokenizer(p, add_special_tokens=False).input_ids for p in prompt.split("<image>")]
    ids = out.prompt_token_ids
    assert ids[:len(prefix)] == prefix
    assert ids[len(prefix):len(prefix) + len(pieces[0])] == pieces[0]
    assert ids[-len(pieces[1]):] == pieces[1]
    assert ids.count(reference.image_pad_id) > 0


def test_stops_at_the_members_turn_end(member):
    from vllm import SamplingParams

    preset, _, template, engine, reference = member
    turn_end = {"gemma2": "<end_of_turn>", "llama": "<|eot_id|>", "qwen2": "<|im_end|>"}[reference.llm_type]
    stop_id = engine.get_tokenizer().convert_tokens_to_ids(turn_end)
    prompt = chat_prompt(engine.get_tokenizer(), [("user", "Say something.")], template)
    params = SamplingParams(temperature=0, max_tokens=5, logit_bias={stop_id: 100.0})
    [out] = engine.generate([prompt], params, use_tqdm=False)
    assert list(out.outputs[0].token_ids) == [stop_id]
    assert out.outputs[0].finish_reason == "stop"
