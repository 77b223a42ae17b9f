"""Per-rank memory of the visual head and VTE, and communication per image, under tensor parallel.

Builds the model's own sharded modules (engine/model.py) on the meta device at Ovis1.6 sizes
(head 4608 -> 65531, LayerNorm 65531, VTE 65536 x 3584, bf16) for each TP size and compares
them with vLLM's built-in Ovis, which replicates both on every rank.

    python -m benchmarks.tp_memory [--tp 1 2 4 8] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import out_dir, write_json
from ovis_vllm.engine.visual_vocab import ShardedHeadLinear, ShardedLayerNorm, ShardedVTE, VocabShard
from ovis_vllm.engine.placeholders import NUM_INDICATORS

VISUAL_VOCAB, HIDDEN, HEAD_IN = 65536, 3584, 1152 * 4
TOKENS_9_CROPS = 1960  # one 9-crop image: 10 crops x 196 visual tokens
BYTES = 2  # bf16 weights


def module_bytes(*modules: torch.nn.Module) -> int:
    return sum(p.numel() * BYTES for m in modules for p in m.parameters())


def row(tp: int) -> dict:
    vh = VISUAL_VOCAB - NUM_INDICATORS
    shard = VocabShard.of(vh, 0, tp)  # rank 0 holds the widest slice
    with torch.device("meta"):
        ours = module_bytes(ShardedHeadLinear(HEAD_IN, shard), ShardedLayerNorm(shard),
                            ShardedVTE(shard, VISUAL_VOCAB, HIDDEN, NUM_INDICATORS))
    builtin = (vh * HEAD_IN + 2 * vh + VISUAL_VOCAB * HIDDEN) * BYTES
    # Per image, each rank: all-gather of LN moments and softmax stats (fp32 [N, 2] from every
    # rank, twice) and one all-reduce of the fp32 [N, D] rescaled product (a ring all-reduce
    # sends 2 (tp-1)/tp of it).
    gathers = 2 * TOKENS_9_CROPS * 2 * 4 * tp if tp > 1 else 0
    all_reduce = 2 * (tp - 1) / tp * TOKENS_9_CROPS * HIDDEN * 4
    return {"tp": tp, "ours_per_rank_MiB": ours / 2**20, "builtin_per_rank_MiB": builtin / 2**20,
            "ratio": ours / builtin, "comm_per_image_MiB": (gathers + all_reduce) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--out", help="output folder (default benchmarks/out/)")
    args = ap.parse_args()
    rows = [row(tp) for tp in args.tp]
    print("| TP | head+LN+VTE per rank (ours) | built-in (replicated) | ours / built-in | sent per rank per 9-crop image |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tp']} | {r['ours_per_rank_MiB']:.1f} MiB | {r['builtin_per_rank_MiB']:.1f} MiB | "
              f"{r['ratio']:.3f} | {r['comm_per_image_MiB']:.1f} MiB |")
    write_json(out_dir(args.out) / "tp_memory.json", rows)


if __name__ == "__main__":
    main()
