"""Never worse than vLLM alone: an "Ovis" checkpoint without a member row is served by vLLM's
built-in Ovis, with the plugin installed. No release is such a checkpoint that vLLM serves
(Ovis1.5 it does not serve either), so the engine-level test uses a combination no release has,
SigLIP + Qwen2 (the Ovis2-1B preset with a SigLIP tower), which the built-in does serve."""

from __future__ import annotations

import json
import logging

import pytest

from ovis_vllm.engine.members import builtin_fallback_message, member_of
from tests.conftest import SEED
from tests.helpers import SIDE, make_llm, rand_image, shutdown


@pytest.fixture(scope="module")
def unlisted(tmp_path_factory):
    from ovis_vllm.engine.checkpoints import write_checkpoint

    path = write_checkpoint(tmp_path_factory.mktemp("siglip-qwen2"), "ovis2-1b", seed=SEED,
                            backbone="siglip")
    engine = make_llm(path, max_num_seqs=4, max_model_len=4096)
    yield path, engine
    shutdown(engine)


def model_class(model):  # module level: pickled to the worker
    return f"{type(model).__module__}.{type(model).__name__}"


def test_unlisted_checkpoint_is_served_by_vllms_builtin(unlisted):
    path, engine = unlisted
    assert member_of(json.loads((path / "config.json").read_text())) is None
    assert engine.apply_model(model_class) == ["vllm.model_executor.models.ovis.Ovis"]


def test_unlisted_checkpoint_answers_image_prompts(unlisted):
    from vllm import SamplingParams

    _, engine = unlisted
    tokenizer = engine.get_tokenizer()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": "<image>\nDescribe the image."}],
                                             tokenize=False, add_generation_prompt=True),
               tokenizer.apply_chat_template([{"role": "user", "content": "Just text."}],
                                             tokenize=False, add_generation_prompt=True)]
    requests = [{"prompt": prompts[0], "multi_modal_data": {"image": rand_image(2 * SIDE, SIDE, 3)}},
                {"prompt": prompts[1]}]
    outs = engine.generate(requests, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert image_pad in outs[0].prompt_token_ids  # the built-in placed the image
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)


def test_other_architectures_are_left_to_vllm(tiny_checkpoint, tmp_path):
    """The plugin's renderer replaces vLLM's for every model; on a non-Ovis model (a plain Gemma2
    made from the tiny checkpoint's LLM) it must do exactly what vLLM does: whole-text
    tokenization, and `<image>` is ordinary text there."""
    import shutil

    from safetensors.torch import load_file, save_file
    from vllm import SamplingParams

    config = json.loads((tiny_checkpoint / "config.json").read_text())["llm_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = load_file(tiny_checkpoint / "model.safetensors")
    save_file({k[len("llm."):]: v for k, v in weights.items() if k.startswith("llm.")},
              tmp_path / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny_checkpoint / name, tmp_path / name)
    engine = make_llm(tmp_path, limit_mm_per_prompt=None, max_num_seqs=2)
    try:
        prompt = "<bos>What does <image> mean?\nAnswer:"
        [out] = engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
        assert out.prompt_token_ids == engine.get_tokenizer()(prompt, add_special_tokens=False).input_ids
    finally:
        shutdown(engine)


def test_ovis15_is_not_taken_for_ovis16():
    """Ovis1.5 shares Ovis1.6's visual tokenizer type, without the hidden_stride merge and with
    a multi-scale booster: no member row (vLLM, which has no Ovis1.5 either, decides)."""
    from ovis_vllm.engine.checkpoints.ovis import PRESETS, ovis_config

    config = ovis_config(PRESETS["ovis1.6-gemma2-9b"])
    assert member_of(config).name == "Ovis1.6-Gemma2"
    for change in ({"hidden_stride": 1}, {"hd_booster": "s2wrapper"}):
        ovis15 = dict(config, visual_tokenizer_config=dict(config["visual_tokenizer_config"], **change))
        assert member_of(ovis15) is None, change


def test_fallback_log_line_names_the_differences(unlisted):
    path, _ = unlisted
    message = builtin_fallback_message(json.loads((path / "config.json").read_text()))
    assert "siglip_visual_tokenizer" in message and "qwen2" in message
    assert "reversed order" in message and "different crop grids" in message


def test_unlisted_ovis2_5_checkpoint_is_served_by_vllms_builtin(tmp_path):
    """An "Ovis2_5" checkpoint with no member row (a Qwen2 LLM, which no release has) is built as
    vLLM's built-in Ovis2_5, with one warning naming why, and answers an image prompt; our config
    class reads it without remote code."""
    from vllm import SamplingParams

    from ovis_vllm.engine.checkpoints import write_checkpoint
    from ovis_vllm.engine.preprocess_navit import smart_resize

    path = write_checkpoint(tmp_path / "ovis2.5-qwen2", "ovis2.5-2b", seed=SEED, llm="qwen2")
    config = json.loads((path / "config.json").read_text())
    assert member_of(config) is None
    warnings = []  # our loggers' records (the engine is built in this process: tests/helpers.py)
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append
    logging.getLogger("ovis_vllm").addHandler(handler)
    try:
        engine = make_llm(path, max_num_seqs=2, limit_mm_per_prompt={"image": 1})
    finally:
        logging.getLogger("ovis_vllm").removeHandler(handler)
    try:
        assert engine.apply_model(model_class) == ["vllm.model_executor.models.ovis2_5.Ovis2_5"]
        prompt = "<|im_start|>user\n<image>\nDescribe.<|im_end|>\n<|im_start|>assistant\n"
        [out] = engine.generate([{"prompt": prompt, "multi_modal_data": {"image": rand_image(96, 64, 1)}}],
                                SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
        assert len(out.outputs[0].token_ids) == 3
        height, width = smart_resize(64, 96, 32, 448 * 448, 1792 * 1792)
        pads = out.prompt_token_ids.count(engine.get_tokenizer().convert_tokens_to_ids("<|image_pad|>"))
        assert pads == height * width // 32**2 + 2  # the built-in placed the image
    finally:
        shutdown(engine)
    assert [w.getMessage()[:67] for w in warnings] == [
        "This Ovis2.5/2.6 checkpoint (vision tower siglip2_navit, LLM qwen2)"]
