"""engine/preprocess.py against an independent reference of the Ovis1.6 preprocessing.

The reference here is written from docs/reference.md ("Crop grid",
"Each crop") as the reference model's code does it: the grid by sorting the
candidate list, and each crop through transformers' own PIL-backed SigLIP image processor.
"""

import io
import math
import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers.models.siglip import SiglipImageProcessorPil

from ovis_vllm.engine.preprocess import DEFAULT_MAX_PIXELS, choose_grid, crop_boxes, preprocess_image
from tests.ovis_reference import (
    reference_grid,
    reference_partition,
    reference_pixels,
    reference_sorted_grids,
)

# ----------------------------------------------------------------------------------------------
# Independent reference
# ----------------------------------------------------------------------------------------------


_SIGLIP = {}


def siglip(mean, std, rescale_factor):
    key = (tuple(mean), tuple(std), rescale_factor)
    if key not in _SIGLIP:
        # transformers 5 would fall back to this PIL backend anyway (torchvision is not
        # installed); naming it makes sure the PIL bicubic path is the one we compare with.
        processor = SiglipImageProcessorPil(
            do_resize=True,
            resample=Image.Resampling.BICUBIC,
            do_rescale=True,
            rescale_factor=rescale_factor,
            do_normalize=True,
            image_mean=list(mean),
            image_std=list(std),
        )
        assert processor.backend == "pil"
        _SIGLIP[key] = processor
    return _SIGLIP[key]


def reference_preprocess(image, side, max_partition=9, covering_threshold=0.9,
                         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), rescale_factor=1 / 255):
    return reference_pixels(image, side, siglip(mean, std, rescale_factor), max_partition,
                            covering_threshold)


# ----------------------------------------------------------------------------------------------
# Test images
# ----------------------------------------------------------------------------------------------


def make_image(mode, width, height, rng):
    """A random image of the given mode (content: noise, so every pixel matters)."""
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8))
    if mode == "LA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 2), dtype=np.uint8))
    if mode in ("L", "1"):
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        return image.convert("1") if mode == "1" else image
    if mode == "P":
        image = Image.frombytes("P", (width, height), rng.integers(0, 256, width * height, dtype=np.uint8).tobytes())
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        image.info["transparency"] = 7  # a tRNS-style entry: plain convert ignores it, vLLM does not
        return image
    if mode == "CMYK":
        return Image.frombytes("CMYK", (width, height), rng.integers(0, 256, width * height * 4, dtype=np.uint8).tobytes())
    if mode == "I;16":
        # 16-bit values straddling 255, so PIL's clipping conversion is exercised.
        image = Image.fromarray(rng.integers(0, 512, (height, width), dtype=np.uint16))
        assert image.mode == "I;16"
        return image
    if mode == "EXIF":
        # RGB PNG with EXIF orientation 6 ("rotate 90"), reopened lazily from bytes. The reference
        # ignores EXIF orientation; so must we.
        image = make_image("RGB", width, height, rng)
        exif = Image.Exif()
        exif[0x0112] = 6
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", exif=exif.tobytes())
        reopened = Image.open(io.BytesIO(buffer.getvalue()))
        assert reopened.getexif()[0x0112] == 6
        return reopened
    raise AssertionError(mode)


