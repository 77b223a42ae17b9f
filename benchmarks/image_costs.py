"""What one realistic image costs the API server: decode + preprocess, ours vs vLLM's built-in,
against the floor any exact implementation has.

    python -m benchmarks.image_costs [--rounds 5] [--side 384] [--out DIR]

Images (made here, deterministic): a phone photo (4032x3024 JPEG, quality 90), a screenshot
(1920x1080 PNG, flat colours and text-like strokes) and a document scan (2480x3508, greyscale
PNG). Per image and round, interleaved:
  ours      our media connector's decode (no EXIF rotation, no mode conversion) +
            engine.preprocess.preprocess_image (RGB conversion, crops, resizes, normalization)
  built-in  vLLM's default decode (ImageMediaIO: mode converted to RGB) + vLLM's
            OvisProcessor.preprocess_image with transformers' SigLIP processor
  floor     PIL decode + the reference's crops and bicubic resizes, serial: the work no exact
            implementation can skip
Times are medians over rounds, in the process's default threads (as the server runs).
Writes image_costs.json to --out.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
from PIL import Image, ImageDraw

from benchmarks.common import command_line, machine_info, out_dir, write_json
from benchmarks.preprocess import builtin_preprocessor, reference_resizes


def photo() -> bytes:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (3024 // 16, 4032 // 16, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(base).resize((4032, 3024), Image.BILINEAR)) // 4 * 3
    pixels = pixels + rng.integers(0, 64, pixels.shape, dtype=np.uint8)  # sensor-like noise
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def screenshot() -> bytes:
    rng = np.random.default_rng(2)
    image = Image.new("RGB", (1920, 1080), (246, 246, 246))
    draw = ImageDraw.Draw(image)
    for _ in range(60):  # windows, panels and buttons
        x, y = int(rng.integers(0, 1800)), int(rng.integers(0, 1000))
        draw.rectangle([x, y, x + int(rng.integers(40, 600)), y + int(rng.integers(20, 300))],
                       fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    for row in range(40, 1080, 22):  # lines of text
        draw.text((int(rng.integers(10, 400)), row), "lorem ipsum dolor sit amet " * 4, fill=(20, 20, 20))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def scan() -> bytes:
    rng = np.random.default_rng(3)
    page = Image.new("L", (2480, 3508), 250)
    draw = ImageDraw.Draw(page)
    for row in range(200, 3300, 48):
        for col in range(180, 2300, 14):
            if rng.random() < 0.8:
                draw.line([col, row, col + 8, row + int(rng.integers(-20, 20))], fill=30, width=3)
    noisy = np.asarray(page).astype(np.int16) + rng.integers(-12, 12, (3508, 2480))
    buf = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


IMAGES = {"photo 4032x3024 JPEG": photo, "screenshot 1920x1080 PNG": screenshot,
          "scan 2480x3508 PNG (grey)": scan}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--side", type=int, default=384, help="crop side (384: Ovis1.6; 448: Ovis2)")
    ap.add_argument("--out", help="output folder (default benchmarks/out/)")
    args = ap.parse_args(argv)

    from vllm.multimodal.media.image import ImageMediaIO

    from ovis_vllm.engine.media import ReferenceImageMediaIO
    from ovis_vllm.engine.preprocess import preprocess_image

    ours_io, builtin_io = ReferenceImageMediaIO(image_mode=None), ImageMediaIO(image_mode="RGB")
    builtin = builtin_preprocessor(args.side)

    def decode(data):
        image = Image.open(io.BytesIO(data))
        image.load()
        return image

    paths = {
        "ours": lambda data: preprocess_image(ours_io.load_bytes(data).media, args.side),
        "built-in": lambda data: builtin(builtin_io.load_bytes(data).media),
        "floor": lambda data: reference_resizes(decode(data), args.side),
        "decode only": decode,
    }
    rows = []
    for name, make in IMAGES.items():
        data = make()
        (a, grid), (b, grid_b) = paths["ours"](data), paths["built-in"](data)
        same = grid == grid_b and a.shape == b.shape and (a - b).abs().max().item() <= 1e-6
        times = {path: [] for path in paths}
        for _ in range(args.rounds):
            for path, fn in paths.items():
                start = time.perf_counter()
                fn(data)
                times[path].append(time.perf_counter() - start)
        ms = {path: 1000 * statistics.median(t) for path, t in times.items()}
        rows.append({"image": name, "bytes": len(data), "grid": list(grid), "same_pixels": same,
                     **{f"{path}_ms": round(v, 1) for path, v in ms.items()},
                     "ours_over_floor": round(ms["ours"] / ms["floor"], 3),
                     "builtin_over_ours": round(ms["built-in"] / ms["ours"], 3)})

    print(f"\n{'image':28} {'MB':>5} {'grid':>5} {'decode':>7} {'floor':>7} {'ours':>7} {'built-in':>9} "
          f"{'ours/floor':>10} {'built-in/ours':>13} same")
    for r in rows:
        print(f"{r['image']:28} {r['bytes'] / 1e6:>5.1f} {r['grid'][0]}x{r['grid'][1]:<3} {r['decode only_ms']:>7.1f} "
              f"{r['floor_ms']:>7.1f} {r['ours_ms']:>7.1f} {r['built-in_ms']:>9.1f} {r['ours_over_floor']:>10.2f} "
              f"{r['builtin_over_ours']:>13.2f} {r['same_pixels']}")
    result = {"command": command_line(__spec__.name, argv), "machine": machine_info(), "side": args.side,
              "rounds": args.rounds, "rows": rows}
    out = out_dir(args.out)
    write_json(out / "image_costs.json", result)
    print("wrote", out / "image_costs.json")
    return result


if __name__ == "__main__":
    main()
