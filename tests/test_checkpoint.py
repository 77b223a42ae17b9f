"""The checkpoint generator writes what the published Ovis1.6 checkpoints look like."""

import json

import pytest
import torch
from safetensors import safe_open

from ovis_vllm.engine.checkpoints import main, write_checkpoint
from ovis_vllm.engine.checkpoints.ovis import PRESETS, _tensor_shapes, gptq_pack, ovis_config
from ovis_vllm.engine.members import member_of
from tests.ovis_reference import ReferenceOvis, dequantize_gptq

# AIDC-AI's files, verbatim (the same preprocessor_config.json in every Ovis1.6 release; the
# GPTQ-Int4 release's quantize_config.json).
PUBLISHED_PREPROCESSOR_CONFIG = """{
  "do_convert_rgb": null,
  "do_normalize": true,
  "do_rescale": true,
  "do_resize": true,
  "image_mean": [
    0.5,
    0.5,
    0.5
  ],
  "image_processor_type": "SiglipImageProcessor",
  "image_std": [
    0.5,
    0.5,
    0.5
  ],
  "processor_class": "SiglipProcessor",
  "resample": 3,
  "rescale_factor": 0.00392156862745098,
  "size": {
    "height": 384,
    "width": 384
  }
}
"""
PUBLISHED_QUANTIZE_CONFIG = """{
  "bits": 4,
  "group_size": 128,
  "damp_percent": 0.1,
  "desc_act": false,
  "static_groups": false,
  "sym": true,
  "true_sequential": true,
  "model_name_or_path": null,
  "model_file_base_name": null,
  "is_marlin_format": false,
  "quant_method": "gptq"
}"""
PUBLISHED_OVIS2_PREPROCESSOR_CONFIG = """{
  "crop_size": {
    "height": 448,
    "width": 448
  },
  "do_center_crop": false,
  "do_convert_rgb": true,
  "do_normalize": true,
  "do_rescale": true,
  "do_resize": true,
  "image_mean": [
    0.48145466,
    0.4578275,
    0.40821073
  ],
  "image_processor_type": "CLIPImageProcessor",
  "image_std": [
    0.26862954,
    0.26130258,
    0.27577711
  ],
  "resample": 3,
  "rescale_factor": 0.00392156862745098,
  "size": {
    "shortest_edge": 448
  }
}
"""
# The start of Ovis1.6-Gemma2-9B's config.json: top-level keys, then llm_config's first keys.
PUBLISHED_TOP_KEYS = ["architectures", "auto_map", "conversation_formatter_class",
                      "disable_tie_weight", "hidden_size", "llm_attn_implementation", "llm_config"]
PUBLISHED_LLM_KEYS = ["_name_or_path", "add_cross_attention", "architectures", "attention_bias",
                      "attention_dropout", "attn_logit_softcapping", "bad_words_ids",
                      "begin_suppress_tokens", "bos_token_id", "cache_implementation",
                      "chunk_size_feed_forward", "cross_attention_hidden_size",
                      "decoder_start_token_id", "diversity_penalty", "do_sample", "early_stopping",
                      "encoder_no_repeat_ngram_size", "eos_token_id",
                      "exponential_decay_length_penalty", "final_logit_softcapping",
                      "finetuning_task", "forced_bos_token_id", "forced_eos_token_id", "head_dim",
                      "hidden_act", "hidden_activation", "hidden_size", "id2label",
                      "initializer_range", "intermediate_size", "is_decoder", "is_encoder_decoder",
                      "label2id"]
MEMBER_PRESETS = {"ovis1.6-gemma2-9b": "Ovis1.6-Gemma2", "ovis1.6-gemma2-27b": "Ovis1.6-Gemma2",
                  "ovis1.6-llama3.2-3b": "Ovis1.6-Llama3.2",
                  "ovis1.6-gemma2-9b-gptq-int4": "Ovis1.6-Gemma2",
                  "ovis1.6-llama3.2-3b-gptq-int4": "Ovis1.6-Llama3.2",
                  "ovis2-1b": "Ovis2", "ovis2-8b": "Ovis2", "ovis2-8b-gptq-int4": "Ovis2"}


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


def test_published_files_verbatim(tmp_path):
    wide = write_checkpoint(tmp_path / "wide", PRESETS["wide"], layers=1, vis_layers=1,
                            hidden=64, intermediate=64, heads=1, kv_heads=1, head_dim=64,
                            visual_vocab=64, vis_width=16, vis_intermediate=16, vis_heads=1)
    assert (wide / "preprocessor_config.json").read_text() == PUBLISHED_PREPROCESSOR_CONFIG
    gptq = write_checkpoint(tmp_path / "gptq", "ovis1.6-gemma2-9b-gptq-int4")
    assert (gptq / "quantize_config.json").read_text() == PUBLISHED_QUANTIZE_CONFIG
    from ovis_vllm.engine.checkpoints.ovis import preprocessor_config

    ovis2 = json.dumps(preprocessor_config(PRESETS["ovis2-wide"]), indent=2, sort_keys=True) + "\n"
    assert ovis2 == PUBLISHED_OVIS2_PREPROCESSOR_CONFIG


