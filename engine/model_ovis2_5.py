"""Ovis2.5 and Ovis2.6 for vLLM, computing what the reference model computes (docs/reference.md,
"Ovis2.5 and Ovis2.6").

    patches -> SigLIP2-NaViT (vLLM's Siglip2NavitModel: 2D rotary, interpolated position table,
               last layer before post_layernorm), in hidden_stride x hidden_stride block order
            -> each block's s*s features concatenated -> head Linear
            -> [LayerNorm -> softmax -> (+4 zero columns) @ VTE]          (engine/visual_vocab.py)
    image   -> [VTE row V-4, t*h*w/s^2 visual rows, VTE row V-3]   (video: rows V-2 ... V-1)
    prompt  -> the LLM (Qwen3, or Qwen3-MoE for Ovis2.6-30B-A3B) with those rows over the image's
               placeholders, plain 1D positions

The head, LayerNorm, softmax and VTE are the same modules and kernel as Ovis1.6/2 (fused,
vocabulary-sharded under tensor parallelism); vLLM's built-in Ovis2_5 holds the whole head and VTE
on every rank and materializes [tokens, 65532] three times. A checkpoint of these architectures
with no member row (engine/members.py) is built as vLLM's built-in Ovis2_5, with one log line.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.models import ovis2_5 as builtin_ovis2_5
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.siglip2navit import Siglip2NavitModel
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY

from .cpu_support import cpu_cannot_serve
from .model_base import OvisModelBase
from .placeholders import IMAGE_TOKEN, VIDEO_TOKEN
from .processor_ovis2_5 import (
    NUM_INDICATORS,
    dummy_inputs_for,
    indicator_rows,
    processing_info_for,
    processor_for,
)
from .visual_vocab import VisualVocabulary


class NavitVisualTokenizer(nn.Module):
    """`visual_tokenizer`: NaViT (`vit`) + `head`: patches -> logits over this rank's slice of
    the visual vocabulary (pre-LayerNorm; the kernel applies it)."""

    def __init__(self, vit_config, visual_vocab: VisualVocabulary, prefix: str = ""):
        super().__init__()
        self.merged = vit_config.hidden_stride**2
        # Unquantized, as in every release; the reference reads hidden_states[-1], the last layer
        # before post_layernorm, which is what vLLM's module returns.
        self.vit = Siglip2NavitModel(vit_config, quant_config=None, prefix=maybe_prefix(prefix, "vit"))
        del self.vit.vision_model.post_layernorm  # never applied (Ovis2_5.unused_weights)
        self.head = visual_vocab.make_head(vit_config.hidden_size * self.merged)

    def forward(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor) -> torch.Tensor:
        features = self.vit(pixel_values, grid_thws)  # [patches, width], blocks of s*s patches
        return self.head[0](features.reshape(features.shape[0] // self.merged, -1))


@MULTIMODAL_REGISTRY.register_processor(processor_for, info=processing_info_for, dummy_inputs=dummy_inputs_for)
class Ovis2_5(OvisModelBase):
    builtin = builtin_ovis2_5.Ovis2_5
    tower = "vit"
    # Never applied by the reference (vLLM's module builds it; Ovis2.6-30B-A3B ships none).
    unused_weights = ("visual_tokenizer.vit.vision_model.post_layernorm.",)

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_TOKEN
        if modality.startswith("video"):
            return VIDEO_TOKEN
        raise ValueError(f"Ovis2.5 takes images and videos, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        if reason := cpu_cannot_serve(config):
            raise ValueError(reason)
        with self._mark_language_model(vllm_config):
            self.llm = init_vllm_registered_model(
                vllm_config=vllm_config.with_hf_config(config.get_text_config()),
                prefix=maybe_prefix(prefix, "llm"))
        self.llm.embedding_modules = {}  # no LoRA on embeddings / lm_head (engine/model.py says why)
        self.visual_vocab = VisualVocabulary(vllm_config, config.visual_vocab_size, NUM_INDICATORS)
        with self._mark_tower_model(vllm_config, {"image", "video"}):
            self.visual_tokenizer = NavitVisualTokenizer(
                config.vit_config, self.visual_vocab, prefix=maybe_prefix(prefix, "visual_tokenizer"))
            self.vte = self.visual_vocab.make_vte(config.hidden_size)
        self.make_empty_intermediate_tensors = self.llm.make_empty_intermediate_tensors

    def _visual_embeddings(self, pixel_values, grids, video: bool) -> list[torch.Tensor]:
        """[start row, visual rows, end row] per image (or video), in the reference's order."""
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values))
        grids = torch.as_tensor(grids).reshape(-1, 3).to(device=pixel_values.device, dtype=torch.long)
        logits = self.visual_tokenizer(pixel_values.to(self.vte.indicators.dtype), grids)
        rows = self.visual_vocab.embed(logits, self.visual_tokenizer.head, self.vte)
        start, end = (self.vte.indicators[i:i + 1] for i in indicator_rows(video))
        per_item = (grids.prod(-1) // self.visual_tokenizer.merged).tolist()
        return [torch.cat([start, item, end]) for item in rows.split(per_item)]

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        # Items come back in prompt order; the reference allows images or one video, not both.
        embeddings: list[torch.Tensor] = []
        if kwargs.get("pixel_values") is not None:
            embeddings += self._visual_embeddings(kwargs["pixel_values"], kwargs["grids"], video=False)
        if kwargs.get("video_pixel_values") is not None:
            embeddings += self._visual_embeddings(kwargs["video_pixel_values"], kwargs["video_grids"],
                                                  video=True)
        return tuple(embeddings)
