"""Config classes for the Ovis2.5 / Ovis2.6 checkpoints, so they load without remote code.

The published checkpoints name `configuration_ovis2_5.py` in their `auto_map`; vLLM ships no
config class for them and asks for `--trust-remote-code`, which runs that file. These classes
read the same config.json keys with the same defaults (AIDC-AI/Ovis2.5-9B's
configuration_ovis2_5.py, docs/reference.md) and are registered with transformers' AutoConfig by
the plugin (engine/__init__.py); transformers then prefers them to the remote file unless the
user passes --trust-remote-code.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig, Qwen3Config
from transformers.models.auto.configuration_auto import CONFIG_MAPPING


class Siglip2NavitConfig(PretrainedConfig):
    """The NaViT vision tower (SigLIP2 at native resolution); defaults as the reference's."""

    model_type = "siglip2_navit"

    def __init__(self, hidden_size: int = 1024, intermediate_size: int = 4096,
                 num_hidden_layers: int = 24, num_attention_heads: int = 16, num_channels: int = 3,
                 num_patches: int = -1, image_size: int = 512, patch_size: int = 16,
                 hidden_act: str = "gelu_pytorch_tanh", layer_norm_eps: float = 1e-6,
                 attention_dropout: float = 0.0, hidden_stride: int = 2, window_size: int = 112,
                 fullatt_block_indexes: list | str | None = None, temporal_patch_size: int = 1,
                 preserve_original_pe: bool = True, use_rope: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.num_patches = num_patches
        self.patch_size = patch_size
        self.image_size = image_size
        self.hidden_act = hidden_act
        self.attention_dropout = attention_dropout
        self.layer_norm_eps = layer_norm_eps
        self.hidden_stride = hidden_stride
        self.window_size = window_size
        self.fullatt_block_indexes = fullatt_block_indexes
        self.temporal_patch_size = temporal_patch_size
        self.preserve_original_pe = preserve_original_pe
        self.use_rope = use_rope


def _llm_config(llm_config: PretrainedConfig | dict | None) -> PretrainedConfig | None:
    """The LLM's config: Qwen3 (Ovis2.5, Ovis2.6 dense), or the class its model_type names
    (qwen3_moe for Ovis2.6-30B-A3B)."""
    if not isinstance(llm_config, dict):
        return llm_config
    model_type = llm_config.get("model_type", "qwen3")
    config_class = CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else Qwen3Config
    return config_class(**{k: v for k, v in llm_config.items() if k != "model_type"})


class Ovis2_5Config(PretrainedConfig):
    """config.json of Ovis2.5 and Ovis2.6: `llm_config`, `vit_config`, `visual_vocab_size`,
    `hidden_size` (the LLM's)."""

    model_type = "ovis2_5"
    sub_configs = {"llm_config": AutoConfig, "vit_config": Siglip2NavitConfig}

    def __init__(self, llm_config: PretrainedConfig | dict | None = None,
                 vit_config: Siglip2NavitConfig | dict | None = None, visual_vocab_size: int = 65536,
                 hidden_size: int | None = None, **kwargs: Any):
        # Set before PretrainedConfig.__init__, which validates through get_text_config().
        self.llm_config = _llm_config(llm_config)
        if isinstance(vit_config, dict):
            vit_config = Siglip2NavitConfig(**vit_config)
        self.vit_config = vit_config
        self.visual_vocab_size = visual_vocab_size
        self.hidden_size = hidden_size
        super().__init__(**kwargs)

    @property
    def text_config(self) -> PretrainedConfig:
        # vLLM's built-in Ovis2_5 (which serves checkpoints we hand back to it) reads this name.
        return self.llm_config

    def get_text_config(self, *args, **kwargs) -> PretrainedConfig:
        return self.llm_config if self.llm_config is not None else self


class Ovis2_6Config(Ovis2_5Config):
    """Ovis2.6 dense: its model_type is inferred (no checkpoint was published when this was
    written); the layout is Ovis2.5's."""

    model_type = "ovis2_6"

    def __init__(self, **kwargs: Any):  # transformers replaces an inherited __init__
        super().__init__(**kwargs)


class Ovis2_6MoeConfig(Ovis2_5Config):
    """Ovis2.6-30B-A3B: model_type `ovis2_6_moe` (read from downstream code, not the release's
    files); a Qwen3-MoE `llm_config`."""

    model_type = "ovis2_6_moe"

    def __init__(self, **kwargs: Any):  # transformers replaces an inherited __init__
        super().__init__(**kwargs)


OWN_CONFIGS = (Siglip2NavitConfig, Ovis2_5Config, Ovis2_6Config, Ovis2_6MoeConfig)


def register_configs() -> None:
    """Make AutoConfig build our classes for these model types (once per process)."""
    for config_class in OWN_CONFIGS:
        if config_class.model_type not in CONFIG_MAPPING:
            AutoConfig.register(config_class.model_type, config_class)
