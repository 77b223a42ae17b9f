"""Ovis1.6 and Ovis2 for vLLM, computing what the reference model computes (docs/reference.md).

    pixels -> SigLIP / AIMv2 (last layer, before the final norm) -> hidden_stride merge
           -> head Linear -> [LayerNorm -> softmax -> (+5 zero columns) @ VTE]   (kernels/)
    image  -> [indicator rows and per-crop embeddings in the reference layout]
              (* sqrt(hidden) where the LLM scales its input embeddings: Gemma2)
    prompt -> the LLM (Gemma2, Llama, Qwen2) with those embeddings over the image's placeholders

What differs per member (LLM, backbone, pad token, embedding scale) comes from
engine/members.py. A checkpoint with no row there (Ovis1.5) is built as vLLM's built-in Ovis
instead, with one log line, so installing the plugin never loses a checkpoint that vLLM serves.

Where this differs from vLLM's built-in Ovis: indicators take VTE rows V-5..V-1 in the reference
order, SigLIP's post-LayerNorm is skipped, visual rows get Gemma2's sqrt(hidden_size) embedding
scale like the text rows, images of different crop grids share a prompt, and a quantized
checkpoint's quantization applies to the LLM only.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn import functional as F

from vllm.config import VllmConfig
from vllm.model_executor.models import ovis as builtin_ovis
from vllm.model_executor.models.aimv2 import AIMv2Model
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.siglip import SiglipVisionModel
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY

from .cpu_support import cpu_cannot_serve
from .members import member_of
from .model_base import OvisModelBase
from .placeholders import IMAGE_ATOM, IMAGE_TOKEN, NUM_INDICATORS, VIDEO_TOKEN, image_layout, indicator_vte_row
from .processor import dummy_inputs_for, processing_info_for, processor_for
from .visual_vocab import VisualVocabulary


class OvisVisualTokenizer(nn.Module):
    """Vision backbone (SigLIP or AIMv2) + head: crops -> per-token logits over this rank's slice
    of the visual vocabulary (pre-LayerNorm).

    The LayerNorm (`head.1`) is applied inside the visual-embedding kernel, fused with the
    softmax and the VTE product."""

    def __init__(self, config, visual_vocab: VisualVocabulary, prefix: str = ""):
        super().__init__()
        self.hidden_stride = config.hidden_stride
        # Ovis reads hidden_states[-1]: the last encoder layer BEFORE the backbone's final norm
        # (SigLIP's post_layernorm, AIMv2's trunk.post_trunk_norm). Unquantized: the GPTQ
        # releases quantize the LLM only.
        backbone = AIMv2Model if config.backbone_config.model_type == "aimv2_vision_model" \
            else SiglipVisionModel
        self.backbone = backbone(config.backbone_config, None, require_post_norm=False,
                                 prefix=maybe_prefix(prefix, "backbone"))
        in_features = config.backbone_config.hidden_size * self.hidden_stride**2
        self.head = visual_vocab.make_head(in_features)

    def merge_patches(self, features: torch.Tensor) -> torch.Tensor:
        """[n, g*g, d] -> [n, (G/s)^2, s*s*d]: zero-pad the g x g patch grid to a multiple G of the
        stride s, then concatenate each s x s block row-major."""
        s = self.hidden_stride
        n, length, d = features.shape
        g = int(length**0.5)
        assert g * g == length, f"patch count {length} is not a square"
        pad = -g % s
        grid = F.pad(features.reshape(n, g, g, d), (0, 0, 0, pad, 0, pad))
        big = (g + pad) // s
        blocks = grid.reshape(n, big, s, big, s, d).permute(0, 1, 3, 2, 4, 5)
        return blocks.reshape(n, big * big, s * s * d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.merge_patches(self.backbone(pixel_values))
        return self.head[0](features)


@MULTIMODAL_REGISTRY.register_processor(processor_for, info=processing_info_for, dummy_inputs=dummy_inputs_for)
class Ovis(OvisModelBase):
    builtin = builtin_ovis.Ovis
    tower = "backbone"

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_TOKEN
        if modality.startswith("video"):  # Ovis2 (engine/processor.py); vLLM refuses it elsewhere
            return VIDEO_TOKEN
        raise ValueError(f"Ovis takes images (and Ovis2 a video), not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        member = member_of(config)
        if reason := cpu_cannot_serve(config):
            raise ValueError(reason)
        # Gemma2 multiplies the whole merged input sequence by sqrt(hidden_size) in the reference;
        # vLLM's Gemma2 does it only inside its token lookup, so visual rows get it here.
        self.visual_scale = config.hidden_size**0.5 if member.scales_visual_embeddings else None
        max_len = vllm_config.model_config.max_model_len
        if max_len > config.multimodal_max_length:
            raise ValueError(
                f"max_model_len {max_len} exceeds this checkpoint's multimodal_max_length "
                f"{config.multimodal_max_length}; the reference model never sees longer sequences: "
                f"pass --max-model-len {config.multimodal_max_length} or less (server.py does "
                f"when none is given)")

        with self._mark_language_model(vllm_config):
            self.llm = init_vllm_registered_model(
                vllm_config=vllm_config.with_hf_config(config.get_text_config()),
                prefix=maybe_prefix(prefix, "llm"))
        # No LoRA on the LLM's token embeddings and lm_head: ms-swift's adapters leave them out,
        # vLLM's Gemma2 and Qwen2 take none, and vLLM's LoRA logits path (which Llama would get)
        # fails on prompt logprobs in a batch with an adapter, taking the engine down with it
        # (vllm-project/vllm issues 29955 and 51594).
        self.llm.embedding_modules = {}
        vocab = config.visual_tokenizer_config.vocab_size
        self.visual_vocab = VisualVocabulary(vllm_config, vocab, NUM_INDICATORS)
        with self._mark_tower_model(vllm_config, {"image", "video"}):
            self.visual_tokenizer = OvisVisualTokenizer(
                config.visual_tokenizer_config, self.visual_vocab,
                prefix=maybe_prefix(prefix, "visual_tokenizer"))
            self.vte = self.visual_vocab.make_vte(config.hidden_size)
        self.make_empty_intermediate_tensors = self.llm.make_empty_intermediate_tensors

    def _image_embeddings(self, logits: torch.Tensor, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Lay out indicators and crop embeddings per image, scaled like the LLM's text rows."""
        vocab, per_crop = self.vte.vocab, logits.shape[1]
        crop_embeds = self.visual_vocab.embed(logits.flatten(0, 1), self.visual_tokenizer.head, self.vte)
        # One table holding every crop token's embedding followed by the 5 indicator rows, so an
        # image is a single gather in the reference order.
        table = torch.cat([crop_embeds, self.vte.indicators])
        indicator_base = crop_embeds.shape[0] - (vocab - NUM_INDICATORS)
        if self.visual_scale is not None:  # in the embeddings' dtype, as the reference
            table = table * torch.tensor(self.visual_scale, dtype=table.dtype)
        images, next_crop = [], 0
        for grid in grids:
            index = []
            for item in image_layout(grid):
                if item == IMAGE_ATOM:
                    index.extend(range(next_crop * per_crop, (next_crop + 1) * per_crop))
                    next_crop += 1
                else:
                    index.append(indicator_base + indicator_vte_row(item, vocab))
            rows = torch.tensor(index, device=table.device)
            images.append(table.index_select(0, rows))
        return images

    def _visual_logits(self, pixel_values) -> torch.Tensor:
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values))
        return self.visual_tokenizer(pixel_values.to(self.vte.indicators.dtype))

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """Per item in prompt order: an image's rows, or a video's (Ovis2): each frame's rows as
        a 1x1-grid image, one after the other (the text between frames is not embedded here)."""
        embeddings = []
        if kwargs.get("pixel_values") is not None:
            grids = [tuple(int(v) for v in g) for g in torch.as_tensor(kwargs["grids"]).reshape(-1, 2).tolist()]
            embeddings += self._image_embeddings(self._visual_logits(kwargs["pixel_values"]), grids)
        if kwargs.get("video_pixel_values") is not None:
            frames = torch.as_tensor(kwargs["video_frames"]).reshape(-1).tolist()
            rows = self._image_embeddings(self._visual_logits(kwargs["video_pixel_values"]), [(1, 1)] * sum(frames))
            for end, count in zip(itertools.accumulate(frames), frames):
                embeddings.append(torch.cat(rows[end - count:end]))
        return tuple(embeddings)
