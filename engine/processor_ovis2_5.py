"""vLLM multimodal processor for Ovis2.5 / Ovis2.6: images and a video -> NaViT patches + grids.

The renderer has tokenized the prompt the reference's way (engine/renderer.py): each `<image>`
is one `<|image_pad|>` id, each `<video>` one `<|video_pad|>` id (the tokenizer knows neither
marker). Each is replaced by t*h*w/s^2 + 2 copies of its pad id, and the model's
`embed_multimodal` returns that many rows per item: the start indicator, the visual rows, the
end indicator. The pad ids are whatever the checkpoint's tokenizer says (151655 / 151656 in the
releases), checked at start-up; nothing is added to the tokenizer at run time.

As the reference: images or one video per prompt, never both. Per-server
(``--mm-processor-kwargs``) and per-request ``mm_processor_kwargs``: ``min_pixels`` (default
448*448) and ``max_pixels`` (default 1792*1792); a request may not raise max_pixels above the
server's, for which vLLM sized its encoder budget.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Mapping

import torch
from PIL import Image
from transformers import BatchFeature

from vllm.model_executor.models import ovis2_5 as builtin_ovis2_5
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageSize, MultiModalDataItems
from vllm.multimodal.processing import BaseDummyInputsBuilder, BaseMultiModalProcessor, PromptReplacement

from .members import pad_token_id
from .placeholders import IMAGE_TOKEN, VIDEO_TOKEN
from .preprocess_navit import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    max_resized_pixels,
    preprocess_frames,
)
from .processor import MemberProcessingInfo, _as_pil, _option, processor_factories, video_frames

# VTE rows V-4 .. V-1: image start, image end, video start, video end (constants -301 .. -304).
NUM_INDICATORS = 4
PROCESSOR_OPTIONS = ("min_pixels", "max_pixels")
RESAMPLE = {2: Image.Resampling.BILINEAR, 3: Image.Resampling.BICUBIC}


def indicator_rows(video: bool) -> tuple[int, int]:
    """(start, end) among the 4 indicator rows."""
    return (2, 3) if video else (0, 1)


class Ovis2_5ProcessingInfo(MemberProcessingInfo):
    @functools.cached_property
    def pad_ids(self) -> dict[str, int]:
        """The ids that mark an image / a video in a tokenized prompt and fill its positions."""
        tokenizer = self.get_tokenizer()
        return {"image": pad_token_id(tokenizer, self.member, self.member.image_pad_token),
                "video": pad_token_id(tokenizer, self.member, self.member.video_pad_token)}

    @property
    def vit_config(self):
        return self.get_hf_config().vit_config

    @property
    def factor(self) -> int:
        return self.vit_config.patch_size * self.vit_config.hidden_stride

    @functools.cached_property
    def image_settings(self) -> dict[str, object]:
        """Mean, std, rescale factor and resampling filter of the checkpoint's
        preprocessor_config.json (SigLIP's processor; the releases ask for bilinear)."""
        cfg = self.ctx.get_hf_image_processor_config() or {}
        resample = cfg.get("resample", 2)
        if resample not in RESAMPLE:
            raise ValueError(f"preprocessor_config.json asks for resample {resample}; implemented: "
                             f"{sorted(RESAMPLE)} (bilinear, bicubic)")
        return {"image_mean": tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))),
                "image_std": tuple(cfg.get("image_std", (0.5, 0.5, 0.5))),
                "rescale_factor": float(cfg.get("rescale_factor", 1 / 255)),
                "resample": RESAMPLE[resample]}

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None, "video": 1}

    def processor_options(self, request_kwargs: Mapping[str, object]) -> dict[str, int]:
        """Server-level --mm-processor-kwargs merged with the request's, validated: a bad name,
        type or value is a ValueError (HTTP 400) naming the option."""
        merged = self.ctx.get_merged_mm_kwargs(request_kwargs)
        unknown = sorted(set(merged) - set(PROCESSOR_OPTIONS))
        if unknown:
            raise ValueError(f"unknown Ovis2.5 mm_processor_kwargs {unknown}; "
                             f"supported: {list(PROCESSOR_OPTIONS)}")
        options = {name: _option(merged, name, default, float_ok=False, valid=lambda v: v >= 1,
                                 requirement="an integer >= 1")
                   for name, default in (("min_pixels", DEFAULT_MIN_PIXELS),
                                         ("max_pixels", DEFAULT_MAX_PIXELS))}
        if options["min_pixels"] > options["max_pixels"]:
            raise ValueError(f"mm_processor_kwargs min_pixels {options['min_pixels']} is above "
                             f"max_pixels {options['max_pixels']}")
        if request_kwargs:
            # vLLM sized its encoder budget for the largest image the server's bounds allow.
            server = self.processor_options({})
            if max_resized_pixels(self.factor, options["min_pixels"], options["max_pixels"]) > \
                    max_resized_pixels(self.factor, server["min_pixels"], server["max_pixels"]):
                raise ValueError(f"mm_processor_kwargs {dict(request_kwargs)} allow larger images "
                                 f"than this server's min_pixels {server['min_pixels']} / "
                                 f"max_pixels {server['max_pixels']} (set with --mm-processor-kwargs)")
        return options

    def max_visual_rows_per_frame(self) -> int:
        opts = self.processor_options({})
        return max_resized_pixels(self.factor, opts["min_pixels"], opts["max_pixels"]) // self.factor**2

    def get_image_size_with_most_features(self) -> ImageSize:
        side = math.isqrt(self.processor_options({})["max_pixels"]) // self.factor * self.factor
        side = max(side, self.factor)
        return ImageSize(width=side, height=side)

    def dummy_video_frames(self, seq_len: int) -> int:
        size = self.get_image_size_with_most_features()
        per_frame = (size.width // self.factor) * (size.height // self.factor)
        return max(1, (seq_len - 2) // per_frame)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # A video's length is the caller's frame count: any that fits the context is allowed.
        return {"image": self.max_visual_rows_per_frame() + 2, "video": seq_len}


class Ovis2_5DummyInputsBuilder(BaseDummyInputsBuilder[Ovis2_5ProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        member = self.info.member
        return (member.image_pad_token * mm_counts.get("image", 0)
                + member.video_pad_token * mm_counts.get("video", 0))

    def get_dummy_mm_data(self, seq_len, mm_counts, mm_options):
        size = self.info.get_image_size_with_most_features()
        options = mm_options or {}
        return {
            "image": self._get_dummy_images(width=size.width, height=size.height,
                                            num_images=mm_counts.get("image", 0),
                                            overrides=options.get("image")),
            "video": self._get_dummy_videos(width=size.width, height=size.height,
                                            num_frames=self.info.dummy_video_frames(seq_len),
                                            num_videos=mm_counts.get("video", 0),
                                            overrides=options.get("video")),
        }


class Ovis2_5MultiModalProcessor(BaseMultiModalProcessor[Ovis2_5ProcessingInfo]):
    _profiling = threading.local()  # vLLM's dummy inputs hold images and a video at once

    def get_dummy_mm_inputs(self, *args, **kwargs):
        self._profiling.active = True
        try:
            return super().get_dummy_mm_inputs(*args, **kwargs)
        finally:
            self._profiling.active = False

    def apply(self, inputs, timing_ctx):
        counts = inputs.mm_data_items.get_all_counts()
        mixed = counts.get("image", 0) and counts.get("video", 0)
        if mixed and not getattr(self._profiling, "active", False):
            raise ValueError("Ovis2.5 takes images or one video in a prompt, not both (the "
                             "reference model refuses this too)")
        for modality, marker in (("image", IMAGE_TOKEN), ("video", VIDEO_TOKEN)):
            markers = inputs.prompt.count(self.info.pad_ids[modality])
            if markers != counts.get(modality, 0):
                raise ValueError(f"the prompt has {markers} {marker} marker(s) but "
                                 f"{counts.get(modality, 0)} {modality}(s) were given; each "
                                 f"{modality} needs exactly one marker")
        return super().apply(inputs, timing_ctx)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        options = self.info.processor_options(hf_kwargs)
        vit = self.info.vit_config
        settings = dict(patch_size=vit.patch_size, hidden_stride=vit.hidden_stride,
                        temporal_patch_size=vit.temporal_patch_size, **options,
                        **self.info.image_settings)
        # Cast here: the model casts first thing, so values are the same and caches keep half.
        dtype = self.info.ctx.model_config.dtype
        width = 3 * vit.temporal_patch_size * vit.patch_size**2
        out = {}
        for modality, key, grid_key in (("images", "pixel_values", "grids"),
                                        ("videos", "video_pixel_values", "video_grids")):
            pixels, grids = [], []
            for index, item in enumerate(hf_data.get(modality, [])):
                frames = [_as_pil(item)] if modality == "images" else video_frames(item)
                try:
                    px, grid = preprocess_frames(frames, **settings)
                except ValueError as exc:
                    raise ValueError(f"{modality[:-1]} {index}: {exc}") from exc
                pixels.append(px.to(dtype))
                grids.append(grid)
            if pixels:
                out[key] = torch.cat(pixels)
                out[grid_key] = torch.tensor(grids, dtype=torch.long)
            elif modality == "images":
                out[key] = torch.empty(0, width, dtype=dtype)
                out[grid_key] = torch.empty(0, 3, dtype=torch.long)
        return BatchFeature(out)

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        fields = {}
        for modality, key, grid_key in (("image", "pixel_values", "grids"),
                                        ("video", "video_pixel_values", "video_grids")):
            grids = hf_inputs.get(grid_key, torch.empty(0, 3, dtype=torch.long))
            fields[key] = MultiModalFieldConfig.flat_from_sizes(modality, grids.prod(-1))
            fields[grid_key] = MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs,
                            out_mm_kwargs: MultiModalKwargsItems) -> list[PromptReplacement]:
        merged = self.info.vit_config.hidden_stride**2

        def replacement(modality: str, grid_key: str):
            pad_id = self.info.pad_ids[modality]

            def rows(item_idx: int) -> list[int]:
                t, h, w = out_mm_kwargs[modality][item_idx][grid_key].data.tolist()
                return [pad_id] * (t * h * w // merged + 2)
            return rows

        return [PromptReplacement(modality=m, target=[self.info.pad_ids[m]], replacement=replacement(m, g))
                for m, g in (("image", "grids"), ("video", "video_grids"))]


processing_info_for, dummy_inputs_for, processor_for = processor_factories(
    Ovis2_5ProcessingInfo, Ovis2_5DummyInputsBuilder, Ovis2_5MultiModalProcessor,
    (builtin_ovis2_5.Ovis2_5ProcessingInfo, builtin_ovis2_5.Ovis2_5DummyInputsBuilder,
     builtin_ovis2_5.Ovis2_5MultiModalProcessor))
