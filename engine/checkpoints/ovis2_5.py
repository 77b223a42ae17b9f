"""Ovis2.5 / Ovis2.6 checkpoints with random weights, shaped like the published ones.

Mirrored key for key from AIDC-AI/Ovis2.5-9B's published files (config.json,
generation_config.json, preprocessor_config.json, tokenizer_config.json with its chat template,
special_tokens_map.json, added_tokens.json; read from a byte-identical copy of the Hugging Face
repository, docs/reference.md): the same top-level keys, `llm_config` (Qwen3, transformers 4.51)
and `vit_config` (siglip2_navit) dicts, tensor names (`llm.*`,
`visual_tokenizer.vit.vision_model.*`, `visual_tokenizer.head.{0,1}.*`, `vte.weight`) and a Qwen3
tokenizer of 151669 entries with the special tokens at their real ids and no `<image>` token.
At small widths: NaViT width 64, 2 layers, a 4x4 position table (image_size 64, patch 16); the
LLM hidden 128, 2 layers, head_dim 64; a visual vocabulary of 1000.

Presets:
  ovis2.5-9b      Qwen3-8B-shaped (untied lm_head): config.json as published
  ovis2.5-2b      Qwen3-1.7B-shaped (tied, no lm_head tensor); config.json inferred from the 9B's
                  with Qwen3-1.7B's llm_config (the 2B's own file was not found)
  ovis2.6-moe     Ovis2.6-30B-A3B-shaped: Qwen3-MoE LLM (8 experts, 2 per token at this size),
                  model_type ovis2_6_moe, no post_layernorm tensors (as reported for the release);
                  inferred: no published file was found
  ovis2.6-2b      Ovis2.6 dense ("Ovis2_6ForCausalLM"), inferred as Ovis2.5-2B with that
                  architecture and model_type ovis2_6 (unpublished)
  ovis2.5-wide    Ovis2.5-9B's real widths (NaViT 1152, Qwen3-8B 4096) with one layer each, bf16,
                  for benchmarks
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

# AIDC-AI/Ovis2.5-9B's chat template (tokenizer_config.json and chat_template.json).
OVIS2_5_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n'}}{%- if message.role "
    "== 'system' or message.role == 'user' %}{%- if message.content is string %}{{- message.content "
    "| replace('<image>', '') | replace('<video>', '') }}{%- else %}{%- for item in message.content "
    "%}{%- if item.type == 'text' and 'text' in item %}{{- item.text | replace('<image>', '') | "
    "replace('<video>', '') }}{%- elif item.type == 'image' %}{{- '<image>'}}{%- elif item.type == "
    "'video' %}{{- '<video>'}}{%- else %}{{- raise_exception('Invalid content type. Supported types "
    "for system and user are text, image, video.')}}{%- endif %}{%- if not loop.last %}{{- '\\n'}}"
    "{%- endif %}{%- endfor %}{%- endif %}{%- elif message.role == 'assistant' %}{%- set content = "
    "'' %}{%- if message.content is string %}{%- set content = message.content | replace('<image>', "
    "'') | replace('<video>', '') %}{%- else %}{%- for item in message.content %}{%- if item.type == "
    "'text' and 'text' in item %}{%- set content = content ~ (item.text | replace('<image>', '') | "
    "replace('<video>', '')) %}{%- else %}{{- raise_exception('Invalid content type. Supported type "
    "for assistant is text.')}}{%- endif %}{%- endfor %}{%- endif %}{%- set content = "
    "content.split('</think>')[-1].lstrip('\\n') %}{{- content }}{%- else %}{{- raise_exception("
    "'Invalid role. Supported roles are system, user, assistant.')}}{%- endif %}{{- '<|im_end|>\\n'}}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if "
    "enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


@dataclass(frozen=True)
class Ovis25Preset:
    architecture: str
    model_type: str
    name_or_path: str
    hidden: int = 128
    intermediate: int = 256
    layers: int = 2
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 64
    tie_word_embeddings: bool | None = None  # None: the key absent (Qwen3-8B's config)
    experts: int = 0  # Qwen3-MoE: experts per layer (0: dense)
    experts_per_token: int = 0
    moe_intermediate: int = 0
    vis_width: int = 64
    vis_intermediate: int = 128
    vis_layers: int = 2
    vis_heads: int = 2
    image_size: int = 64
    patch_size: int = 16
    hidden_stride: int = 2
    visual_vocab: int = 1000
    post_layernorm: bool = True
    dtype: str = "float32"
    llm: str = "qwen3"  # "qwen2": a combination no release has (tests of the built-in fallback)


_9B = Ovis25Preset("Ovis2_5", "ovis2_5", "Qwen/Qwen3-8B")
_2B = replace(_9B, name_or_path="Qwen/Qwen3-1.7B", tie_word_embeddings=True)
OVIS2_5_PRESETS = {
    "ovis2.5-9b": _9B,
    "ovis2.5-2b": _2B,
    "ovis2.6-2b": replace(_2B, architecture="Ovis2_6ForCausalLM", model_type="ovis2_6"),
    "ovis2.6-moe": replace(_9B, architecture="Ovis2_6_MoeForCausalLM", model_type="ovis2_6_moe",
                           name_or_path="Qwen/Qwen3-30B-A3B", tie_word_embeddings=False, experts=8,
                           experts_per_token=2, moe_intermediate=64, post_layernorm=False),
    "ovis2.5-wide": replace(_9B, hidden=4096, intermediate=12288, layers=1, heads=32, kv_heads=8,
                            head_dim=128, vis_width=1152, vis_intermediate=4304, vis_layers=1,
                            vis_heads=16, image_size=512, visual_vocab=65536, dtype="bfloat16"),
}

TEXT_VOCAB = 151936


def llm_config(p: Ovis25Preset) -> dict:
    model_type = "qwen3_moe" if p.experts else p.llm
    config = {
        "_attn_implementation_autoset": True, "_name_or_path": p.name_or_path,
        "architectures": [{"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                           "qwen2": "Qwen2ForCausalLM"}[model_type]],
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "head_dim": p.head_dim, "hidden_act": "silu",
        "hidden_size": p.hidden, "initializer_range": 0.02, "intermediate_size": p.intermediate,
        "max_position_embeddings": 40960, "max_window_layers": p.layers,
        "model_type": model_type, "num_attention_heads": p.heads,
        "num_hidden_layers": p.layers, "num_key_value_heads": p.kv_heads, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
        "torch_dtype": "float32", "use_cache": True, "use_sliding_window": False,
        "vocab_size": TEXT_VOCAB,
    }
    if p.tie_word_embeddings is not None:
        config["tie_word_embeddings"] = p.tie_word_embeddings
    if p.experts:  # Qwen3-30B-A3B's MoE keys
        config |= {"decoder_sparse_step": 1, "mlp_only_layers": [], "moe_intermediate_size": p.moe_intermediate,
                   "norm_topk_prob": True, "num_experts": p.experts,
                   "num_experts_per_tok": p.experts_per_token, "output_router_logits": False,
                   "router_aux_loss_coef": 0.001}
    return dict(sorted(config.items()))


def ovis2_5_config(p: Ovis25Preset) -> dict:
    """config.json, in the published file's key order."""
    return {
        "architectures": [p.architecture],
        "auto_map": {"AutoConfig": "configuration_ovis2_5.Ovis2_5_Config",
                     "AutoModelForCausalLM": "modeling_ovis2_5.Ovis2_5"},
        "conversation_formatter_class": "Qwen3ConversationFormatter",
        "hidden_size": p.hidden, "vocab_size": TEXT_VOCAB, "num_attention_heads": p.heads,
        "max_position_embeddings": 40960,
        "llm_config": llm_config(p),
        "model_type": p.model_type, "torch_dtype": "bfloat16", "transformers_version": "4.51.3",
        "use_cache": True, "visual_vocab_size": p.visual_vocab,
        "vit_config": {
            "_attn_implementation_autoset": True, "_name_or_path": "google/siglip2-so400m-patch16-512",
            "attention_dropout": 0.0, "fullatt_block_indexes": None, "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": p.vis_width, "hidden_stride": p.hidden_stride, "image_size": p.image_size,
            "intermediate_size": p.vis_intermediate, "layer_norm_eps": 1e-06,
            "model_type": "siglip2_navit", "num_attention_heads": p.vis_heads, "num_channels": 3,
            "num_hidden_layers": p.vis_layers, "num_patches": -1, "patch_size": p.patch_size,
            "preserve_original_pe": True, "temporal_patch_size": 1, "torch_dtype": "float32",
            "use_rope": True, "window_size": 112,
        },
    }


