"""What the model class of every Ovis generation does alike (engine/model.py: Ovis1.6/2;
engine/model_ovis2_5.py: Ovis2.5/2.6): the hand-over of checkpoints without a member row to
vLLM's built-in class, LoRA on the LLM only, the LLM forward, weight loading with the visual
vocabulary packed for the CPU afterwards.

A subclass sets `builtin` (vLLM's class for the same architecture), `tower` (the vision tower's
module name) and builds `llm`, `visual_tokenizer` (with `head`), `vte` and `visual_vocab`."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.models.interfaces import SupportsLoRA, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import AutoWeightsLoader
from vllm.sequence import IntermediateTensors

from .members import builtin_fallback_message, member_of

logger = init_logger(__name__)


def check_llm_only_lora(module_names) -> None:
    """LoRA is applied to the LLM only (as in vLLM), so an adapter of anything else is refused
    rather than half served."""
    visual = sorted(name for name in module_names if not name.startswith("llm."))
    if visual:
        shown = ", ".join(visual[:6]) + (f" and {len(visual) - 6} more" if len(visual) > 6 else "")
        raise ValueError(
            f"this LoRA adapter also adapts {len(visual)} module(s) outside the LLM ({shown}); "
            "only the LLM's linear layers take LoRA here (as in vLLM), so it would be served "
            "without them. Train with the vision tower and aligner frozen (ms-swift's default "
            "--freeze_vit true --freeze_aligner true), or merge the adapter into the checkpoint "
            "and serve that")


class OvisModelBase(nn.Module, SupportsMultiModal, SupportsPP, SupportsLoRA):
    # LoRA on the LLM's linear layers (Gemma2, Llama, Qwen2 and Qwen3 fuse the same ones); vLLM
    # applies none to the visual tokenizer, so adapters of it are refused (check_lora_modules).
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                              "gate_up_proj": ["gate_proj", "up_proj"]}
    builtin: type          # vLLM's class for a checkpoint without a member row
    tower: str             # the vision tower's module under visual_tokenizer
    unused_weights: tuple[str, ...] = ()  # checkpoint tensors the reference never uses

    def __new__(cls, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        if member_of(config) is None:
            if vllm_config.lora_config is not None:  # vLLM's own message would name our class
                raise ValueError(builtin_fallback_message(config) + f" vLLM's built-in "
                                 f"{cls.builtin.__name__} has no LoRA support: serve this checkpoint "
                                 "without --enable-lora.")
            logger.warning(builtin_fallback_message(config))
            return cls.builtin(vllm_config=vllm_config, prefix=prefix)
        return super().__new__(cls)

    def get_mm_mapping(self) -> MultiModelKeys:
        return MultiModelKeys.from_string_field(language_model="llm", connector="visual_tokenizer.head",
                                                tower_model=f"visual_tokenizer.{self.tower}")

    def check_lora_modules(self, module_names) -> None:
        """Called by engine/lora.py with the modules an adapter adapts."""
        check_llm_only_lora(module_names)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.llm(input_ids=input_ids, positions=positions,
                        intermediate_tensors=intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.llm.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        weights = ((n, t) for n, t in weights if not n.startswith(self.unused_weights))
        loaded = AutoWeightsLoader(self).load_weights(weights)
        self.visual_vocab.pack_for_cpu(self.visual_tokenizer.head, self.vte)
        if self.visual_vocab.tp_rank == 0:
            logger.info("%s visual embedding: %s", type(self).__name__, self.visual_embedding_paths())
        return loaded

    def visual_embedding_paths(self) -> str:
        """Which visual-embedding path and GEMMs this model runs, and why (logged at load)."""
        return self.visual_vocab.paths(self.visual_tokenizer.head, self.vte)
