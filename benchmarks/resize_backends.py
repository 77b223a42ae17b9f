"""What the SigLIP resize backend changes for Ovis2.5: transformers' PIL image processor (what the
reference ran, transformers 4.51; ours is bit-exact with it) against its torchvision one (what
transformers picks when torchvision is installed, as on a CUDA install of vLLM, and so what
vLLM's built-in Ovis2_5 preprocesses with there).

It needs torchvision, which cannot sit beside vLLM's CPU torch, so it runs in a venv of its own
with the same transformers and no vLLM, on a checkpoint generated beforehand, from a folder that
links only tests/ and benchmarks/ (from the repository root, its kernels/ folder would shadow
Hugging Face's `kernels` package, which transformers probes):

    .venv/bin/python -m ovis_vllm.engine.checkpoints /tmp/ovis25 --preset ovis2.5-2b --seed 0
    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 \\
        transformers==5.19.0 safetensors pillow numpy
    mkdir /tmp/rb && ln -s "$PWD/tests" "$PWD/benchmarks" /tmp/rb/
    cd /tmp/rb && /tmp/tv/bin/python -m benchmarks.resize_backends /tmp/ovis25

For images of several sizes and kinds, each resized by the reference's smart_resize rule and
normalized both ways: the largest and mean |difference| of the pixel values the vision tower
gets (normalized to [-1, 1]), and the largest |difference| of the prompt log-probabilities of the
independent reference (tests/ovis25_reference.py) on the same prompt. Writes resize_backends.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from tests import ovis25_reference
from tests.ovis25_reference import ReferenceOvis25, content_items, make_image_processor

SIZES = [(500, 300), (1920, 1080), (640, 480), (64, 900), (4000, 3000)]


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour fields with edges, closer to a photograph than uniform noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    return image.filter(ImageFilter.EDGE_ENHANCE_MORE)


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def torchvision_processor(pil_processor):
    """transformers' torchvision SigLIP processor with the PIL one's settings."""
    from transformers.models.siglip.image_processing_siglip import SiglipImageProcessor

    keys = ("do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")
    processor = SiglipImageProcessor(**{k: getattr(pil_processor, k) for k in keys})
    assert type(processor).__module__.endswith("image_processing_siglip"), type(processor)
    return processor


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="an Ovis2.5 checkpoint (python -m ovis_vllm.engine.checkpoints)")
    ap.add_argument("--out", default="resize_backends.json")
    args = ap.parse_args(argv)
    import torchvision
    import transformers

    reference = ReferenceOvis25(args.checkpoint)
    pil = make_image_processor(args.checkpoint)
    fast = torchvision_processor(pil)
    raw = reference.format_conversation([("user", content_items("<image>\nDescribe the image."))])
    rows = []
    for kind, make in (("photo-like", photo_like), ("noise", noise)):
        for i, (width, height) in enumerate(SIZES):
            image = make(width, height, i)
            results = {}
            for name, processor in (("pil", pil), ("torchvision", fast)):
                reference.image_processor = processor
                ovis25_reference.make_image_processor = lambda config: config  # take either kind
                pixels, grid = reference.preprocess_image(image)
                embeds, ids = reference.merged_embeddings(raw, [image])
                logprobs = torch.log_softmax(reference.logits(embeds), dim=-1)
                positions = [i for i in range(1, len(ids)) if ids[i] >= 0]
                results[name] = (pixels.float(), grid, torch.tensor([logprobs[i - 1, ids[i]].item() for i in positions]))
            (p_pil, g_pil, l_pil), (p_tv, g_tv, l_tv) = results["pil"], results["torchvision"]
            assert torch.equal(g_pil, g_tv)
            diff = (p_pil - p_tv).abs()
            row = {"image": kind, "size": f"{width}x{height}",
                   "resized": f"{int(g_pil[0, 2]) * 16}x{int(g_pil[0, 1]) * 16}",
                   "max_abs_pixel_diff": diff.max().item(), "mean_abs_pixel_diff": diff.mean().item(),
                   # at least one 8-bit level apart (1/255 before normalizing by std 0.5)
                   "share_differing_by_a_level": (diff > 1e-3).float().mean().item(),
                   "max_abs_prompt_logprob_diff": (l_pil - l_tv).abs().max().item()}
            rows.append(row)
            print(f"{kind:10} {row['size']:>9} -> {row['resized']:>9}: pixels max {row['max_abs_pixel_diff']:.4f} "
                  f"mean {row['mean_abs_pixel_diff']:.6f} ({100 * row['share_differing_by_a_level']:.4f}% a level apart); "
                  f"prompt log-probs max {row['max_abs_prompt_logprob_diff']:.2e}", flush=True)
    result = {"rows": rows, "torch": torch.__version__, "torchvision": torchvision.__version__,
              "transformers": transformers.__version__, "checkpoint": str(args.checkpoint),
              "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.resize_backends", *sys.argv[1:]])}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
