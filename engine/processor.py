"""vLLM multimodal processor for Ovis: images -> crops + grid, image marker -> placeholder run.

The renderer has tokenized the prompt the reference's way (engine/renderer.py): each `<image>`
is one id there, the member's image pad token (engine/members.py). Each is replaced by
`num_image_tokens(grid)` copies of it, and the model's `embed_multimodal` returns exactly that
many embeddings per image, indicators included, in the reference's order. Prompts given as
token ids mark images with the pad token id.

A video (Ovis2; its guide runs one as its frames): each frame is an image with max_partition 1,
and the frames stand where the guide's prompt has '\n'.join(['<image>'] * frames). The video's
one `<video>` id (the member's video pad token) becomes each frame's run of image pad ids, with
the id(s) of "\n", tokenized on its own as the reference tokenizes the text between markers,
between frames. vLLM's video loader samples the frames (--media-io-kwargs, default 32); a video
may not have more than the server's num_frames, for which the encoder budget was sized.

Per-server options (``--mm-processor-kwargs``) and per-request ``mm_processor_kwargs``:
``max_partition`` (default 9), ``covering_threshold`` (default 0.9), ``max_pixels``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature

from vllm.model_executor.models import ovis as builtin_ovis
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.media.base import MediaWithBytes
from vllm.multimodal.parse import ImageProcessorItems, ImageSize, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdateDetails,
)
from vllm.renderers import TokenizeParams

from .members import Member, image_pad_id, member_of, pad_token_id
from .placeholders import IMAGE_TOKEN, VIDEO_TOKEN, num_crops, num_image_tokens, tokens_per_crop
from .preprocess import DEFAULT_MAX_PIXELS, preprocess_image

DEFAULT_MAX_PARTITION = 9
DEFAULT_COVERING_THRESHOLD = 0.9
DEFAULT_VIDEO_FRAMES = 32  # vLLM's video loader's default num_frames
FRAME_GRID = (1, 1)  # a video frame: max_partition 1, as the Ovis2 guide
PROCESSOR_OPTIONS = ("max_partition", "covering_threshold", "max_pixels")


def _option(options: Mapping[str, object], name: str, default: object, *, float_ok: bool,
            valid, requirement: str) -> object:
    """options[name] (or the default) if it is a JSON number of the right kind passing `valid`."""
    value = options.get(name, default)
    kinds = (int, float) if float_ok else int
    if isinstance(value, bool) or not isinstance(value, kinds) or not valid(value):
        raise ValueError(f"mm_processor_kwargs {name} must be {requirement}, not {value!r}")
    return value


def _decoded(image: object) -> object:
    """Decode a lazily opened PIL image now, so corrupt or truncated data is a clear ValueError
    before anything (hashing, caching, preprocessing) touches its pixels."""
    pil = image.media if isinstance(image, MediaWithBytes) else image
    if isinstance(pil, Image.Image):
        try:
            pil.load()
        except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ValueError(f"image could not be decoded: {exc}") from exc
    return image


class OvisDataParser(MultiModalDataParser):
    """vLLM's parser turns every PIL image to RGB on the way in, compositing transparency onto
    white and applying the EXIF orientation. The reference does neither (plain PIL
    `convert("RGB")`, orientation ignored), so images pass through untouched here and
    `preprocess_image` converts them exactly as the reference does."""

    def _parse_image_data(self, data):
        if data is None or self.is_embeddings(data):
            return super()._parse_image_data(data)
        if isinstance(data, (Image.Image, MediaWithBytes)) or (
                isinstance(data, (np.ndarray, torch.Tensor)) and data.ndim == 3):
            items = [data]
        else:
            items = list(data)
        return ImageProcessorItems([_decoded(item) for item in items])


class MemberProcessingInfo(BaseProcessingInfo):
    """What the processing info of every generation does alike: the member row, tokenization
    without special tokens, images as the reference sees them, our own flat options."""

    @functools.cached_property
    def member(self) -> Member:
        member = member_of(self.get_hf_config())
        assert member is not None, "vLLM's built-in processes checkpoints without a member row"
        return member

    def get_default_tok_params(self) -> TokenizeParams:
        # The chat template writes <bos> itself, as the reference's formatter does.
        return super().get_default_tok_params().with_kwargs(add_special_tokens=False)

    def get_data_parser(self) -> MultiModalDataParser:
        return OvisDataParser(expected_hidden_size=self._get_expected_hidden_size(),
                              allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {}  # no Hugging Face processor: our options stay flat


def server_video_frames(ctx) -> int:
    """The most frames vLLM's video loader gives a video on this server (--media-io-kwargs)."""
    media = (ctx.model_config.multimodal_config.media_io_kwargs or {}).get("video", {})
    frames = media.get("num_frames", DEFAULT_VIDEO_FRAMES)
    return frames if isinstance(frames, int) and frames > 0 else DEFAULT_VIDEO_FRAMES


