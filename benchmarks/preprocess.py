"""Images/s of engine.preprocess vs vLLM's built-in Ovis processor, on the same images.

Three image sizes that give 1x1, 2x2 and 3x3 crop grids at side 384 (random RGB noise; PIL's
resize cost does not depend on content). Each setting runs in its own process, so thread
environment variables take effect before torch / OpenCV start:
  * threads=1: OMP/MKL/OpenBLAS/OpenCV thread env = 1 and torch.set_num_threads(1);
  * threads=default: whatever torch picks on this machine.
Ours and the built-in alternate within every round, so load changes hit both alike. Each case
also records the max abs pixel difference between the two (asserted <= 1e-6).

    .venv/bin/python -m benchmarks.preprocess [--out benchmarks/out/] [--rounds 20] [--chart]

Writes preprocess.json and preprocess.png into --out; --chart also writes the chart to
docs/charts/preprocess.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, command_line, machine_info, out_dir, pyplot, save_chart, write_json

SIDE = 384
# (label, width, height): sizes whose grid at side 384 is 1x1, 2x2 and 3x3 (checked at run time).
CASES = [("1x1", 320, 240, (1, 1)), ("2x2", 640, 480, (2, 2)), ("3x3", 1000, 1000, (3, 3))]
THREAD_ENV = ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENCV_FOR_THREADS_NUM"]


def builtin_preprocessor(side: int = SIDE):
    """vLLM's OvisProcessor.preprocess_image with a SigLIP image processor (side, bicubic, 0.5/0.5).

    transformers 5 falls back from SiglipImageProcessor to its PIL backend when torchvision is
    missing; we name the PIL class so the comparison is the same whatever is installed. The
    processor needs a tokenizer only for the image-pad token id: a 2-word one does.
    """
    import warnings

    from PIL import Image
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from transformers.models.siglip import SiglipImageProcessorPil
    from vllm.transformers_utils.processors.ovis import OvisProcessor

    image_processor = SiglipImageProcessorPil(
        size={"height": side, "width": side}, resample=Image.Resampling.BICUBIC,
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<image_pad>": 1}, unk_token="<unk>"))
    )
    processor = OvisProcessor(image_processor=image_processor, tokenizer=tokenizer, image_pad_token="<image_pad>")
    warnings.filterwarnings("ignore", message="To copy construct from a tensor")  # its torch.tensor(tensor)

    def run(image):
        pixel_values, _, grid = processor.preprocess_image(
            image, max_partition=9, covering_threshold=0.9, do_convert_rgb=True, return_tensors="pt"
        )
        return pixel_values, tuple(grid.tolist())

    return run


def reference_resizes(image, side: int) -> None:
    """The PIL work any exact implementation has to do, done serially: one crop + bicubic resize
    per crop (and the whole image first when there are several). Its rate bounds what a single
    thread can reach."""
    from PIL import Image

    from ovis_vllm.engine.preprocess import _resized_size, choose_grid, crop_boxes

    boxes = crop_boxes(*image.size, choose_grid(*image.size, side))
    for box in ([None] + boxes) if len(boxes) > 1 else boxes:
        crop = image if box is None else image.crop(box)
        crop.resize(_resized_size(*crop.size, side), Image.Resampling.BICUBIC)


def child(threads: str, rounds: int, images_per_case: int, result_path: str) -> None:
    """Measure one thread setting; write its results as JSON to result_path."""
    if threads == "1":
        import cv2  # vLLM imports OpenCV; keep its pool to one thread as well

        cv2.setNumThreads(1)
    import numpy as np
    import torch
    from PIL import Image
    from tqdm import tqdm
    from ovis_vllm.engine.preprocess import choose_grid, preprocess_image

    if threads == "1":
        torch.set_num_threads(1)
    builtin = builtin_preprocessor()
    ours = lambda image: preprocess_image(image, SIDE)  # noqa: E731

    resize_only = lambda image: reference_resizes(image, SIDE)  # noqa: E731
    rng = np.random.default_rng(0)
    results = {"torch_threads": torch.get_num_threads(), "cases": {}}
    for label, width, height, grid in CASES:
        assert choose_grid(width, height, SIDE) == grid, (label, width, height)
        images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
                  for _ in range(images_per_case)]
        # Same pixels: ours vs the built-in on every image (also the warm-up).
        max_diff = 0.0
        for image in images:
            (a, grid_a), (b, grid_b) = ours(image), builtin(image)
            assert grid_a == grid_b == grid and a.shape == b.shape
            max_diff = max(max_diff, (a - b).abs().max().item())
        assert max_diff <= 1e-6, f"{label}: ours and the built-in differ by {max_diff}"

        elapsed = {"ours": 0.0, "builtin": 0.0, "resize_only": 0.0}
        for _ in tqdm(range(rounds), desc=f"threads={threads} {label} {width}x{height}", file=sys.stderr):
            for name, fn in (("ours", ours), ("builtin", builtin), ("resize_only", resize_only)):
                start = time.perf_counter()
                for image in images:
                    fn(image)
                elapsed[name] += time.perf_counter() - start
        count = rounds * len(images)
        results["cases"][label] = {
            "width": width, "height": height, "grid": list(grid), "crops": grid[0] * grid[1] + (grid != (1, 1)),
            "images": count,
            "ours_images_per_s": count / elapsed["ours"],
            "builtin_images_per_s": count / elapsed["builtin"],
            "speedup": elapsed["builtin"] / elapsed["ours"],
            "serial_pil_resize_only_images_per_s": count / elapsed["resize_only"],
            "max_abs_diff": max_diff,
        }
    Path(result_path).write_text(json.dumps(results))


def chart(report: dict, path: Path, committed: bool = False) -> list[Path]:
    plt = pyplot()
    settings = report["settings"]
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4.2), squeeze=False)
    for ax, (setting, result) in zip(axes[0], settings.items()):
        labels = list(result["cases"])
        x = range(len(labels))
        ours = [result["cases"][k]["ours_images_per_s"] for k in labels]
        theirs = [result["cases"][k]["builtin_images_per_s"] for k in labels]
        floor = [result["cases"][k]["serial_pil_resize_only_images_per_s"] for k in labels]
        ax.bar([i - 0.27 for i in x], theirs, 0.27, label="vLLM built-in OvisProcessor", color="#999999")
        ax.bar(list(x), ours, 0.27, label="engine.preprocess", color="#1f77b4")
        ax.bar([i + 0.27 for i in x], floor, 0.27, label="PIL crop+resize alone, serial", color="white",
               edgecolor="#1f77b4", hatch="//")
        for i, k in enumerate(labels):
            ax.text(i, ours[i] * 1.03, f"{result['cases'][k]['speedup']:.2f}x", ha="center", va="bottom")
        ax.set_ylim(min(theirs + ours + floor) / 2, max(theirs + ours + floor) * 2)
        ax.set_xticks(list(x), [f"{k}\n{result['cases'][k]['width']}x{result['cases'][k]['height']}" for k in labels])
        ax.set_yscale("log")
        ax.set_ylabel("images / s (log)")
        ax.set_title(f"threads={setting} (torch threads {result['torch_threads']})")
        ax.legend(fontsize=8)
    fig.suptitle(f"Ovis image preprocessing, side {SIDE} - {report['machine']['cpu']}", fontsize=10)
    return save_chart(fig, path, committed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder (default benchmarks/out/)")
    parser.add_argument("--chart", action="store_true", help="also write docs/charts/preprocess.png")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per case and setting")
    parser.add_argument("--images", type=int, default=4, help="distinct images per case")
    parser.add_argument("--child", nargs=2, metavar=("THREADS", "RESULT_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.rounds, args.images, args.child[1])
        return

    out = out_dir(args.out)
    report = {"command": command_line(__spec__.name, None), "machine": machine_info(), "side": SIDE, "settings": {}}
    for threads in ("1", "default"):
        env = dict(os.environ)
        if threads == "1":
            env.update({name: "1" for name in THREAD_ENV})
        with tempfile.NamedTemporaryFile(suffix=".json") as result:
            subprocess.run([sys.executable, "-m", "benchmarks.preprocess", "--rounds", str(args.rounds),
                            "--images", str(args.images), "--child", threads, result.name],
                           env=env, check=True, cwd=REPO)
            report["settings"][threads] = json.loads(Path(result.name).read_text())

    write_json(out / "preprocess.json", report)
    charts = chart(report, out / "preprocess.png", args.chart)
    print(f"CPU: {report['machine']['cpu']} ({report['machine']['cpus']} CPUs)")
    print(f"{'threads':>8} {'grid':>5} {'size':>10} {'ours img/s':>11} {'built-in img/s':>15} {'speedup':>8} "
          f"{'max|diff|':>10} {'PIL-only img/s':>15}")
    for threads, result in report["settings"].items():
        for label, r in result["cases"].items():
            print(f"{threads:>8} {label:>5} {r['width']:>4}x{r['height']:<5} {r['ours_images_per_s']:>11.1f} "
                  f"{r['builtin_images_per_s']:>15.1f} {r['speedup']:>7.2f}x {r['max_abs_diff']:>10.2g} "
                  f"{r['serial_pil_resize_only_images_per_s']:>15.1f}")
    print("wrote", out / "preprocess.json", *charts)


if __name__ == "__main__":
    main()