@pytest.mark.parametrize("preset", sorted(MEMBER_PRESETS))
def test_member_presets_mirror_the_published_layout(preset, tmp_path):
    from vllm.transformers_utils.configs.ovis import OvisConfig

    path = write_checkpoint(tmp_path / preset, preset)
    text = (path / "config.json").read_text()
    cfg = json.loads(text)
    assert list(cfg)[:len(PUBLISHED_TOP_KEYS)] == PUBLISHED_TOP_KEYS
    llm = cfg["llm_config"]
    if llm["model_type"] == "gemma2":
        assert list(llm)[:len(PUBLISHED_LLM_KEYS)] == PUBLISHED_LLM_KEYS
        assert (llm["attn_logit_softcapping"], llm["final_logit_softcapping"]) == (50.0, 30.0)
    elif llm["model_type"] == "llama":
        assert llm["rope_scaling"]["rope_type"] == "llama3" and llm["tie_word_embeddings"]
    else:  # Qwen2.5 as in Ovis2-4B's file; the releases store lm_head, tied or not
        assert llm["sliding_window"] is None and not llm["use_sliding_window"]
        assert cfg["multimodal_max_length"] == 32768
        assert cfg["visual_tokenizer_config"]["backbone_config"]["model_type"] == "aimv2"
        with safe_open(next(path.glob("*.safetensors")), "pt") as f:
            assert "llm.lm_head.weight" in f.keys()
    assert member_of(cfg).name == MEMBER_PRESETS[preset]
    assert member_of(OvisConfig(**json.loads(text))).name == MEMBER_PRESETS[preset]
    tokenizer_files = {p.name for p in path.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json", "preprocessor_config.json"} <= tokenizer_files


def test_gemma2_27b_attention_scale_is_not_head_dim():
    """27B scales queries by hidden / heads (144), not head_dim (128); the preset keeps the two
    apart, and q_proj's width differs from hidden as in 27B (4096 != 4608)."""
    cfg = ovis_config(PRESETS["ovis1.6-gemma2-27b"])["llm_config"]
    assert cfg["query_pre_attn_scalar"] == cfg["hidden_size"] // cfg["num_attention_heads"]
    assert cfg["query_pre_attn_scalar"] != cfg["head_dim"]
    assert cfg["num_attention_heads"] * cfg["head_dim"] != cfg["hidden_size"]


def test_gptq_checkpoint_quantizes_the_llm_layers_only(tmp_path):
    path = write_checkpoint(tmp_path / "q", "ovis1.6-llama3.2-3b-gptq-int4", seed=2)
    with safe_open(path / "gptq_model-4bit-128g.safetensors", "pt") as f:
        names = set(f.keys())
        dtypes = {n: f.get_tensor(n).dtype for n in names}
    quantized = {n.rsplit(".", 1)[0] for n in names if n.endswith(".qweight")}
    assert quantized and all(n.startswith("llm.model.layers.") for n in quantized)
    assert len(quantized) == 7 * PRESETS["ovis1.6-llama3.2-3b-gptq-int4"].layers
    for layer in quantized:
        assert {f"{layer}.{k}" for k in ("qzeros", "scales", "g_idx")} <= names
        assert dtypes[f"{layer}.qweight"] == torch.int32 and dtypes[f"{layer}.scales"] == torch.float16
    for name in ("vte.weight", "visual_tokenizer.head.0.weight", "llm.model.embed_tokens.weight",
                 "visual_tokenizer.backbone.vision_model.encoder.layers.0.mlp.fc1.weight"):
        assert dtypes[name] == torch.float16


def test_gptq_packing_round_trips_through_the_reference_dequantizer():
    """The generator's packing and the reference's (separately written) unpacking agree: every
    weight comes back within half a quantization step (plus the fp16 rounding of the scale at the
    range's ends), and the packed values use all 16 levels."""
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))
    packed = gptq_pack(weight, 128)
    restored = dequantize_gptq(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"])
    step = packed["scales"].float().repeat_interleave(128, dim=0).t()  # [out, in]
    assert ((restored - weight).abs() <= 0.51 * step).all()
    nibbles = {int(v) for v in ((packed["qweight"][:, :, None] >> torch.arange(0, 32, 4)) & 15).unique()}
    assert nibbles == set(range(16))


def test_tiny_tokenizer_gives_the_same_ids_as_before(ckpt):
    """The `tiny` tokenizer knows <image> as an added token; whole-text tokenization (as before
    the renderer) and the reference's chunked tokenization agree, marker aside."""
    from transformers import AutoTokenizer

    from ovis_vllm.engine.renderer import reference_token_ids

    text = ("<bos><start_of_turn>user\nImage 1:<image>Describe the image.<image><image>\n"
            "Compare the two images.<end_of_turn>\n<start_of_turn>model\n")
    before = [2, 106, 192, 190, 372, 306, 148, 371, 178, 176, 328, 124, 133, 511, 421, 435, 431,
              367, 419, 121, 511, 511, 306, 420, 401, 430, 367, 489, 394, 373, 121, 107, 306, 106,
              184, 186, 175, 176, 183, 306]
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok(text, add_special_tokens=False).input_ids == before
    assert reference_token_ids(tok, text, {"<image>": 7}, {"image": ("<unused0>", 7)}) == [7 if t == 511 else t for t in before]


def test_same_seed_same_weights(tmp_path):
    a = write_checkpoint(tmp_path / "a", "tiny", seed=5)
    b = write_checkpoint(tmp_path / "b", "tiny", seed=5)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