def video_frames(video: object) -> list[Image.Image]:
    """A video as vLLM hands it over (frames array [T, H, W, C], list of frames, or either with
    its metadata) -> PIL frames."""
    if isinstance(video, tuple):
        video = video[0]
    if isinstance(video, torch.Tensor):
        video = video.cpu().numpy()
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise ValueError(f"a video must be frames [T, H, W, C], got shape {video.shape}")
        return [Image.fromarray(np.ascontiguousarray(frame.astype(np.uint8))) for frame in video]
    return [_as_pil(frame) for frame in video]


class OvisProcessingInfo(MemberProcessingInfo):
    @functools.cached_property
    def image_pad_id(self) -> int:
        """The one id that marks an image in a tokenized prompt and fills its positions."""
        return image_pad_id(self.get_tokenizer(), self.member)

    @functools.cached_property
    def video_pad_id(self) -> int | None:
        """The id that marks a video (Ovis2), or None for a member without video."""
        token = self.member.video_pad_token
        return None if token is None else pad_token_id(self.get_tokenizer(), self.member, token)

    @functools.cached_property
    def frame_separator(self) -> list[int]:
        """The ids of the text between two frames' `<image>` markers in the guide's prompt."""
        return self.get_tokenizer().encode("\n", add_special_tokens=False)

    def frame_tokens(self) -> int:
        return num_image_tokens(FRAME_GRID, self.tokens_per_crop)

    def video_tokens(self, frames: int) -> int:
        return frames * self.frame_tokens() + (frames - 1) * len(self.frame_separator)

    @property
    def backbone_config(self):
        return self.get_hf_config().visual_tokenizer_config.backbone_config

    @functools.cached_property
    def image_settings(self) -> dict[str, object]:
        """Side, mean, std and rescale factor from the checkpoint's preprocessor_config.json, as
        the reference's image processor uses them: the crop side is `crop_size` for CLIP's
        processor (Ovis2) and `size` for SigLIP's (Ovis1.6)."""
        cfg = self.ctx.get_hf_image_processor_config() or {}
        size = cfg.get("crop_size") if "CLIP" in cfg.get("image_processor_type", "") else cfg.get("size")
        side = (size or {}).get("height", self.backbone_config.image_size)
        if cfg.get("resample", 3) != 3:
            raise ValueError(f"preprocessor_config.json asks for resample {cfg['resample']}; the "
                             "Ovis releases use 3 (bicubic), the only one implemented")
        return {"side": int(side),
                "image_mean": tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))),
                "image_std": tuple(cfg.get("image_std", (0.5, 0.5, 0.5))),
                "rescale_factor": float(cfg.get("rescale_factor", 1 / 255))}

    @property
    def image_side(self) -> int:
        return self.image_settings["side"]

    @property
    def tokens_per_crop(self) -> int:
        cfg = self.get_hf_config().visual_tokenizer_config
        return tokens_per_crop(self.image_side, self.backbone_config.patch_size, cfg.hidden_stride)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        # One video per prompt, as the guide (frames as images: nothing else limits it).
        return {"image": None} if self.member.video_pad_token is None else {"image": None, "video": 1}

    def processor_options(self, request_kwargs: Mapping[str, object]) -> dict[str, object]:
        """Server-level --mm-processor-kwargs merged with the request's, validated: a bad name,
        type or value is a ValueError (HTTP 400) naming the option."""
        merged = self.ctx.get_merged_mm_kwargs(request_kwargs)
        unknown = sorted(set(merged) - set(PROCESSOR_OPTIONS))
        if unknown:
            raise ValueError(f"unknown Ovis mm_processor_kwargs {unknown}; "
                             f"supported: {list(PROCESSOR_OPTIONS)}")
        options = {
            "max_partition": _option(merged, "max_partition", DEFAULT_MAX_PARTITION, float_ok=False,
                                     valid=lambda v: v >= 1, requirement="an integer >= 1"),
            "covering_threshold": _option(merged, "covering_threshold", DEFAULT_COVERING_THRESHOLD,
                                          float_ok=True, valid=lambda v: 0 < v <= 1,
                                          requirement="a number in (0, 1]"),
            "max_pixels": _option(merged, "max_pixels", DEFAULT_MAX_PIXELS, float_ok=False,
                                  valid=lambda v: v >= 1, requirement="an integer >= 1"),
        }
        if request_kwargs:
            # vLLM sized its encoder budget for the server's largest grid, and max_pixels is the
            # operator's cap on decoded images: a request may only ask for less.
            server = self.processor_options({})
            for name in ("max_partition", "max_pixels"):
                if options[name] > server[name]:
                    raise ValueError(f"{name} {options[name]} is above this server's "
                                     f"{server[name]} (set with --mm-processor-kwargs)")
        return options

    def max_grid(self) -> tuple[int, int]:
        """The grid with the most crops allowed by the server's max_partition."""
        k = self.processor_options({})["max_partition"]
        return max(((r, c) for r in range(1, k + 1) for c in range(1, k + 1) if r * c <= k),
                   key=lambda g: g[0] * g[1])

    def get_image_size_with_most_features(self) -> ImageSize:
        rows, cols = self.max_grid()
        return ImageSize(width=cols * self.image_side, height=rows * self.image_side)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        most = {"image": num_image_tokens(self.max_grid(), self.tokens_per_crop)}
        if self.video_pad_id is not None:
            most["video"] = self.video_tokens(server_video_frames(self.ctx))
        return most