MODES = ["RGB", "RGBA", "L", "P", "CMYK", "I;16", "LA", "1", "EXIF"]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def torch_threads(request):
    """Run ours serially (1) and through its thread pool (2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def random_sizes(rng, count, side):
    """Sizes from tiny to several sides, aspect ratios up to 1:30 / 30:1."""
    sizes = [(1, 1), (1, 2), (2, 1), (side, side), (side + 1, side - 1), (3 * side, 3 * side)]
    while len(sizes) < count:
        long = int(rng.integers(1, 4 * side))
        short = max(1, int(long / rng.uniform(1, 30)))
        sizes.append((long, short) if rng.random() < 0.5 else (short, long))
    return sizes


def assert_same_as_reference(image, side, max_partition=9, covering_threshold=0.9,
                             image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), rescale_factor=1 / 255):
    """Ours equals the reference (or both refuse the image); False when both refused."""
    options = (side, max_partition, covering_threshold)
    norm = dict(image_mean=image_mean, image_std=image_std, rescale_factor=rescale_factor)
    try:
        expected, expected_grid = reference_preprocess(image, *options, image_mean, image_std, rescale_factor)
    except ValueError:
        # The reference cannot resize a crop thinner than 1/side: we must refuse it too.
        with pytest.raises(ValueError, match="would be resized"):
            preprocess_image(image, *options, **norm)
        return False
    pixel_values, grid = preprocess_image(image, *options, **norm)
    assert grid == tuple(expected_grid)
    assert pixel_values.dtype == torch.float32 and pixel_values.is_contiguous()
    assert pixel_values.shape == expected.shape
    assert (pixel_values - expected).abs().max().item() <= 1e-6
    return True


# ----------------------------------------------------------------------------------------------
# Pixel exactness
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_pixels_match_reference_small_side(mode, torch_threads):
    rng = np.random.default_rng(MODES.index(mode))
    side = 28
    compared = 0
    for width, height in random_sizes(rng, 24, side):
        compared += assert_same_as_reference(make_image(mode, width, height, rng), side)
    assert compared >= 12  # most sizes are processable; the rest must fail like the reference


@pytest.mark.parametrize("mode", MODES)
def test_pixels_match_reference_side_384(mode):
    rng = np.random.default_rng(100 + MODES.index(mode))
    # 1x1, 2x2 and 3x3 grids, a 1x3 strip, an odd-sized multi-crop image.
    for width, height in [(300, 200), (640, 480), (1000, 1000), (1000, 37), (777, 1234)]:
        assert assert_same_as_reference(make_image(mode, width, height, rng), 384)


def test_pixels_match_reference_other_options(torch_threads):
    rng = np.random.default_rng(7)
    options = [
        dict(side=28, max_partition=4, covering_threshold=0.5),
        dict(side=28, max_partition=16, covering_threshold=1.0),
        dict(side=76, max_partition=1, covering_threshold=0.9),
        dict(side=64, image_mean=(0.48145466, 0.4578275, 0.40821073),
             image_std=(0.26862954, 0.26130258, 0.27577711)),  # CLIP's, per channel
        dict(side=32, max_partition=6, covering_threshold=0.7, image_mean=(0.1, 0.2, 0.3),
             image_std=(2.0, 0.3, 0.7), rescale_factor=1 / 127),
    ]
    for option in options:
        for width, height in random_sizes(rng, 8, option["side"]):
            image = make_image(random.Random(width * height).choice(MODES), width, height, rng)
            assert_same_as_reference(image, **option)


def test_resized_size_truncates_like_the_reference():
    # int(53 / 76 * 76) == 52, not 53: the reference's float order decides the resized size.
    rng = np.random.default_rng(12)
    for width, height in [(76, 53), (53, 76), (152, 106), (760, 530)]:
        assert assert_same_as_reference(make_image("RGB", width, height, rng), 76)
    pixel_values, _ = preprocess_image(make_image("RGB", 76, 53, rng), 76)
    assert (pixel_values[0, :, 12 + 52 :] == 0).all() and (pixel_values[0, :, 12 + 51] != 0).any()


def test_exif_orientation_is_not_applied():
    rng = np.random.default_rng(3)
    image = make_image("EXIF", 900, 100, rng)
    pixel_values, grid = preprocess_image(image, 384)
    expected, expected_grid = reference_preprocess(image, 384)
    assert grid == tuple(expected_grid) and torch.equal(pixel_values, expected)
    transposed_values, transposed_grid = preprocess_image(ImageOps.exif_transpose(image), 384)
    assert transposed_grid == grid[::-1] != grid  # applying EXIF would change the grid


def test_bit_identical_to_reference_rgb():
    # The table look-up replays transformers' float operations, so not even 1 ulp differs.
    rng = np.random.default_rng(11)
    for width, height in [(640, 480), (1000, 1000), (123, 456)]:
        image = make_image("RGB", width, height, rng)
        assert torch.equal(preprocess_image(image, 384)[0], reference_preprocess(image, 384)[0])


def _preprocess_in_child(queue):
    torch.set_num_threads(2)
    image = make_image("RGB", 640, 480, np.random.default_rng(0))
    queue.put(preprocess_image(image, 384)[1])


def test_thread_pool_survives_fork():
    import multiprocessing

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        preprocess_image(make_image("RGB", 640, 480, np.random.default_rng(0)), 384)  # pool exists now
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_preprocess_in_child, args=(queue,))
        child.start()
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
            pytest.fail("preprocess_image hung in a forked child")
        assert child.exitcode == 0 and queue.get(timeout=5) == (2, 2)
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# Grid choice
# ----------------------------------------------------------------------------------------------

GRID_OPTIONS = [(384, 9, 0.9), (384, 4, 0.5), (384, 12, 0.95), (384, 9, 1.0), (76, 9, 0.9), (14, 16, 0.3), (384, 1, 0.9)]


def grid_sizes():
    sizes = set()
    # Every aspect ratio a:b with a, b in 1..20 (so 1:20 .. 20:1), at many scales.
    for a in range(1, 21):
        for b in range(1, 21):
            if math.gcd(a, b) != 1:
                continue
            for scale in (1, 2, 3, 7, 19, 40, 64, 97, 150, 256):
                sizes.add((a * scale, b * scale))
    # Every tiny size.
    sizes.update((w, h) for w in range(1, 25) for h in range(1, 25))
    # Random sizes within 1:20 .. 20:1.
    rng = random.Random(0)
    while len(sizes) < 5000:
        w = rng.randint(1, 6000)
        h = max(1, round(w / math.exp(rng.uniform(-math.log(20), math.log(20)))))
        sizes.add((w, h))
    return sorted(sizes)


@pytest.mark.parametrize("side,max_partition,covering_threshold", GRID_OPTIONS)
def test_grid_matches_reference(side, max_partition, covering_threshold):
    for width, height in grid_sizes():
        got = choose_grid(width, height, side, max_partition, covering_threshold)
        assert got == reference_grid(width, height, side, max_partition, covering_threshold), (width, height)
        assert crop_boxes(width, height, got) == reference_partition(width, height, got)


@pytest.mark.parametrize("side,max_partition,covering_threshold", [(76, 2, 0.9), (76, 3, 1.0), (14, 3, 0.9), (28, 3, 0.5)])
def test_grid_ties_follow_candidate_order(side, max_partition, covering_threshold):
    """Square images where (1, k) and (k, 1) tie on crop count AND ratio at the top of the
    reference's sort: its stable sort keeps candidate order, so (1, k) wins."""
    ties = 0
    for width in range(1, 1500):
        ranked = reference_sorted_grids(width, width, side, max_partition, covering_threshold)
        got = choose_grid(width, width, side, max_partition, covering_threshold)
        assert got == ranked[0][0], width
        (grid_a, ratio_a), (grid_b, ratio_b) = ranked[0], ranked[1]
        if ratio_a == ratio_b and grid_a[0] * grid_a[1] == grid_b[0] * grid_b[1]:
            ties += 1
            assert got[0] == 1 and grid_b == got[::-1]
    assert ties > 0
    assert choose_grid(87, 87, 76, 2, 0.9) == (1, 2)


