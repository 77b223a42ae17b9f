"""Ovis1.6 / Ovis2 checkpoints (the "Ovis" architecture) with random weights.

Each preset mirrors a published AIDC-AI checkpoint at small widths: the config.json layout (sorted
keys, `llm_config` / `visual_tokenizer_config` / `backbone_config` as full dicts with the generic
transformers 4.44 fields, as AIDC-AI's files have them), the tensor names
(`llm.model.*`, `visual_tokenizer.backbone.vision_model.*`, `visual_tokenizer.head.{0,1}.*`,
`vte.weight`), the SigLIP `preprocessor_config.json` byte for byte, generation_config.json, and a
tokenizer of the base LLM's kind with its special tokens at their real ids and no `<image>`
token (tokenizer_mirrors.py). docs/reference.md says what was read from the published
files and what is inferred.

Presets:
  ovis1.6-gemma2-9b             Gemma2 (sqrt(hidden) embedding scale), Gemma tokenizer
  ovis1.6-gemma2-27b            as 9B, with query_pre_attn_scalar = hidden / heads != head_dim
  ovis1.6-llama3.2-3b           Llama 3.2 (llama3 RoPE scaling, tied embeddings), Llama 3 tokenizer
  ovis1.6-gemma2-9b-gptq-int4   the 9B with its LLM layers GPTQ-quantized (4 bit, group 128)
  ovis1.6-llama3.2-3b-gptq-int4 the 3B likewise
  ovis2-1b                      Ovis2-1B-shaped: AIMv2 (AIDC-AI's module names) + Qwen2.5 (tied,
                                lm_head stored), Qwen2 tokenizer, CLIP preprocessor config
  ovis2-8b                      Ovis2-8B-shaped: as 1B with an untied lm_head
  ovis2-8b-gptq-int4            the 8B with its LLM layers GPTQ-quantized
  tiny                          the embedded default model: Gemma2-9B-shaped, and a byte-level BPE
                                tokenizer with Gemma's special ids that knows `<image>`
  wide                          Ovis1.6-Gemma2-9B's real widths, one layer each, for benchmarks
  ovis2-wide                    Ovis2-8B's real widths, one layer each, for benchmarks
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..chat_template import GEMMA_CHAT_TEMPLATE
from ..placeholders import NUM_INDICATORS

# Gemma's and Llama 3's ids that the configs name.
PAD_ID, EOS_ID, BOS_ID, END_OF_TURN_ID = 0, 1, 2, 107
LLAMA3_BOS_ID, LLAMA3_EOS_IDS = 128000, [128001, 128008, 128009]


@dataclass(frozen=True)
class Preset:
    llm: str        # "gemma2" | "llama" | "qwen2"
    tokenizer: str  # "gemma" | "llama3" | "qwen2" | "bytelevel-image" (the `tiny` one, knows <image>)
    text_vocab: int  # the LLM vocabulary; equals the tokenizer's size
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vis_width: int
    vis_intermediate: int
    vis_layers: int
    vis_heads: int
    image_size: int
    patch_size: int
    hidden_stride: int
    visual_vocab: int
    dtype: str
    sliding_window: int = 4096
    query_pre_attn_scalar: int | None = None  # Gemma2; None: head_dim (as the 9B)
    gptq_group_size: int | None = None        # GPTQ-Int4 LLM layers (AutoGPTQ format)
    multimodal_max_length: int = 8192
    name_or_path: str = "google/gemma-2-9b-it"  # llm_config._name_or_path
    backbone: str = "siglip"  # "siglip" (Ovis1.6) | "aimv2" (Ovis2)
    backbone_name_or_path: str = "google/siglip-so400m-patch14-384"
    tie_word_embeddings: bool = True


# Small vision tower shared by the test presets: side 76 / patch 14 gives a 5x5 patch grid (odd,
# so the hidden_stride padding to 6x6 runs), 9 visual tokens per crop.
_SMALL_VISION = dict(vis_width=64, vis_intermediate=128, vis_layers=2, vis_heads=2, image_size=76,
                     patch_size=14, hidden_stride=2, visual_vocab=1000)
# head_dim 64 everywhere: vLLM's CPU attention rejects 16.
_GEMMA2_9B = Preset(llm="gemma2", tokenizer="gemma", text_vocab=1024, hidden=128, intermediate=256,
                    layers=2, heads=2, kv_heads=1, head_dim=64, dtype="float32", **_SMALL_VISION)
_LLAMA32_3B = Preset(llm="llama", tokenizer="llama3", text_vocab=128256, hidden=128,
                     intermediate=256, layers=2, heads=2, kv_heads=1, head_dim=64, dtype="float32",
                     name_or_path="meta-llama/Llama-3.2-3B-Instruct", **_SMALL_VISION)

# Ovis2-1B: AIMv2-large (448/14) + Qwen2.5-0.5B (tied embeddings, lm_head stored anyway, as in
# the releases). Mirrored: side 56 / patch 14 (a 4x4 patch grid, divisible by hidden_stride 2 as
# vLLM's built-in requires), vocabulary padded to 151936 like Qwen2.5's.
_OVIS2_1B = replace(_GEMMA2_9B, llm="qwen2", tokenizer="qwen2", backbone="aimv2", text_vocab=151936,
                    image_size=56, multimodal_max_length=32768,
                    name_or_path="Qwen/Qwen2.5-0.5B-Instruct",
                    backbone_name_or_path="apple/aimv2-large-patch14-448")
# Ovis2-8B: AIMv2-huge + Qwen2.5-7B, untied lm_head (vocabulary 152064), kv heads 4 of 28.
_OVIS2_8B = replace(_OVIS2_1B, text_vocab=152064, tie_word_embeddings=False, heads=4, kv_heads=2,
                    hidden=256, intermediate=512, name_or_path="Qwen/Qwen2.5-7B-Instruct",
                    backbone_name_or_path="apple/aimv2-huge-patch14-448")

PRESETS = {
    "ovis1.6-gemma2-9b": _GEMMA2_9B,
    # 27B: hidden 4608, 32 heads of head_dim 128 (4096 != hidden), query_pre_attn_scalar 144 =
    # hidden / heads. Mirrored: hidden 192, 2 heads of 64 (128 != 192), scalar 96 = 192 / 2.
    "ovis1.6-gemma2-27b": replace(_GEMMA2_9B, hidden=192, intermediate=384, query_pre_attn_scalar=96,
                                  name_or_path="google/gemma-2-27b-it"),
    "ovis1.6-llama3.2-3b": _LLAMA32_3B,
    # GPTQ releases: fp16 unquantized tensors and scales, as AutoGPTQ writes them.
    "ovis1.6-gemma2-9b-gptq-int4": replace(_GEMMA2_9B, gptq_group_size=128, dtype="float16"),
    "ovis1.6-llama3.2-3b-gptq-int4": replace(_LLAMA32_3B, gptq_group_size=128, dtype="float16"),
    "ovis2-1b": _OVIS2_1B,
    "ovis2-8b": _OVIS2_8B,
    "ovis2-8b-gptq-int4": replace(_OVIS2_8B, gptq_group_size=128, dtype="float16"),
    # Ovis2-8B's real widths (AIMv2-huge 1536, Qwen2.5-7B 3584, side 448) with one layer each,
    # for benchmarks; embeddings tied to keep the 151936-row vocabulary to one copy.
    "ovis2-wide": replace(
        _OVIS2_8B, text_vocab=151936, tie_word_embeddings=True, hidden=3584, intermediate=18944,
        layers=1, heads=28, kv_heads=4, head_dim=128, vis_width=1536, vis_intermediate=4096,
        vis_layers=1, vis_heads=12, image_size=448, visual_vocab=65536, dtype="bfloat16"),
    "tiny": replace(_GEMMA2_9B, tokenizer="bytelevel-image", text_vocab=512),
    # Real widths (Ovis1.6-Gemma2-9B) with one layer each, for benchmarks.
    "wide": Preset(
        llm="gemma2", tokenizer="bytelevel-image", text_vocab=512, hidden=3584, intermediate=14336,
        layers=1, heads=16, kv_heads=8, head_dim=256, vis_width=1152, vis_intermediate=4304,
        vis_layers=1, vis_heads=16, image_size=384, patch_size=14, hidden_stride=2,
        visual_vocab=65536, dtype="bfloat16",
    ),
}


def _tokenizer(p: Preset):
    from . import tokenizer_mirrors

    tok = {"bytelevel-image": lambda: tokenizer_mirrors.build_bytelevel_image_tokenizer(p.text_vocab),
           "gemma": lambda: tokenizer_mirrors.build_gemma_tokenizer(p.text_vocab),
           "llama3": tokenizer_mirrors.build_llama3_tokenizer,
           "qwen2": tokenizer_mirrors.build_qwen2_tokenizer}[p.tokenizer]()
    # Qwen2.5 pads its embedding past the tokenizer's last id (151936 > 151665).
    assert len(tok) == p.text_vocab or p.llm == "qwen2", (p.tokenizer, len(tok), p.text_vocab)
    return tok


# The generic fields transformers 4.44's PretrainedConfig.to_dict() writes for every nested config
# (AIDC-AI's config.json files carry them in llm_config, visual_tokenizer_config and
# backbone_config).
_PRETRAINED_CONFIG_FIELDS = {
    "add_cross_attention": False, "bad_words_ids": None, "begin_suppress_tokens": None,
    "bos_token_id": None, "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None,
    "decoder_start_token_id": None, "diversity_penalty": 0.0, "do_sample": False,
    "early_stopping": False, "encoder_no_repeat_ngram_size": 0, "eos_token_id": None,
    "exponential_decay_length_penalty": None, "finetuning_task": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_decoder": False,
    "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "length_penalty": 1.0, "max_length": 20, "min_length": 0, "no_repeat_ngram_size": 0,
    "num_beam_groups": 1, "num_beams": 1, "num_return_sequences": 1, "output_attentions": False,
    "output_hidden_states": False, "output_scores": False, "pad_token_id": None, "prefix": None,
    "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False,
    "repetition_penalty": 1.0, "return_dict": True, "return_dict_in_generate": False,
    "sep_token_id": None, "suppress_tokens": None, "task_specific_params": None,
    "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False,
    "tie_word_embeddings": True, "tokenizer_class": None, "top_k": 50, "top_p": 1.0,
    "torchscript": False, "typical_p": 1.0, "use_bfloat16": False,
}


def _full_dict(**fields) -> dict:
    return dict(sorted((_PRETRAINED_CONFIG_FIELDS | fields).items()))


def _llm_config(p: Preset) -> dict:
    common = {
        "_name_or_path": p.name_or_path,
        "vocab_size": p.text_vocab, "hidden_size": p.hidden, "intermediate_size": p.intermediate,
        "num_hidden_layers": p.layers, "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads, "head_dim": p.head_dim, "attention_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02,
        "tie_word_embeddings": p.tie_word_embeddings,
        "torch_dtype": p.dtype, "use_cache": True,
    }
    if p.llm == "gemma2":
        return _full_dict(**common, **{
            "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"],
            "query_pre_attn_scalar": p.query_pre_attn_scalar or p.head_dim,
            "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "sliding_window": p.sliding_window, "sliding_window_size": p.sliding_window,
            "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
            "cache_implementation": "hybrid",
            "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
        })
    if p.llm == "qwen2":  # Ovis2-4B's llm_config (transformers 4.46)
        return _full_dict(**common, **{
            "_attn_implementation_autoset": True,
            "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu",
            "max_position_embeddings": 32768, "max_window_layers": p.layers, "rms_norm_eps": 1e-6,
            "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
            "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151645,
        })
    return _full_dict(**common, **{
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu", "max_position_embeddings": 131072, "mlp_bias": False,
        "pretraining_tp": 1, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "bos_token_id": LLAMA3_BOS_ID, "eos_token_id": LLAMA3_EOS_IDS,
    })


_FORMATTERS = {"gemma2": "GemmaConversationFormatter", "llama": "Llama3ConversationFormatter",
               "qwen2": "QwenConversationFormatter"}


def _backbone_config(p: Preset) -> dict:
    shared = dict(hidden_size=p.vis_width, intermediate_size=p.vis_intermediate,
                  num_hidden_layers=p.vis_layers, num_attention_heads=p.vis_heads, num_channels=3,
                  image_size=p.image_size, patch_size=p.patch_size, attention_dropout=0.0,
                  torch_dtype="float32")
    if p.backbone == "aimv2":  # AIDC-AI's AIMv2Config, as in Ovis2-4B's config.json
        return _full_dict(**shared | {"torch_dtype": "bfloat16"},
                          _name_or_path=p.backbone_name_or_path, architectures=["AIMv2Model"],
                          auto_map={"AutoConfig": "configuration_aimv2.AIMv2Config",
                                    "AutoModel": "modeling_aimv2.AIMv2Model",
                                    "FlaxAutoModel": "modeling_flax_aimv2.FlaxAIMv2Model"},
                          model_type="aimv2", rms_norm_eps=1e-5, qkv_bias=False, use_bias=False,
                          projection_dropout=0.0)
    return _full_dict(**shared, _name_or_path=p.backbone_name_or_path,
                      model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh",
                      layer_norm_eps=1e-6)


def ovis_config(p: Preset) -> dict:
    backbone = _backbone_config(p)
    visual = _full_dict(
        model_type=f"{p.backbone}_visual_tokenizer", backbone_config=backbone, backbone_kwargs={},
        depths=None, drop_cls_token=False, hidden_stride=p.hidden_stride, tau=1.0,
        tokenize_function="softmax", vocab_size=p.visual_vocab, torch_dtype="float32")
    if p.backbone == "aimv2":  # Ovis2-4B's: a stray use_indicators, dtype unset
        visual |= {"_name_or_path": "", "architectures": None, "torch_dtype": None,
                   "use_indicators": False}
        visual = dict(sorted(visual.items()))
    config = {
        "architectures": ["Ovis"],
        "auto_map": {"AutoConfig": "configuration_ovis.OvisConfig",
                     "AutoModelForCausalLM": "modeling_ovis.Ovis"},
        "conversation_formatter_class": _FORMATTERS[p.llm],
        "disable_tie_weight": False,
        "hidden_size": p.hidden,
        "llm_attn_implementation": "flash_attention_2" if p.llm == "qwen2" else "eager",
        "llm_config": _llm_config(p),
        "model_type": "ovis",
        "multimodal_max_length": p.multimodal_max_length,
        "torch_dtype": p.dtype,
        "transformers_version": "4.46.2" if p.llm == "qwen2" else "4.44.2",
        "use_cache": True,
        "visual_tokenizer_config": visual,
    }
    if p.gptq_group_size is not None:
        config["quantization_config"] = gptq_config(p)
    return config


def gptq_config(p: Preset) -> dict:
    """quantize_config.json of the GPTQ-Int4 releases (AutoGPTQ 0.7 layout, verbatim keys)."""
    return {"bits": 4, "group_size": p.gptq_group_size, "damp_percent": 0.1, "desc_act": False,
            "static_groups": False, "sym": True, "true_sequential": True,
            "model_name_or_path": None, "model_file_base_name": None, "is_marlin_format": False,
            "quant_method": "gptq"}


def generation_config(p: Preset) -> dict:
    if p.llm == "qwen2":  # Ovis2-4B's (1B/2B: Qwen2.5-0.5B/1.5B's repetition penalty 1.1)
        return {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                "multimodal_max_length": p.multimodal_max_length, "pad_token_id": 151643,
                "repetition_penalty": 1.1 if p.name_or_path.endswith(
                    ("0.5B-Instruct", "1.5B-Instruct")) else 1.05,
                "temperature": 0.7, "top_k": 20, "top_p": 0.8, "transformers_version": "4.46.2"}
    if p.llm == "gemma2":  # google/gemma-2-9b-it's
        return {"_from_model_config": True, "bos_token_id": BOS_ID, "cache_implementation": "hybrid",
                "eos_token_id": [EOS_ID, END_OF_TURN_ID], "pad_token_id": PAD_ID,
                "transformers_version": "4.44.2"}
    return {"bos_token_id": LLAMA3_BOS_ID, "do_sample": True, "eos_token_id": LLAMA3_EOS_IDS,
            "multimodal_max_length": p.multimodal_max_length, "temperature": 0.6, "top_p": 0.9,
            "transformers_version": "4.44.2"}


def preprocessor_config(p: Preset) -> dict:
    """AIDC-AI's preprocessor_config.json (the same 394 bytes in every Ovis1.6 release; Ovis2's is
    CLIP's), with this preset's image side."""
    if p.backbone == "aimv2":
        return {"crop_size": {"height": p.image_size, "width": p.image_size},
                "do_center_crop": False, "do_convert_rgb": True, "do_normalize": True,
                "do_rescale": True, "do_resize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_processor_type": "CLIPImageProcessor",
                "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
                "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": p.image_size}}
    return {"do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
            "image_std": [0.5, 0.5, 0.5], "processor_class": "SiglipProcessor", "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "size": {"height": p.image_size, "width": p.image_size}}


# The Linear layers AutoGPTQ quantizes in every LLM decoder layer of the Ovis GPTQ releases; the
# embedding, norms, vision tower, visual head and VTE stay floating point.
GPTQ_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def gptq_pack(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """A Linear weight [out, in] as AutoGPTQ's 4-bit symmetric format (checkpoint_format "gptq"):
    qweight int32 [in/8, out] (8 nibbles along `in`), qzeros int32 [in/group, out/8] holding
    zero - 1 = 7, scales fp16 [in/group, out], g_idx int32 [in] (desc_act off: i // group).
    Dequantized, each weight is (q - 8) * scale."""
    out_features, in_features = weight.shape
    assert in_features % group_size == 0 and in_features % 8 == 0 and out_features % 8 == 0
    groups = weight.float().t().reshape(in_features // group_size, group_size, out_features)
    # AutoGPTQ's symmetric quantizer: scale = 2 max|w| / 15, zero point 8.
    scales = (groups.abs().amax(dim=1) * 2 / 15).clamp(min=1e-8).half()  # [groups, out]
    q = (torch.round(groups / scales.float()[:, None, :]) + 8).clamp(0, 15).to(torch.int32)
    q = q.reshape(in_features, out_features)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    qweight = (q.reshape(in_features // 8, 8, out_features) << shifts[None, :, None]).sum(dim=1)
    zeros = torch.full((in_features // group_size, out_features // 8, 8), 7, dtype=torch.int32)
    qzeros = (zeros << shifts[None, None, :]).sum(dim=2)
    g_idx = torch.arange(in_features, dtype=torch.int32) // group_size
    return {"qweight": qweight.to(torch.int32), "qzeros": qzeros.to(torch.int32), "scales": scales,
            "g_idx": g_idx}


def _tensor_shapes(p: Preset) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, named as in the real one (before GPTQ packing)."""
    shapes: dict[str, tuple[int, ...]] = {"llm.model.embed_tokens.weight": (p.text_vocab, p.hidden)}
    q, kv = p.heads * p.head_dim, p.kv_heads * p.head_dim
    norms = ["input_layernorm", "post_attention_layernorm"]
    if p.llm == "gemma2":
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(p.layers):
        pre = f"llm.model.layers.{i}."
        shapes |= {
            pre + "self_attn.q_proj.weight": (q, p.hidden),
            pre + "self_attn.k_proj.weight": (kv, p.hidden),
            pre + "self_attn.v_proj.weight": (kv, p.hidden),
            pre + "self_attn.o_proj.weight": (p.hidden, q),
            pre + "mlp.gate_proj.weight": (p.intermediate, p.hidden),
            pre + "mlp.up_proj.weight": (p.intermediate, p.hidden),
            pre + "mlp.down_proj.weight": (p.hidden, p.intermediate),
        }
        if p.llm == "qwen2":  # Qwen2 has q/k/v biases
            shapes |= {pre + "self_attn.q_proj.bias": (q,), pre + "self_attn.k_proj.bias": (kv,),
                       pre + "self_attn.v_proj.bias": (kv,)}
        for norm in norms:
            shapes[pre + norm + ".weight"] = (p.hidden,)
    shapes["llm.model.norm.weight"] = (p.hidden,)
    if p.llm == "qwen2":  # the Ovis2 releases store lm_head, tied (1B-4B) or not
        shapes["llm.lm_head.weight"] = (p.text_vocab, p.hidden)
    shapes |= _backbone_shapes(p)
    head_in = p.vis_width * p.hidden_stride**2
    head_out = p.visual_vocab - NUM_INDICATORS
    shapes |= {
        "visual_tokenizer.head.0.weight": (head_out, head_in),
        "visual_tokenizer.head.1.weight": (head_out,),
        "visual_tokenizer.head.1.bias": (head_out,),
        "vte.weight": (p.visual_vocab, p.hidden),
    }
    return shapes


def _backbone_shapes(p: Preset) -> dict[str, tuple[int, ...]]:
    w, num_patches = p.vis_width, (p.image_size // p.patch_size) ** 2
    shapes: dict[str, tuple[int, ...]] = {}
    if p.backbone == "aimv2":  # AIDC-AI's AIMv2 module names
        bb = "visual_tokenizer.backbone."
        shapes |= {
            bb + "preprocessor.patchifier.proj.weight": (w, 3, p.patch_size, p.patch_size),
            bb + "preprocessor.patchifier.proj.bias": (w,),
            bb + "preprocessor.patchifier.norm.weight": (w,),
            bb + "preprocessor.pos_embed": (1, num_patches, w),
        }
        for i in range(p.vis_layers):
            pre = f"{bb}trunk.blocks.{i}."
            shapes |= {
                pre + "attn.qkv.weight": (3 * w, w), pre + "attn.proj.weight": (w, w),
                pre + "norm_1.weight": (w,), pre + "norm_2.weight": (w,),
                pre + "mlp.fc1.weight": (p.vis_intermediate, w),
                pre + "mlp.fc2.weight": (w, p.vis_intermediate),
                pre + "mlp.fc3.weight": (p.vis_intermediate, w),
            }
        shapes[bb + "trunk.post_trunk_norm.weight"] = (w,)
        return shapes
    vm = "visual_tokenizer.backbone.vision_model."
    shapes |= {
        vm + "embeddings.patch_embedding.weight": (w, 3, p.patch_size, p.patch_size),
        vm + "embeddings.patch_embedding.bias": (w,),
        vm + "embeddings.position_embedding.weight": (num_patches, w),
    }
    for i in range(p.vis_layers):
        pre = f"{vm}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[pre + f"self_attn.{proj}.weight"] = (w, w)
            shapes[pre + f"self_attn.{proj}.bias"] = (w,)
        shapes |= {
            pre + "layer_norm1.weight": (w,), pre + "layer_norm1.bias": (w,),
            pre + "layer_norm2.weight": (w,), pre + "layer_norm2.bias": (w,),
            pre + "mlp.fc1.weight": (p.vis_intermediate, w), pre + "mlp.fc1.bias": (p.vis_intermediate,),
            pre + "mlp.fc2.weight": (w, p.vis_intermediate), pre + "mlp.fc2.bias": (w,),
        }
    # The real backbone also carries SigLIP's post-LayerNorm and attention-pooling head; Ovis
    # uses neither (features are hidden_states[-1]), but loaders must cope with them.
    shapes |= {
        vm + "post_layernorm.weight": (w,), vm + "post_layernorm.bias": (w,),
        vm + "head.probe": (1, 1, w),
        vm + "head.attention.in_proj_weight": (3 * w, w), vm + "head.attention.in_proj_bias": (3 * w,),
        vm + "head.attention.out_proj.weight": (w, w), vm + "head.attention.out_proj.bias": (w,),
        vm + "head.layernorm.weight": (w,), vm + "head.layernorm.bias": (w,),
        vm + "head.mlp.fc1.weight": (p.vis_intermediate, w), vm + "head.mlp.fc1.bias": (p.vis_intermediate,),
        vm + "head.mlp.fc2.weight": (w, p.vis_intermediate), vm + "head.mlp.fc2.bias": (w,),
    }
    return shapes


def _random_tensor(p: Preset, name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random weights scaled so activations stay O(1) and logits are well separated."""
    t = torch.randn(shape, generator=gen)
    if name.endswith("weight") and ("norm" in name or name == "visual_tokenizer.head.1.weight"):
        # Gemma's RMSNorm multiplies by (1 + weight); Llama's RMSNorm and the LayerNorms by weight.
        return 0.1 * t if name.startswith("llm.") and p.llm == "gemma2" else 1.0 + 0.1 * t
    if name.endswith("bias"):
        return 0.1 * t
    if name == "llm.model.embed_tokens.weight" or name == "vte.weight":
        return t / math.sqrt(shape[1])  # Gemma multiplies embeddings by sqrt(hidden)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return t / math.sqrt(fan_in)


def write_ovis_checkpoint(out_dir: str | os.PathLike, preset: str | Preset = "tiny", seed: int = 0,
                          **overrides) -> Path:
    """Write a complete checkpoint directory and return its path."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    p = replace(p, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, p.dtype)

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in _tensor_shapes(p).items():
        weight = _random_tensor(p, name, shape, gen)
        layer = name.removesuffix(".weight")
        if p.gptq_group_size is not None and layer.startswith("llm.model.layers.") \
                and layer.endswith(GPTQ_LAYERS):
            tensors |= {f"{layer}.{k}": v for k, v in gptq_pack(weight, p.gptq_group_size).items()}
        else:
            tensors[name] = weight.to(dtype).contiguous()
    if p.tie_word_embeddings and "llm.lm_head.weight" in tensors:  # stored, and equal
        tensors["llm.lm_head.weight"] = tensors["llm.model.embed_tokens.weight"].clone()
    if p.gptq_group_size is None:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    else:  # AutoGPTQ's file name and metadata
        save_file(tensors, out / f"gptq_model-4bit-{p.gptq_group_size}g.safetensors", metadata={
            "format": "pt", "gptq_bits": "4", "gptq_group_size": str(p.gptq_group_size),
            "gptq_desc_act": "False", "gptq_damp_percent": "0.1", "gptq_is_marlin_format": "False"})
        # AutoGPTQ writes it in its own key order, without a final newline.
        (out / "quantize_config.json").write_text(json.dumps(gptq_config(p), indent=2))

    def write_json(name: str, data: dict) -> None:
        (out / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    write_json("config.json", ovis_config(p))
    write_json("generation_config.json", generation_config(p))
    write_json("preprocessor_config.json", preprocessor_config(p))
    tokenizer = _tokenizer(p)
    tokenizer.save_pretrained(out)
    if p.tokenizer == "bytelevel-image":
        (out / "chat_template.jinja").write_text(GEMMA_CHAT_TEMPLATE)
    else:
        from .tokenizer_mirrors import write_special_tokens_map

        write_special_tokens_map(tokenizer, out)
    return out