class OvisDummyInputsBuilder(BaseDummyInputsBuilder[OvisProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        # Tokenized whole by vLLM (not by our renderer): the pad tokens are special tokens.
        member = self.info.member
        return (member.image_pad_token * mm_counts.get("image", 0)
                + (member.video_pad_token or "") * mm_counts.get("video", 0))

    def get_dummy_mm_data(self, seq_len, mm_counts, mm_options):
        size = self.info.get_image_size_with_most_features()
        options = mm_options or {}
        data = {"image": self._get_dummy_images(
            width=size.width, height=size.height, num_images=mm_counts.get("image", 0),
            overrides=options.get("image"))}
        if mm_counts.get("video", 0):
            side = self.info.image_side
            data["video"] = self._get_dummy_videos(
                width=side, height=side, num_frames=server_video_frames(self.info.ctx),
                num_videos=mm_counts["video"], overrides=options.get("video"))
        return data


def _as_pil(image: object) -> Image.Image:
    if isinstance(image, MediaWithBytes):
        image = image.media
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    raise ValueError(f"unsupported image type {type(image).__name__}; pass a PIL image")


class OvisMultiModalProcessor(BaseMultiModalProcessor[OvisProcessingInfo]):
    def apply(self, inputs, timing_ctx):
        # vLLM checks that every image finds a marker, not that every marker gets an image; a
        # marker left over would reach the model as plain text. The reference raises here too.
        counts = inputs.mm_data_items.get_all_counts()
        for modality, marker, pad_id in (("image", IMAGE_TOKEN, self.info.image_pad_id),
                                         ("video", VIDEO_TOKEN, self.info.video_pad_id)):
            markers = 0 if pad_id is None else inputs.prompt.count(pad_id)
            if markers != counts.get(modality, 0):
                raise ValueError(f"the prompt has {markers} {marker} marker(s) but "
                                 f"{counts.get(modality, 0)} {modality}(s) were given; each "
                                 f"{modality} needs exactly one marker")
        return super().apply(inputs, timing_ctx)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        opts = self.info.processor_options(hf_kwargs)
        settings = dict(self.info.image_settings)
        side = settings.pop("side")
        # The model casts pixels to its dtype before anything else; casting here gives the same
        # values and halves (bf16) what the processor caches keep and what goes to the engine.
        dtype = self.info.ctx.model_config.dtype

        def preprocess(image, what: str, **overrides):
            try:
                px, grid = preprocess_image(_as_pil(image), side, **{**opts, **overrides}, **settings)
            except ValueError as exc:
                raise ValueError(f"{what}: {exc}") from exc
            return px.to(dtype), grid

        pixels, grids = [], []
        for index, image in enumerate(hf_data.get("images", [])):
            px, grid = preprocess(image, f"image {index}")
            pixels.append(px)
            grids.append(grid)
        out = {"pixel_values": torch.cat(pixels) if pixels else torch.empty(0, 3, side, side, dtype=dtype),
               "grids": torch.tensor(grids, dtype=torch.long).reshape(-1, 2)}
        frames_per_video, frame_pixels = [], []
        most = server_video_frames(self.info.ctx)
        for index, video in enumerate(hf_data.get("videos", [])):
            frames = video_frames(video)
            if not 1 <= len(frames) <= most:
                raise ValueError(f"video {index} has {len(frames)} frames; this server takes 1 to "
                                 f"{most} (--media-io-kwargs '{{\"video\": {{\"num_frames\": N}}}}')")
            frames_per_video.append(len(frames))
            frame_pixels += [preprocess(frame, f"video {index} frame {i}", max_partition=1)[0]
                             for i, frame in enumerate(frames)]
        if frames_per_video:
            out["video_pixel_values"] = torch.cat(frame_pixels)
            out["video_frames"] = torch.tensor(frames_per_video, dtype=torch.long)
        return BatchFeature(out)

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        # Empty when every image of the request came from the processor cache.
        grids = hf_inputs.get("grids", torch.empty(0, 2, dtype=torch.long))
        crops = torch.tensor([num_crops(tuple(g)) for g in grids.tolist()], dtype=torch.long)
        fields = {
            "pixel_values": MultiModalFieldConfig.flat_from_sizes("image", crops),
            "grids": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        }
        if self.info.video_pad_id is not None:
            frames = hf_inputs.get("video_frames", torch.empty(0, dtype=torch.long))
            fields["video_pixel_values"] = MultiModalFieldConfig.flat_from_sizes("video", frames)
            fields["video_frames"] = MultiModalFieldConfig.batched("video", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs,
                            out_mm_kwargs: MultiModalKwargsItems) -> list[PromptReplacement]:
        per_crop, pad_id = self.info.tokens_per_crop, self.info.image_pad_id

        def image(item_idx: int) -> list[int]:
            grid = tuple(out_mm_kwargs["image"][item_idx]["grids"].data.tolist())
            return [pad_id] * num_image_tokens(grid, per_crop)

        def video(item_idx: int) -> PromptUpdateDetails:
            frames = int(out_mm_kwargs["video"][item_idx]["video_frames"].data)
            frame = [pad_id] * self.info.frame_tokens()
            ids = frame + (self.info.frame_separator + frame) * (frames - 1)
            return PromptUpdateDetails.select_token_id(ids, embed_token_id=pad_id)

        updates = [PromptReplacement(modality="image", target=[pad_id], replacement=image)]
        if self.info.video_pad_id is not None:
            updates.append(PromptReplacement(modality="video", target=[self.info.video_pad_id],
                                             replacement=video))
        return updates


def processor_factories(info_class, dummy_class, processor_class, builtin):
    """The three factories vLLM builds a registered class's processor with: ours for a checkpoint
    with a member row (engine/members.py), vLLM's built-in ones (`builtin`: info, dummy inputs,
    processor classes) for any other, to go with the built-in model it is then served by."""
    builtin_info, builtin_dummy, builtin_processor = builtin

    def info_for(ctx) -> BaseProcessingInfo:
        return info_class(ctx) if member_of(ctx.get_hf_config()) is not None else builtin_info(ctx)

    def dummy_inputs_for(info: BaseProcessingInfo) -> BaseDummyInputsBuilder:
        return (dummy_class if isinstance(info, info_class) else builtin_dummy)(info)

    def processor_for(info: BaseProcessingInfo, dummy_inputs: BaseDummyInputsBuilder, **kwargs):
        cls = processor_class if isinstance(info, info_class) else builtin_processor
        return cls(info, dummy_inputs, **kwargs)

    return info_for, dummy_inputs_for, processor_for


processing_info_for, dummy_inputs_for, processor_for = processor_factories(
    OvisProcessingInfo, OvisDummyInputsBuilder, OvisMultiModalProcessor,
    (builtin_ovis.OvisProcessingInfo, builtin_ovis.OvisDummyInputsBuilder, builtin_ovis.OvisMultiModalProcessor))
