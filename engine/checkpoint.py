"""Ovis1.6-Gemma2-shaped checkpoints with random weights, for tests and benchmarks.

Model hubs are out of reach on our CI machines, so every test builds its own checkpoint.
What is written mirrors AIDC-AI/Ovis1.6-Gemma2-9B: the same config.json schema
(`model_type: ovis`, `llm_config`, `visual_tokenizer_config` with a SigLIP `backbone_config`),
the same tensor names (`llm.model.*`, `visual_tokenizer.backbone.vision_model.*`,
`visual_tokenizer.head.{0,1}.*`, `vte.weight`), a SigLIP `preprocessor_config.json`, and a
byte-level BPE tokenizer with Gemma's special-token layout (`<pad>` 0, `<eos>` 1, `<bos>` 2,
`<unused0>` 7, `<start_of_turn>` 106, `<end_of_turn>` 107) and the reference chat template.

    python -m engine.checkpoint OUT_DIR --preset tiny --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from .chat_template import CHAT_TEMPLATE
from .placeholders import IMAGE_PAD_ID, IMAGE_TOKEN, NUM_INDICATORS

# Gemma's special-token layout; the ids matter (prompts, stop tokens, the image pad token).
GEMMA_SPECIALS = (
    ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<2mass>", "[@BOS@]"]
    + [f"<unused{i}>" for i in range(99)]
    + ["<start_of_turn>", "<end_of_turn>"]
)
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
START_OF_TURN_ID, END_OF_TURN_ID = 106, 107

# Text the BPE merges are learned from: enough for short English prompts to take few tokens.
_CORPUS = """\
Describe the image in detail. What is shown in this picture? How many objects are there?
The quick brown fox jumps over the lazy dog. A photo of a cat sitting on a red sofa.
Read the text in the image and answer the question. Which color is the car on the left?
Compare the two images and list the differences. Summarize the chart and its main trend.
There is a small house near the river, with trees and mountains in the background.
Please answer in one short sentence. The answer is yes. The answer is no. Thank you.
"""


@dataclass(frozen=True)
class Preset:
    text_vocab: int  # BPE vocabulary incl. specials; the LLM vocab equals it
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    sliding_window: int
    vis_width: int
    vis_intermediate: int
    vis_layers: int
    vis_heads: int
    image_size: int
    patch_size: int
    hidden_stride: int
    visual_vocab: int
    dtype: str
    multimodal_max_length: int = 8192


PRESETS = {
    # Fast tests: side 76 / patch 14 gives a 5x5 patch grid (odd, so the hidden_stride padding
    # to 6x6 runs), 9 visual tokens per crop; head_dim 64 because vLLM's CPU attention rejects 16.
    "tiny": Preset(
        text_vocab=512, hidden=128, intermediate=256, layers=2, heads=2, kv_heads=1,
        head_dim=64, sliding_window=4096, vis_width=64, vis_intermediate=128, vis_layers=2,
        vis_heads=2, image_size=76, patch_size=14, hidden_stride=2, visual_vocab=1000,
        dtype="float32",
    ),
    # Real widths (Ovis1.6-Gemma2-9B) with one layer each, for benchmarks.
    "wide": Preset(
        text_vocab=512, hidden=3584, intermediate=14336, layers=1, heads=16, kv_heads=8,
        head_dim=256, sliding_window=4096, vis_width=1152, vis_intermediate=4304, vis_layers=1,
        vis_heads=16, image_size=384, patch_size=14, hidden_stride=2, visual_vocab=65536,
        dtype="bfloat16",
    ),
}


def build_tokenizer(vocab_size: int):
    """Byte-level BPE with Gemma's special tokens at Gemma's ids.

    `<image>` is an added (non-special) token: the tokenizer then splits text around it before
    BPE, exactly like the reference, which tokenizes the chunks between `<image>` markers
    separately. It never reaches the model: the processor replaces it with placeholders.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # the last id is `<image>`
        special_tokens=GEMMA_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.add_tokens([IMAGE_TOKEN])
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.add_bos_token = False  # the chat template writes `<bos>` itself
    assert fast.convert_tokens_to_ids("<unused0>") == IMAGE_PAD_ID
    assert fast.convert_tokens_to_ids("<end_of_turn>") == END_OF_TURN_ID
    return fast


