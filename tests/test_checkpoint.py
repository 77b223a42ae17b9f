"""The checkpoint generator writes what the real Ovis1.6-Gemma2-9B checkpoint looks like."""

import json

import pytest
from safetensors import safe_open

from engine.checkpoint import PRESETS, _tensor_shapes, main, write_checkpoint
from tests.ovis_reference import ReferenceOvis


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    main([str(path), "--preset", "tiny", "--seed", "3"])
    return path


def test_gemma_special_tokens_and_template(ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = {t: tok.convert_tokens_to_ids(t) for t in
           ["<pad>", "<eos>", "<bos>", "<unused0>", "<start_of_turn>", "<end_of_turn>"]}
    assert ids == {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unused0>": 7,
                   "<start_of_turn>": 106, "<end_of_turn>": 107}
    turns = [("user", " <image>\nHi "), ("assistant", "Yes. "), ("user", "More?")]
    text = tok.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False,
                                   add_generation_prompt=True)
    assert text == ("<bos><start_of_turn>user\n<image>\nHi<end_of_turn>\n<start_of_turn>model\nYes."
                    "<end_of_turn>\n<start_of_turn>user\nMore?<end_of_turn>\n<start_of_turn>model\n")
    # Tokenizing the whole prompt equals the reference's per-chunk tokenization around <image>.
    ref = ReferenceOvis(ckpt)
    whole = tok(text, add_special_tokens=False).input_ids
    chunked = [(-200 if t == -200 else t) for t in ref.format_conversation(turns)]
    image_id = tok.convert_tokens_to_ids("<image>")
    assert [(-200 if t == image_id else t) for t in whole] == chunked
    with pytest.raises(Exception, match="no system role"):
        tok.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


def test_config_schema_and_tensor_names(ckpt):
    from vllm.transformers_utils.configs.ovis import OvisConfig

    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "ovis" and cfg["architectures"] == ["Ovis"]
    assert cfg["llm_config"]["model_type"] == "gemma2"
    assert cfg["visual_tokenizer_config"]["backbone_config"]["model_type"] == "siglip_vision_model"
    parsed = OvisConfig(**cfg)
    assert parsed.visual_tokenizer_config.hidden_stride == 2
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert {"vte.weight", "visual_tokenizer.head.0.weight", "visual_tokenizer.head.1.weight",
            "visual_tokenizer.head.1.bias", "llm.model.embed_tokens.weight",
            "visual_tokenizer.backbone.vision_model.post_layernorm.weight"} <= names
    assert not any(n.startswith("llm.lm_head") for n in names)  # tied, as in Gemma2


def test_wide_preset_has_real_widths():
    shapes = _tensor_shapes(PRESETS["wide"])
    assert shapes["vte.weight"] == (65536, 3584)
    assert shapes["visual_tokenizer.head.0.weight"] == (65531, 1152 * 4)
    assert shapes["visual_tokenizer.backbone.vision_model.embeddings.patch_embedding.weight"] == (1152, 3, 14, 14)


def test_same_seed_same_weights(tmp_path):
    a = write_checkpoint(tmp_path / "a", "tiny", seed=5)
    b = write_checkpoint(tmp_path / "b", "tiny", seed=5)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
