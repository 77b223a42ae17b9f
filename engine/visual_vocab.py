"""The visual vocabulary every Ovis generation shares: head -> LayerNorm -> softmax -> @ VTE.

    features -> head.0 Linear (no bias) -> logits [N, Vh]
             -> [LayerNorm (head.1) -> softmax -> @ VTE rows [0, Vh)]   (kernels/: fused)
    indicators -> VTE rows [Vh, V) as plain look-ups

Vh = V - (indicator rows): 5 for Ovis1.6/2 (engine/model.py), 4 for Ovis2.5/2.6
(engine/model_ovis2_5.py). Under tensor parallelism every rank holds 1/tp of the head, the
LayerNorm and the softmax rows of the VTE (vLLM's built-in classes replicate them), and the
kernel's vocabulary-parallel form combines the slices. On CPU the head and VTE are packed for
oneDNN after loading, as vLLM does for its own Linear layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)

from ovis_vllm.kernels import (
    DEFAULT_CHUNK_MB,
    PackedMatrix,
    check_impl,
    onednn_unavailable,
    visual_embedding,
    vocab_parallel_visual_embedding,
)


def visual_embed_options(vllm_config: VllmConfig) -> tuple[str, float]:
    """The visual-embedding path and the CPU path's chunk budget (MiB), from vLLM's
    `--additional-config '{"ovis_visual_embed": "auto", "ovis_visual_embed_chunk_mb": 64}'`;
    checked here, so a typo stops the server at start-up."""
    extra = vllm_config.additional_config if isinstance(vllm_config.additional_config, dict) else {}
    impl = extra.get("ovis_visual_embed", "auto")
    check_impl(impl)
    chunk_mb = extra.get("ovis_visual_embed_chunk_mb", DEFAULT_CHUNK_MB)
    if not isinstance(chunk_mb, (int, float)) or isinstance(chunk_mb, bool) or chunk_mb <= 0:
        raise ValueError(f"ovis_visual_embed_chunk_mb must be a positive number of MiB, not {chunk_mb!r}")
    return impl, float(chunk_mb)


@dataclass(frozen=True)
class VocabShard:
    """One tensor-parallel rank's slice of the Vh softmax columns of the visual vocabulary.

    Slices are ceil(Vh / ranks) wide. The last one may hold fewer real columns (`valid`); its
    padding rows stay zero and are sliced away before any use, so they never get probability."""
    start: int
    size: int
    valid: int

    @classmethod
    def of(cls, vocab: int, rank: int, ranks: int) -> "VocabShard":
        size = -(-vocab // ranks)
        start = rank * size
        return cls(start, size, max(0, min(size, vocab - start)))

    def load(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """weight_loader: this slice of the checkpoint's full (unsharded) tensor."""
        param.data.zero_()
        param.data[: self.valid].copy_(loaded[self.start:self.start + self.valid])


def _sharded_param(shard: VocabShard, *shape: int) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shard.size, *shape), requires_grad=False)
    param.weight_loader = shard.load
    return param


def _pack_for_cpu(param: nn.Parameter, valid: int, transpose: bool) -> PackedMatrix | None:
    """The first `valid` rows of `param` (transposed if asked) packed for oneDNN, with `param`
    itself freed (dtype kept, shape [0, ...]); None, and `param` kept, where packing is not
    available (CUDA, fp16, no vLLM CPU ops)."""
    weight = param[:valid]
    if not PackedMatrix.supported(weight):
        return None
    packed = PackedMatrix(weight.t() if transpose else weight)
    param.data = param.data.new_empty((0, *param.shape[1:]))
    return packed


class ShardedHeadLinear(nn.Module):
    """`head.0`: Linear(features -> Vh, no bias), rows split along the visual vocabulary.

    On CPU its weight is packed for oneDNN after loading, as vLLM does for its own Linear
    layers (and so for the built-in Ovis head)."""

    def __init__(self, in_features: int, shard: VocabShard):
        super().__init__()
        self.shard = shard
        self.weight = _sharded_param(shard, in_features)
        self.packed: PackedMatrix | None = None

    def pack_for_cpu(self) -> None:
        self.packed = _pack_for_cpu(self.weight, self.shard.valid, transpose=True)

    @property
    def weight_shape(self) -> tuple[int, int]:
        """[rows, in_features] held by this rank, packed or not."""
        return (self.packed.shape[1], self.packed.shape[0]) if self.packed else tuple(self.weight.shape)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.matmul(features)
        return F.linear(features, self.weight[: self.shard.valid])