GENERATION_CONFIG = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                     "multimodal_max_length": 8192, "pad_token_id": 151643, "repetition_penalty": 1.05,
                     "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "4.51.3"}
PREPROCESSOR_CONFIG = {"do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
                       "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
                       "image_std": [0.5, 0.5, 0.5], "processor_class": "SiglipProcessor",
                       "resample": 2, "rescale_factor": 0.00392156862745098,
                       "size": {"height": 512, "width": 512}}


def tensor_shapes(p: Ovis25Preset) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"llm.model.embed_tokens.weight": (TEXT_VOCAB, p.hidden),
                                          "llm.model.norm.weight": (p.hidden,)}
    if not p.tie_word_embeddings:
        shapes["llm.lm_head.weight"] = (TEXT_VOCAB, p.hidden)
    q, kv = p.heads * p.head_dim, p.kv_heads * p.head_dim
    for i in range(p.layers):
        layer = f"llm.model.layers.{i}"
        shapes |= {f"{layer}.input_layernorm.weight": (p.hidden,),
                   f"{layer}.post_attention_layernorm.weight": (p.hidden,),
                   f"{layer}.self_attn.q_proj.weight": (q, p.hidden),
                   f"{layer}.self_attn.k_proj.weight": (kv, p.hidden),
                   f"{layer}.self_attn.v_proj.weight": (kv, p.hidden),
                   f"{layer}.self_attn.o_proj.weight": (p.hidden, q)}
        if p.llm == "qwen2":  # q/k/v biases, no q/k norms
            shapes |= {f"{layer}.self_attn.q_proj.bias": (q,), f"{layer}.self_attn.k_proj.bias": (kv,),
                       f"{layer}.self_attn.v_proj.bias": (kv,)}
        else:
            shapes |= {f"{layer}.self_attn.q_norm.weight": (p.head_dim,),
                       f"{layer}.self_attn.k_norm.weight": (p.head_dim,)}
        mlps = [(f"{layer}.mlp", p.intermediate)] if not p.experts else \
            [(f"{layer}.mlp.experts.{e}", p.moe_intermediate) for e in range(p.experts)]
        if p.experts:
            shapes[f"{layer}.mlp.gate.weight"] = (p.experts, p.hidden)
        for mlp, width in mlps:
            shapes |= {f"{mlp}.gate_proj.weight": (width, p.hidden), f"{mlp}.up_proj.weight": (width, p.hidden),
                       f"{mlp}.down_proj.weight": (p.hidden, width)}
    vit, d = "visual_tokenizer.vit.vision_model", p.vis_width
    shapes |= {f"{vit}.embeddings.patch_embedding.weight": (d, 3, p.patch_size, p.patch_size),
               f"{vit}.embeddings.patch_embedding.bias": (d,),
               f"{vit}.embeddings.position_embedding.weight": ((p.image_size // p.patch_size) ** 2, d)}
    for i in range(p.vis_layers):
        layer = f"{vit}.encoder.layers.{i}"
        for norm in ("layer_norm1", "layer_norm2"):
            shapes |= {f"{layer}.{norm}.weight": (d,), f"{layer}.{norm}.bias": (d,)}
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {f"{layer}.self_attn.{proj}.weight": (d, d), f"{layer}.self_attn.{proj}.bias": (d,)}
        shapes |= {f"{layer}.mlp.fc1.weight": (p.vis_intermediate, d), f"{layer}.mlp.fc1.bias": (p.vis_intermediate,),
                   f"{layer}.mlp.fc2.weight": (d, p.vis_intermediate), f"{layer}.mlp.fc2.bias": (d,)}
    if p.post_layernorm:
        shapes |= {f"{vit}.post_layernorm.weight": (d,), f"{vit}.post_layernorm.bias": (d,)}
    head_in, head_out = d * p.hidden_stride**2, p.visual_vocab - 4
    shapes |= {"visual_tokenizer.head.0.weight": (head_out, head_in),
               "visual_tokenizer.head.1.weight": (head_out,), "visual_tokenizer.head.1.bias": (head_out,),
               "vte.weight": (p.visual_vocab, p.hidden)}
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random weights scaled so activations stay O(1) and logits are well separated."""
    t = torch.randn(shape, generator=gen)
    if name.endswith("weight") and ("norm" in name or name == "visual_tokenizer.head.1.weight"):
        return 1.0 + 0.1 * t
    if name.endswith("bias"):
        return 0.1 * t
    if name in ("llm.model.embed_tokens.weight", "vte.weight"):
        return t / math.sqrt(shape[1])
    if name.endswith("position_embedding.weight"):
        return 0.5 * t
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return t / math.sqrt(fan_in)


def write_ovis2_5_checkpoint(out_dir: str | os.PathLike, preset: str | Ovis25Preset, seed: int = 0,
                             **overrides) -> Path:
    """Write a complete checkpoint directory and return its path."""
    from .tokenizer_mirrors import build_qwen3_tokenizer, write_special_tokens_map

    p = OVIS2_5_PRESETS[preset] if isinstance(preset, str) else preset
    p = replace(p, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, p.dtype)
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: _random_tensor(name, shape, gen).to(dtype).contiguous()
               for name, shape in tensor_shapes(p).items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(ovis2_5_config(p), indent=2) + "\n")
    for name, data in (("generation_config.json", GENERATION_CONFIG),
                       ("preprocessor_config.json", PREPROCESSOR_CONFIG),
                       ("chat_template.json", {"chat_template": OVIS2_5_CHAT_TEMPLATE})):
        (out / name).write_text(json.dumps(data, indent=2) + "\n")
    tokenizer = build_qwen3_tokenizer(OVIS2_5_CHAT_TEMPLATE)
    tokenizer.save_pretrained(out)
    write_special_tokens_map(tokenizer, out)
    return out
