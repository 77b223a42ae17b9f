"""Ovis1.6 image preprocessing: crop-grid choice and per-crop pixel values.

Reproduces the reference model's preprocessing (AIDC-AI Ovis1.6 code line, see
docs/reference.md, "Crop grid" and "Each crop") exactly:

* ``image.convert("RGB")`` with plain PIL when the mode is not RGB. Alpha is dropped, NOT
  composited onto white (vLLM's ``convert_image_mode`` composites, which changes the pixels of
  transparent images). EXIF orientation is not applied.
* The grid is chosen by covering ratio with the reference's tie-breaking.
* Each crop (and the whole image as the global view, first, when there is more than one crop) is
  resized with PIL bicubic on the uint8 image, exactly as transformers' PIL-backed
  ``SiglipImageProcessor`` does, rescaled by 1/255, normalized with mean/std 0.5 and zero-padded
  (in normalized space) to ``side x side`` with the resized image centred.

Speed, without changing a single value: the image is converted once; each crop is one PIL
crop + resize; rescale and normalize go through a float32 look-up table of the 256 uint8 levels
computed with the very same float operations transformers uses (so results are bit-identical);
the table look-up writes straight into the padded slot of one preallocated zero tensor.
When torch allows more than one intra-op thread, crops run in a small thread pool: PIL's resize
and numpy's take release the GIL.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

__all__ = ["DEFAULT_MAX_PIXELS", "choose_grid", "crop_boxes", "preprocess_image"]

# Largest image (width * height) preprocess_image accepts by default: 8192 x 8192 = 64 Mpx,
# i.e. 256 MiB as RGB(X) in PIL. Bigger inputs are far beyond what 9 crops of 384 px can use and
# mostly come from decompression bombs, so they are refused before any conversion.
DEFAULT_MAX_PIXELS = 8192 * 8192


def _check_options(side: int, max_partition: int, covering_threshold: float) -> None:
    if isinstance(side, bool) or not isinstance(side, int) or side < 1:
        raise ValueError(f"side must be a positive int, got {side!r}")
    if isinstance(max_partition, bool) or not isinstance(max_partition, int) or max_partition < 1:
        raise ValueError(f"max_partition must be an int >= 1, got {max_partition!r}")
    # `not (0 < x <= 1)` also rejects NaN.
    if not (0 < covering_threshold <= 1):
        raise ValueError(f"covering_threshold must be in (0, 1], got {covering_threshold!r}")


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"image has zero size ({width}x{height}); nothing to preprocess")


def crop_boxes(width: int, height: int, grid: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """PIL boxes (left, upper, right, lower) of the grid's crops, row-major.

    Row height is height // rows and column width width // cols; the last row and column absorb
    the remainder (as in the reference).
    """
    rows, cols = grid
    row_height = height // rows
    col_width = width // cols
    boxes = []
    for r in range(rows):
        upper = r * row_height
        lower = height if r == rows - 1 else upper + row_height
        for c in range(cols):
            left = c * col_width
            right = width if c == cols - 1 else left + col_width
            boxes.append((left, upper, right, lower))
    return boxes


def _covering_area(w: int, h: int, side: int) -> float:
    # Same float operations in the same order as the reference, so ratios (and their ties) match.
    long, short = max(w, h), min(w, h)
    if long > side:
        short = short / long * side
        long = side
    return long * short


def choose_grid(
    width: int,
    height: int,
    side: int,
    max_partition: int = 9,
    covering_threshold: float = 0.9,
) -> tuple[int, int]:
    """The (rows, cols) crop grid the reference picks for a width x height image."""
    _check_options(side, max_partition, covering_threshold)
    _check_size(width, height)
    image_area = width * height
    # Candidate order matters for ties: the reference builds this list in this order and takes
    # the first element of a stable sort, which is what min() returns as well.
    scored = []
    for rows in range(1, max_partition + 1):
        for cols in range(1, max_partition // rows + 1):
            boxes = crop_boxes(width, height, (rows, cols))
            ratio = sum([_covering_area(r - l, b - u, side) for l, u, r, b in boxes]) / image_area
            scored.append(((rows, cols), ratio))
    good = [g for g in scored if g[1] > covering_threshold]
    if good:
        # Fewest crops, ties -> higher covering ratio.
        return min(good, key=lambda g: (g[0][0] * g[0][1], -g[1]))[0]
    # Highest covering ratio, ties -> fewer crops.
    return min(scored, key=lambda g: (-g[1], g[0][0] * g[0][1]))[0]


def _resized_size(w: int, h: int, side: int) -> tuple[int, int]:
    """(width, height) of a w x h crop after the reference resize: long side -> side."""
    if w == h:
        return side, side
    if w > h:
        return side, int(h / w * side)
    return int(w / h * side), side


@functools.lru_cache(maxsize=16)
def _normalization_table(rescale_factor: float, mean: tuple, std: tuple) -> np.ndarray:
    """float32 [3, 256]: normalized value of each uint8 level, per channel.

    Built with transformers' own arithmetic (rescale: float64 multiply, then downcast to float32;
    normalize: float32 (x - mean) / std), so a look-up equals its output bit for bit.
    """
    levels = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    table = (levels[None, :] - mean32) / std32
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=1)
def _pool(threads: int) -> ThreadPoolExecutor:
    # One long-lived pool, sized by torch's intra-op thread count (the process's CPU budget) and
    # re-made only when that changes, instead of one pool per call.
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ovis-preprocess")


# A forked child inherits the pool object but not its threads, and would wait forever on it
# (vLLM may fork its processes): drop it there so the child makes its own.
os.register_at_fork(after_in_child=_pool.cache_clear)


def preprocess_image(
    image: Image.Image,
    side: int,
    max_partition: int = 9,
    covering_threshold: float = 0.9,
    *,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    rescale_factor: float = 1 / 255,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pixel values float32 [num_crops, 3, side, side] and the (rows, cols) grid.

    The whole image comes first as the global view when rows * cols > 1; the grid crops follow
    row-major. Raises ValueError for a zero-size image, an image above max_pixels, bad options,
    or a crop so thin that the reference resize would make it 0 pixels wide (the reference fails
    there too).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    _check_options(side, max_partition, covering_threshold)
    width, height = image.size
    _check_size(width, height)
    if width * height > max_pixels:
        raise ValueError(
            f"image is {width}x{height} = {width * height} pixels, above the cap of "
            f"{max_pixels} pixels (max_pixels)"
        )
    mean = tuple(float(m) for m in image_mean)
    std = tuple(float(s) for s in image_std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"image_mean and image_std need 3 values, got {mean} and {std}")
    if not all(math.isfinite(s) and s != 0 for s in std):
        raise ValueError(f"image_std must be finite and non-zero, got {std}")
    table = _normalization_table(float(rescale_factor), mean, std)

    # The reference converts to RGB first (plain PIL). A greyscale image becomes R = G = B, and
    # PIL resizes each band alike, so resizing its one band and looking it up for all three
    # gives the same pixels for a third of the resize work (document scans).
    grey = image.mode == "L"
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    image.load()  # load lazily opened files once, here, not concurrently in the workers

    grid = choose_grid(width, height, side, max_partition, covering_threshold)
    boxes = crop_boxes(width, height, grid)
    if len(boxes) > 1:
        boxes.insert(0, None)  # global view: the whole image, uncropped

    # Resized size and padded position of every crop, checked before any work is done.
    jobs = []
    for index, box in enumerate(boxes):
        w, h = (width, height) if box is None else (box[2] - box[0], box[3] - box[1])
        new_w, new_h = _resized_size(w, h, side)
        if new_w == 0 or new_h == 0:
            raise ValueError(
                f"a {w}x{h} crop of the {width}x{height} image would be resized to "
                f"{new_w}x{new_h} pixels (aspect ratio beyond {side}:1); the reference fails too"
            )
        jobs.append((index, box, new_w, new_h))

    # np.zeros gets lazily zeroed pages from the OS, so the zeroing is not a serial memset ahead of
    # the (possibly threaded) work (faster than torch.zeros: benchmarks/RESULTS.md, "Design
    # measurements"). The tensor shares this memory.
    out = np.zeros((len(jobs), 3, side, side), dtype=np.float32)
    pixel_values = torch.from_numpy(out)

    # Normalization is one vectorized table look-up per crop, done right after that crop's resize
    # while its pixels are in cache, straight into its padded slot (pads stay exactly 0.0). One
    # look-up over all crops at once needs a staging buffer, a layout copy and a pass to re-zero
    # the pads (slower: RESULTS.md, "Design measurements"), and it cannot run in the thread pool.
    def run(job):
        index, box, new_w, new_h = job
        crop = image if box is None else image.crop(box)
        resized = np.asarray(crop.resize((new_w, new_h), Image.Resampling.BICUBIC))
        top, left = (side - new_h) // 2, (side - new_w) // 2
        slot = out[index, :, top : top + new_h, left : left + new_w]
        for c in range(3):
            # mode="clip" lets numpy write into the strided slot without a temporary buffer;
            # uint8 indices are always in range of the 256-entry table.
            np.take(table[c], resized if grey else resized[:, :, c], out=slot[c], mode="clip")

    threads = torch.get_num_threads()
    if threads > 1 and len(jobs) > 1:
        list(_pool(threads).map(run, jobs))
    else:
        for job in jobs:
            run(job)
    return pixel_values, grid