class ShardedLayerNorm(nn.Module):
    """`head.1`: the LayerNorm's weight and bias over this rank's columns. It is applied inside
    the visual-embedding kernel, with statistics over the whole row."""

    def __init__(self, shard: VocabShard, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = _sharded_param(shard)
        self.bias = _sharded_param(shard)


class ShardedVTE(nn.Module):
    """`vte.weight` [V, D]: the softmax rows [0, Vh) split like the head, the indicator rows
    [Vh, V) (plain look-ups) on every rank."""

    def __init__(self, shard: VocabShard, vocab: int, hidden: int, num_indicators: int):
        super().__init__()
        self.shard = shard
        self.rows = _sharded_param(shard, hidden)
        self.indicators = nn.Parameter(torch.empty(num_indicators, hidden), requires_grad=False)
        self.vocab = vocab
        self.num_indicators = num_indicators
        self.packed: PackedMatrix | None = None

    def pack_for_cpu(self) -> None:
        """Single rank on CPU: the softmax rows go to oneDNN once (kernels.PackedMatrix), the
        chunked CPU path multiplies by them. (The tensor-parallel pieces keep the tensor.)"""
        self.packed = _pack_for_cpu(self.rows, self.shard.valid, transpose=False)

    @property
    def table(self) -> "torch.Tensor | PackedMatrix":
        """The rank's Vh softmax rows, as the visual-embedding kernel takes them."""
        return self.packed if self.packed is not None else self.rows[: self.shard.valid]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        for name, tensor in weights:
            assert name == "weight" and tensor.shape[0] == self.vocab, (name, tensor.shape)
            self.shard.load(self.rows, tensor[: self.vocab - self.num_indicators])
            self.indicators.data.copy_(tensor[self.vocab - self.num_indicators:])
        return {"rows", "indicators"}


class VisualVocabulary:
    """This rank's part of a checkpoint's visual vocabulary (V rows, the last `num_indicators`
    of them indicators) and the one place its embedding is computed. The modules it makes sit
    where the checkpoint's tensors are named (`visual_tokenizer.head`, `vte`)."""

    def __init__(self, vllm_config: VllmConfig, vocab: int, num_indicators: int):
        self.vocab, self.num_indicators = vocab, num_indicators
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        self.shards = [VocabShard.of(vocab - num_indicators, r, self.tp_size) for r in range(self.tp_size)]
        if self.shards[-1].valid == 0:
            raise ValueError(f"visual vocabulary {vocab} is too small for {self.tp_size} ranks")
        self.impl, self.chunk_mb = visual_embed_options(vllm_config)

    @property
    def shard(self) -> VocabShard:
        return self.shards[self.tp_rank]

    def make_head(self, in_features: int) -> nn.Sequential:
        """`head`: Linear(in_features -> Vh) and the LayerNorm the kernel applies."""
        return nn.Sequential(ShardedHeadLinear(in_features, self.shard), ShardedLayerNorm(self.shard))

    def make_vte(self, hidden: int) -> ShardedVTE:
        return ShardedVTE(self.shard, self.vocab, hidden, self.num_indicators)

    def embed(self, logits: torch.Tensor, head: nn.Sequential, vte: ShardedVTE) -> torch.Tensor:
        """softmax(LayerNorm(logits)) @ VTE rows for this rank's logits [N, shard.size]: the
        full [N, hidden] embeddings, on every rank."""
        ln, shard = head[1], self.shard
        x, w, b = logits[:, :shard.valid], ln.weight[:shard.valid], ln.bias[:shard.valid]
        if self.tp_size == 1:
            return visual_embedding(x, w, b, vte.table, ln.eps, impl=self.impl, chunk_mb=self.chunk_mb)
        return vocab_parallel_visual_embedding(
            x, w, b, vte.rows[:shard.valid], ln.eps,
            widths=[s.valid for s in self.shards], rank=self.tp_rank,
            all_gather=lambda t: tensor_model_parallel_all_gather(t, dim=-1),
            all_reduce=tensor_model_parallel_all_reduce, chunk_mb=self.chunk_mb)

    def pack_for_cpu(self, head: nn.Sequential, vte: ShardedVTE) -> None:
        """After loading: the head's weight, and on a single rank the VTE's softmax rows, go to
        oneDNN once where it can take them."""
        head[0].pack_for_cpu()
        if self.tp_size == 1 and self.impl in ("auto", "chunked"):
            vte.pack_for_cpu()

    def paths(self, head: nn.Sequential, vte: ShardedVTE) -> str:
        """Which visual-embedding path and GEMMs this model runs, and why (logged at load)."""
        dtype, device = vte.indicators.dtype, vte.indicators.device
        if self.impl == "unfused":
            path = "vLLM's unfused way (ovis_visual_embed=unfused)"
        elif self.tp_size > 1:
            path = f"vocabulary-parallel over {self.tp_size} ranks"
        elif self.impl == "triton" or (self.impl == "auto" and device.type == "cuda"):
            path = "fused Triton kernels"
        else:
            path = "chunked CPU path"
        if device.type != "cpu":
            return f"{path}, {dtype}"
        head_gemm = "oneDNN, packed" if head[0].packed is not None else "torch"
        vte_gemm = "oneDNN, packed" if vte.packed is not None else "torch"
        why = onednn_unavailable(dtype)
        return (f"{path}, {dtype}; head GEMM on {head_gemm}, VTE product on {vte_gemm}"
                + (f" ({why})" if why else ""))

