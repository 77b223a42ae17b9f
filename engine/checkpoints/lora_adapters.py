"""LoRA adapters for an Ovis checkpoint, written as ms-swift writes them, and their merge.

ms-swift's usual recipe for Ovis (`--train_type lora --target_modules all-linear`, vision tower
and aligner frozen) trains LoRA on the LLM's linear layers only and saves a PEFT adapter:
- adapter_config.json: PEFT's LoraConfig, r 8 and lora_alpha 32 by default, `target_modules` a
  regex anchored at the LLM (`^(llm(?=\\.).*\\.(down_proj|...|v_proj))$`);
- adapter_model.safetensors: `base_model.model.<module>.lora_A.weight` [r, in] and
  `.lora_B.weight` [out, r] per targeted module.
With the vision tower unfrozen (`--freeze_vit false`) its linear layers are targeted too.

`merge_lora_adapter` writes the checkpoint the adapter stands for: W + (alpha / r) * B @ A on every
targeted weight, the rest copied. That is what PEFT's `merge_and_unload` computes, so it is the
oracle for serving the adapter, and itself a merged fine-tune of the same architecture.

Tests and benchmarks only: served adapters come from training.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LLM_LINEAR_LAYERS = ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")
# SigLIP's linear layers in the Ovis1.6 backbone (`--freeze_vit false`).
VISION_LINEAR_LAYERS = ("fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj")
LLM_PREFIX = "llm"
VISION_PREFIX = "visual_tokenizer.backbone"


def target_regex(prefixes_and_layers: list[tuple[str, tuple[str, ...]]]) -> str:
    """ms-swift's target_modules regex (get_multimodal_target_regex) for these towers."""
    parts = [rf"{re.escape(prefix)}(?=\.).*\.({'|'.join(layers)})"
             for prefix, layers in prefixes_and_layers]
    return rf"^({'|'.join(parts)})$"


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        weights |= load_file(file)
    return weights


def write_lora_adapter(base: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0,
                       rank: int = 8, alpha: int = 32, layers: tuple[str, ...] = LLM_LINEAR_LAYERS,
                       vision: bool = False, scale: float = 1.0) -> Path:
    """A PEFT LoRA adapter for the checkpoint at `base`, with random A and B (B is zero after
    training starts, so both are random here for the adapter to change something).
    `vision`: the SigLIP backbone's linear layers too, as `--freeze_vit false` trains them."""
    base, out = Path(base), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    towers = [(LLM_PREFIX, layers)] + ([(VISION_PREFIX, VISION_LINEAR_LAYERS)] if vision else [])
    tensors = {}
    for name, weight in sorted(_weights(base).items()):
        module = name.removesuffix(".weight")
        leaf = module.rsplit(".", 1)[-1]
        if not any(module.startswith(prefix + ".") and leaf in tower_layers
                   for prefix, tower_layers in towers) or weight.dim() != 2:
            continue
        out_features, in_features = weight.shape
        # Sized so that (alpha / r) * B @ A x is about `scale` times W x.
        a = torch.randn(rank, in_features, generator=gen) / in_features**0.5
        b = torch.randn(out_features, rank, generator=gen) / rank**0.5 * scale * rank / alpha
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(weight.dtype).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(weight.dtype).contiguous()
    if not tensors:
        raise ValueError(f"no module of {base} matches {layers}")
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {  # PEFT 0.14's LoraConfig as ms-swift saves it
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": str(base),
        "bias": "none", "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": alpha, "lora_bias": False, "lora_dropout": 0.05, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": [], "peft_type": "LORA", "r": rank,
        "rank_pattern": {}, "revision": None, "target_modules": target_regex(towers),
        "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def merge_lora_adapter(base: str | os.PathLike, adapter: str | os.PathLike,
                       out_dir: str | os.PathLike) -> Path:
    """The checkpoint `base` with `adapter` merged in (PEFT's merge_and_unload), computed in fp64
    and stored in the base's dtype; every other file copied."""
    base, adapter, out = Path(base), Path(adapter), Path(out_dir)
    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    lora = load_file(adapter / "adapter_model.safetensors")
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors"), dirs_exist_ok=True)
    for file in sorted(base.glob("*.safetensors")):
        weights = load_file(file)
        for name, weight in weights.items():
            key = "base_model.model." + name.removesuffix(".weight")
            if name.endswith(".weight") and key + ".lora_A.weight" in lora:
                a, b = lora[key + ".lora_A.weight"].double(), lora[key + ".lora_B.weight"].double()
                weights[name] = (weight.double() + scaling * (b @ a)).to(weight.dtype).contiguous()
        save_file(weights, out / file.name, metadata={"format": "pt"})
    return out
