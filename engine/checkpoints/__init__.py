"""Checkpoints with random weights, shaped like AIDC-AI's published ones, for tests and benchmarks.

Model hubs are out of reach on our CI machines, so every test builds its own checkpoint; the
server's embedded default model is one too. Nothing here serves: the modules beside this one
write files.
  ovis.py               Ovis1.6 / Ovis2 presets ("Ovis" architecture)
  ovis2_5.py            Ovis2.5 / Ovis2.6 presets (dense and MoE)
  tokenizer_mirrors.py  small tokenizers of the published checkpoints' kinds (Gemma, Llama 3,
                        Qwen2, Qwen3), special tokens at their real ids, no `<image>` token
  lora_adapters.py      PEFT adapters as ms-swift writes them, and their merge

    python -m ovis_vllm.engine.checkpoints OUT_DIR --preset ovis1.6-llama3.2-3b --seed 0
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .ovis import PRESETS, Preset, write_ovis_checkpoint
from .ovis2_5 import OVIS2_5_PRESETS, Ovis25Preset, write_ovis2_5_checkpoint


def write_checkpoint(out_dir: str | os.PathLike, preset: str | Preset | Ovis25Preset = "tiny", seed: int = 0,
                     **overrides) -> Path:
    """Write a complete checkpoint directory of any preset and return its path."""
    if isinstance(preset, Ovis25Preset) or preset in OVIS2_5_PRESETS:
        return write_ovis2_5_checkpoint(out_dir, preset, seed, **overrides)
    return write_ovis_checkpoint(out_dir, preset, seed, **overrides)


def default_model_dir() -> Path:
    """The embedded default model: a `tiny` checkpoint generated on first use and cached."""
    cache = Path(os.environ.get("OVIS_CACHE_DIR", Path.home() / ".cache" / "ovis-vllm"))
    path = cache / "ovis1.6-gemma2-tiny-seed0-v2"  # v2: the published config layout
    if not (path / "model.safetensors").exists():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        write_checkpoint(tmp, "tiny", seed=0)
        try:
            tmp.rename(path)
        except OSError:  # another process won the race; its copy is identical
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> None:
    from . import ovis, ovis2_5

    ap = argparse.ArgumentParser(prog="python -m ovis_vllm.engine.checkpoints",
                                 description="\n\n".join((__doc__, ovis.__doc__, ovis2_5.__doc__)),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--preset", choices=sorted(PRESETS) + sorted(OVIS2_5_PRESETS), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="weight dtype (default: the preset's)")
    args = ap.parse_args(argv)
    overrides = {"dtype": args.dtype} if args.dtype else {}
    path = write_checkpoint(args.out_dir, args.preset, args.seed, **overrides)
    print(f"wrote {args.preset} Ovis checkpoint (seed {args.seed}) to {path}")