def test_known_grids_side_384():
    assert choose_grid(1, 1, 384) == (1, 1)
    assert choose_grid(320, 240, 384) == (1, 1)
    assert choose_grid(640, 480, 384) == (2, 2)
    assert choose_grid(1000, 1000, 384) == (3, 3)
    assert crop_boxes(10, 7, (2, 3)) == [(0, 0, 3, 3), (3, 0, 6, 3), (6, 0, 10, 3),
                                         (0, 3, 3, 7), (3, 3, 6, 7), (6, 3, 10, 7)]


# ----------------------------------------------------------------------------------------------
# vLLM's built-in Ovis processor
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin_ovis():
    ovis = pytest.importorskip("vllm.transformers_utils.processors.ovis")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<image_pad>": 1}, unk_token="<unk>"))
    )
    image_processor = SiglipImageProcessorPil(
        size={"height": 384, "width": 384}, resample=Image.Resampling.BICUBIC,
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    processor = ovis.OvisProcessor(image_processor=image_processor, tokenizer=tokenizer, image_pad_token="<image_pad>")

    def run(image):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its torch.tensor(tensor) copy warns
            pixel_values, _, grid = processor.preprocess_image(
                image, max_partition=9, covering_threshold=0.9, do_convert_rgb=True, return_tensors="pt"
            )
        return pixel_values, tuple(grid.tolist())

    return run


def test_builtin_same_pixels_on_rgb(builtin_ovis):
    rng = np.random.default_rng(5)
    for width, height in [(300, 200), (640, 480), (1000, 1000)]:
        image = make_image("RGB", width, height, rng)
        theirs, their_grid = builtin_ovis(image)
        ours, grid = preprocess_image(image, 384)
        assert grid == their_grid and torch.equal(ours, theirs)


def test_builtin_differs_on_transparent_rgba(builtin_ovis):
    """vLLM composites RGBA onto white (convert_image_mode); the reference drops alpha."""
    rng = np.random.default_rng(6)
    rgba = make_image("RGBA", 640, 480, rng)  # random alpha: mostly partly transparent
    expected, expected_grid = reference_preprocess(rgba, 384)
    ours, grid = preprocess_image(rgba, 384)
    theirs, their_grid = builtin_ovis(rgba)
    assert grid == their_grid == tuple(expected_grid)
    assert torch.equal(ours, expected)
    assert (theirs - expected).abs().max().item() > 0.5


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(0, 0), (0, 10), (10, 0)])
def test_zero_size_image(size):
    with pytest.raises(ValueError, match="zero size"):
        preprocess_image(Image.new("RGB", size), 384)
    with pytest.raises(ValueError, match="zero size"):
        choose_grid(*size, 384)