def ovis_config(p: Preset) -> dict:
    llm = {
        "model_type": "gemma2",
        "architectures": ["Gemma2ForCausalLM"],
        "vocab_size": p.text_vocab,
        "hidden_size": p.hidden,
        "intermediate_size": p.intermediate,
        "num_hidden_layers": p.layers,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads,
        "head_dim": p.head_dim,
        "query_pre_attn_scalar": p.head_dim,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "sliding_window": p.sliding_window,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
        "cache_implementation": "hybrid",
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "tie_word_embeddings": True,
        "torch_dtype": p.dtype,
    }
    backbone = {
        "model_type": "siglip_vision_model",
        "hidden_size": p.vis_width,
        "intermediate_size": p.vis_intermediate,
        "num_hidden_layers": p.vis_layers,
        "num_attention_heads": p.vis_heads,
        "num_channels": 3,
        "image_size": p.image_size,
        "patch_size": p.patch_size,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "attention_dropout": 0.0,
        "torch_dtype": p.dtype,
    }
    return {
        "architectures": ["Ovis"],
        "model_type": "ovis",
        "conversation_formatter_class": "GemmaConversationFormatter",
        "disable_tie_weight": False,
        "hidden_size": p.hidden,
        "llm_attn_implementation": "eager",
        "multimodal_max_length": p.multimodal_max_length,
        "torch_dtype": p.dtype,
        "use_cache": True,
        "llm_config": llm,
        "visual_tokenizer_config": {
            "model_type": "siglip_visual_tokenizer",
            "backbone_config": backbone,
            "backbone_kwargs": {},
            "depths": None,
            "drop_cls_token": False,
            "hidden_stride": p.hidden_stride,
            "tau": 1.0,
            "tokenize_function": "softmax",
            "use_indicators": False,
            "vocab_size": p.visual_vocab,
            "torch_dtype": p.dtype,
        },
    }


def _tensor_shapes(p: Preset) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, named as in the real one."""
    shapes: dict[str, tuple[int, ...]] = {"llm.model.embed_tokens.weight": (p.text_vocab, p.hidden)}
    q, kv = p.heads * p.head_dim, p.kv_heads * p.head_dim
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
        for norm in ("input_layernorm", "post_attention_layernorm",
                     "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            shapes[pre + norm + ".weight"] = (p.hidden,)
    shapes["llm.model.norm.weight"] = (p.hidden,)

    w = p.vis_width
    vm = "visual_tokenizer.backbone.vision_model."
    num_patches = (p.image_size // p.patch_size) ** 2
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
    head_in = w * p.hidden_stride**2
    head_out = p.visual_vocab - NUM_INDICATORS
    shapes |= {
        "visual_tokenizer.head.0.weight": (head_out, head_in),
        "visual_tokenizer.head.1.weight": (head_out,),
        "visual_tokenizer.head.1.bias": (head_out,),
        "vte.weight": (p.visual_vocab, p.hidden),
    }
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random weights scaled so activations stay O(1) and logits are well separated."""
    t = torch.randn(shape, generator=gen)
    if name.endswith("weight") and ("norm" in name or name == "visual_tokenizer.head.1.weight"):
        # Gemma's RMSNorm multiplies by (1 + weight), the LayerNorms by weight.
        return 0.1 * t if name.startswith("llm.") else 1.0 + 0.1 * t
    if name.endswith("bias"):
        return 0.1 * t
    if name == "llm.model.embed_tokens.weight" or name == "vte.weight":
        return t / math.sqrt(shape[1])  # Gemma multiplies embeddings by sqrt(hidden)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return t / math.sqrt(fan_in)


def write_checkpoint(out_dir: str | os.PathLike, preset: str | Preset = "tiny", seed: int = 0,
                     **overrides) -> Path:
    """Write a complete checkpoint directory and return its path."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    p = replace(p, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, p.dtype)

    gen = torch.Generator().manual_seed(seed)
    tensors = {name: _random_tensor(name, shape, gen).to(dtype).contiguous()
               for name, shape in _tensor_shapes(p).items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})

    (out / "config.json").write_text(json.dumps(ovis_config(p), indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": BOS_ID, "pad_token_id": PAD_ID, "eos_token_id": [EOS_ID, END_OF_TURN_ID],
    }, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True, "size": {"height": p.image_size, "width": p.image_size},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    }, indent=2))
    build_tokenizer(p.text_vocab).save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


def default_model_dir() -> Path:
    """The embedded default model: a `tiny` checkpoint generated on first use and cached."""
    cache = Path(os.environ.get("OVIS_CACHE_DIR", Path.home() / ".cache" / "ovis-vllm"))
    path = cache / "ovis1.6-gemma2-tiny-seed0"
    if not (path / "model.safetensors").exists():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        write_checkpoint(tmp, "tiny", seed=0)
        try:
            tmp.rename(path)
        except OSError:  # another process won the race; its copy is identical
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="weight dtype (default: the preset's)")
    args = ap.parse_args(argv)
    overrides = {"dtype": args.dtype} if args.dtype else {}
    path = write_checkpoint(args.out_dir, args.preset, args.seed, **overrides)
    print(f"wrote {args.preset} Ovis checkpoint (seed {args.seed}) to {path}")


if __name__ == "__main__":
    main()
