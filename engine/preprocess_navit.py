"""Ovis2.5 / Ovis2.6 image and video preprocessing: native resolution, NaViT patches.

Reproduces the reference's `VisualTokenizer.preprocess` and `preprocess_inputs` (AIDC-AI Ovis2.5 code line,
docs/reference.md, "Ovis2.5 and Ovis2.6"):

* ``image.convert("RGB")`` with plain PIL when the mode is not RGB: alpha dropped, not
  composited onto white (vLLM's media parser composites); EXIF orientation not applied.
* ``smart_resize`` to a multiple of patch_size * hidden_stride (32) with the pixel count
  between min_pixels and max_pixels, aspect ratio kept as closely as that allows.
* The checkpoint's SigLIP image processor on the PIL path: PIL resize of the uint8 image with
  its `resample` (2, bilinear, in the releases), rescale 1/255, normalize (mean = std = 0.5); computed here with the same float
  operations (engine/preprocess.py's look-up table), so values are bit-identical, and whether
  or not torchvision is installed (transformers' torchvision backend resizes differently).
* Patches in the reference's order: (t, h/s, w/s, s, s, C, temporal_patch, patch, patch) with
  s = hidden_stride, one row per patch; grid_thw = (t, H/patch, W/patch).
* A video: every frame resized to the size smart_resize gives the first frame, t = frames.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from .preprocess import _normalization_table

# The reference's bounds (its chat() and the checkpoints' preprocess_inputs; vLLM's built-in
# uses the same).
DEFAULT_MIN_PIXELS = 448 * 448
DEFAULT_MAX_PIXELS = 1792 * 1792
MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width), multiples of `factor`, as the reference's smart_resize computes them.

    Sides shorter than `factor` are first scaled up to it, aspect ratios above 200 first cut
    to 200 (the reference prints a note and goes on; so do we, silently)."""
    if height < 1 or width < 1:
        raise ValueError(f"image has zero size ({width}x{height}); nothing to preprocess")
    if height < factor or width < factor:
        if height < width:
            width = round(factor / height * width)
            height = factor
        else:
            height = round(factor / width * height)
            width = factor
    elif max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        if height > width:
            height = MAX_ASPECT_RATIO * width
        else:
            width = MAX_ASPECT_RATIO * height
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def max_resized_pixels(factor: int, min_pixels: int, max_pixels: int) -> int:
    """An upper bound of h * w over every smart_resize output: max_pixels, or, where an image
    scaled up to min_pixels rounds past it, that (ceil on both sides, aspect ratio <= 200)."""
    short = math.sqrt(min_pixels / MAX_ASPECT_RATIO)
    upscaled = (short + factor) * (short * MAX_ASPECT_RATIO + factor)
    return max(max_pixels, math.floor(upscaled))


def _resized_frame(image: Image.Image, width: int, height: int, table: np.ndarray,
                   resample: Image.Resampling) -> np.ndarray:
    """float32 [3, height, width]: the SigLIP processor's PIL path on one RGB image."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    resized = np.asarray(image.resize((width, height), resample))
    out = np.empty((3, height, width), dtype=np.float32)
    for c in range(3):
        np.take(table[c], resized[:, :, c], out=out[c], mode="clip")
    return out


def preprocess_frames(
    frames: list[Image.Image],
    *,
    patch_size: int,
    hidden_stride: int,
    temporal_patch_size: int = 1,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    rescale_factor: float = 1 / 255,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Patches float32 [t*h*w, 3*temporal_patch*patch*patch] and grid (t, h, w) of an image
    (one frame) or a video (its frames, all resized as the first)."""
    if not frames:
        raise ValueError("a video needs at least one frame")
    if not min_pixels <= max_pixels:
        raise ValueError(f"min_pixels {min_pixels} is above max_pixels {max_pixels}")
    width, height = frames[0].size
    factor = patch_size * hidden_stride
    new_h, new_w = smart_resize(height, width, factor, min_pixels, max_pixels)
    mean = tuple(float(m) for m in image_mean)
    std = tuple(float(s) for s in image_std)
    table = _normalization_table(float(rescale_factor), mean, std)
    pixels = np.stack([_resized_frame(f, new_w, new_h, table, resample) for f in frames])  # [T, C, H, W]
    if len(frames) % temporal_patch_size:  # the last frame repeated, as the reference pads
        pad = temporal_patch_size - len(frames) % temporal_patch_size
        pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
    t = pixels.shape[0] // temporal_patch_size
    h, w, s, p = new_h // patch_size, new_w // patch_size, hidden_stride, patch_size
    c = pixels.shape[1]
    patches = pixels.reshape(t, temporal_patch_size, c, h // s, s, p, w // s, s, p)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = np.ascontiguousarray(patches).reshape(t * h * w, c * temporal_patch_size * p * p)
    return torch.from_numpy(flat), (t, h, w)