def test_image_over_pixel_cap():
    with pytest.raises(ValueError, match=r"101x100 = 10100 pixels.*10000"):
        preprocess_image(Image.new("RGB", (101, 100)), 384, max_pixels=10_000)
    preprocess_image(Image.new("RGB", (100, 100)), 384, max_pixels=10_000)  # at the cap: fine
    assert DEFAULT_MAX_PIXELS == 8192 * 8192
    # The default cap is checked before any conversion ("1" keeps this one cheap to allocate).
    with pytest.raises(ValueError, match=f"{DEFAULT_MAX_PIXELS}"):
        preprocess_image(Image.new("1", (8192, 8193)), 384)


def test_too_thin_to_resize():
    # 1x1000 resizes to int(1/1000*384) = 0 px wide: the reference fails, we refuse clearly.
    image = Image.new("RGB", (1, 1000))
    with pytest.raises(Exception):
        reference_preprocess(image, 384)
    with pytest.raises(ValueError, match="would be resized to 0x384"):
        preprocess_image(image, 384)


BAD_GRID_OPTIONS = [
    dict(max_partition=0),
    dict(max_partition=-3),
    dict(max_partition=2.5),
    dict(covering_threshold=0.0),
    dict(covering_threshold=-0.1),
    dict(covering_threshold=1.01),
    dict(covering_threshold=float("nan")),
    dict(side=0),
]


@pytest.mark.parametrize("bad", BAD_GRID_OPTIONS, ids=str)
def test_bad_grid_options(bad):
    options = {"side": 384, **bad}
    with pytest.raises(ValueError):
        preprocess_image(Image.new("RGB", (10, 10)), **options)
    with pytest.raises(ValueError):
        choose_grid(10, 10, **options)


@pytest.mark.parametrize("bad", [dict(image_std=(0.5, 0.0, 0.5)), dict(image_mean=(0.5, 0.5))], ids=str)
def test_bad_normalization_options(bad):
    with pytest.raises(ValueError):
        preprocess_image(Image.new("RGB", (10, 10)), 384, **bad)


def test_not_an_image():
    with pytest.raises(TypeError):
        preprocess_image(np.zeros((10, 10, 3), np.uint8), 384)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_processor_sends_pixels_in_the_model_dtype(tiny_checkpoint, dtype):
    """The processor casts the pixels to the model's dtype (the model's first step), so its
    caches and the engine get half the bytes in bf16, with exactly the values the model uses."""
    from ovis_vllm import engine
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    engine.register()
    config = ModelConfig(model=str(tiny_checkpoint), dtype=dtype)
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    rng = np.random.default_rng()
    images = [make_image("RGB", 228, 152, rng), make_image("RGB", 40, 70, rng)]
    out = processor._call_hf_processor({"images": images}, {})
    expected = [preprocess_image(image, 76) for image in images]
    assert torch.equal(out["pixel_values"], torch.cat([px for px, _ in expected]).to(config.dtype))
    assert out["grids"].tolist() == [list(grid) for _, grid in expected]
