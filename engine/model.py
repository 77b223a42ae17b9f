"""Ovis1.6 and Ovis2 for vLLM, computing what the reference model computes (docs/reference.md).

    pixels -> SigLIP / AIMv2 (last layer, before the final norm) -> hidden_stride merge
           -> head Linear -> [LayerNorm -> softmax -> (+5 zero columns) @ VTE]   (kernels/)
    image  -> [indicator rows and per-crop embeddings in the reference layout]
              (* sqrt(hidden) where the LLM scales its input embeddings: Gemma2)
    prompt -> the LLM (Gemma2, Llama, Qwen2) with those embeddings over the image's placeholders

What differs per member (LLM, backbone, pad token, embedding scale) comes from
engine/members.py. A checkpoint with no row there (Ovis1.5) is built as vLLM's built-in Ovis
instead, with one log line, so installing the plugin never loses a checkpoint that vLLM serves.

Where this differs from vLLM's built-in Ovis: indicators take VTE rows V-5..V-1 in the reference
order, SigLIP's post-LayerNorm is skipped, visual rows get Gemma2's sqrt(hidden_size) embedding
scale like the text rows, images of different crop grids share a prompt, and a quantized
checkpoint's quantization applies to the LLM only.
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
from vllm.logger import init_logger
from vllm.model_executor.models import ovis as builtin_ovis
from vllm.model_executor.models.aimv2 import AIMv2Model
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsLoRA, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.siglip import SiglipVisionModel
from vllm.model_executor.models.utils import AutoWeightsLoader, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from ovis_vllm.kernels import (
    DEFAULT_CHUNK_MB,
    PackedMatrix,
    check_impl,
    onednn_unavailable,
    visual_embedding,
    vocab_parallel_visual_embedding,
)

from .cpu_support import cpu_cannot_serve
from .members import builtin_fallback_message, member_of
from .placeholders import IMAGE_ATOM, IMAGE_TOKEN, NUM_INDICATORS, image_layout, indicator_vte_row
from .processor import dummy_inputs_for, processing_info_for, processor_for

logger = init_logger(__name__)


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
    """One tensor-parallel rank's slice of the Vh = V-5 softmax columns of the visual vocabulary.

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
    """`vte.weight` [V, D]: the softmax rows [0, Vh) split like the head, the 5 indicator rows
    [Vh, V) (plain look-ups) on every rank."""

    def __init__(self, shard: VocabShard, vocab: int, hidden: int):
        super().__init__()
        self.shard = shard
        self.rows = _sharded_param(shard, hidden)
        self.indicators = nn.Parameter(torch.empty(NUM_INDICATORS, hidden), requires_grad=False)
        self.vocab = vocab
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
            self.shard.load(self.rows, tensor[: self.vocab - NUM_INDICATORS])
            self.indicators.data.copy_(tensor[self.vocab - NUM_INDICATORS:])
        return {"rows", "indicators"}


class OvisVisualTokenizer(nn.Module):
    """Vision backbone (SigLIP or AIMv2) + head: crops -> per-token logits over this rank's slice
    of the visual vocabulary (pre-LayerNorm).

    The LayerNorm (`head.1`) is applied inside the visual-embedding kernel, fused with the
    softmax and the VTE product."""

    def __init__(self, config, shard: VocabShard, prefix: str = ""):
        super().__init__()
        self.hidden_stride = config.hidden_stride
        # Ovis reads hidden_states[-1]: the last encoder layer BEFORE the backbone's final norm
        # (SigLIP's post_layernorm, AIMv2's trunk.post_trunk_norm). Unquantized: the GPTQ
        # releases quantize the LLM only.
        backbone = AIMv2Model if config.backbone_config.model_type == "aimv2_vision_model" \
            else SiglipVisionModel
        self.backbone = backbone(config.backbone_config, None, require_post_norm=False,
                                 prefix=maybe_prefix(prefix, "backbone"))
        in_features = config.backbone_config.hidden_size * self.hidden_stride**2
        self.head = nn.Sequential(ShardedHeadLinear(in_features, shard), ShardedLayerNorm(shard))

    def merge_patches(self, features: torch.Tensor) -> torch.Tensor:
        """[n, g*g, d] -> [n, (G/s)^2, s*s*d]: zero-pad the g x g patch grid to a multiple G of the
        stride s, then concatenate each s x s block row-major."""
        s = self.hidden_stride
        n, length, d = features.shape
        g = int(length**0.5)
        assert g * g == length, f"patch count {length} is not a square"
        pad = -g % s
        grid = F.pad(features.reshape(n, g, g, d), (0, 0, 0, pad, 0, pad))
        big = (g + pad) // s
        blocks = grid.reshape(n, big, s, big, s, d).permute(0, 1, 3, 2, 4, 5)
        return blocks.reshape(n, big * big, s * s * d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.merge_patches(self.backbone(pixel_values))
        return self.head[0](features)


@MULTIMODAL_REGISTRY.register_processor(processor_for, info=processing_info_for, dummy_inputs=dummy_inputs_for)
class Ovis(nn.Module, SupportsMultiModal, SupportsPP, SupportsLoRA):
    # LoRA on the LLM's linear layers (Gemma2, Llama and Qwen2 fuse the same ones); vLLM applies
    # none to the visual tokenizer, so adapters of it are refused (check_lora_modules).
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                              "gate_up_proj": ["gate_proj", "up_proj"]}

    def __new__(cls, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        if member_of(config) is None:
            if vllm_config.lora_config is not None:  # vLLM's own message would name our class
                raise ValueError(builtin_fallback_message(config) + " vLLM's built-in Ovis has no "
                                 "LoRA support: serve this checkpoint without --enable-lora.")
            logger.warning(builtin_fallback_message(config))
            return builtin_ovis.Ovis(vllm_config=vllm_config, prefix=prefix)
        return super().__new__(cls)

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_TOKEN
        raise ValueError(f"Ovis supports images only, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        member = member_of(config)
        if reason := cpu_cannot_serve(config):
            raise ValueError(reason)
        # Gemma2 multiplies the whole merged input sequence by sqrt(hidden_size) in the reference;
        # vLLM's Gemma2 does it only inside its token lookup, so visual rows get it here.
        self.visual_scale = config.hidden_size**0.5 if member.scales_visual_embeddings else None
        max_len = vllm_config.model_config.max_model_len
        if max_len > config.multimodal_max_length:
            raise ValueError(
                f"max_model_len {max_len} exceeds this checkpoint's multimodal_max_length "
                f"{config.multimodal_max_length}; the reference model never sees longer sequences: "
                f"pass --max-model-len {config.multimodal_max_length} or less (server.py does "
                f"when none is given)")

        with self._mark_language_model(vllm_config):
            self.llm = init_vllm_registered_model(
                vllm_config=vllm_config.with_hf_config(config.get_text_config()),
                prefix=maybe_prefix(prefix, "llm"))
        # No LoRA on the LLM's token embeddings and lm_head: ms-swift's adapters leave them out,
        # vLLM's Gemma2 and Qwen2 take none, and vLLM's LoRA logits path (which Llama would get)
        # fails on prompt logprobs in a batch with an adapter, taking the engine down with it
        # (vllm-project/vllm issues 29955 and 51594).
        self.llm.embedding_modules = {}
        vocab = config.visual_tokenizer_config.vocab_size
        self.tp_rank, self.tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        # Every rank holds 1/tp of the head and the VTE (vLLM's built-in replicates both).
        self.shards = [VocabShard.of(vocab - NUM_INDICATORS, r, self.tp_size) for r in range(self.tp_size)]
        if self.shards[-1].valid == 0:
            raise ValueError(f"visual vocabulary {vocab} is too small for {self.tp_size} ranks")
        shard = self.shards[self.tp_rank]
        with self._mark_tower_model(vllm_config, "image"):
            self.visual_tokenizer = OvisVisualTokenizer(
                config.visual_tokenizer_config, shard, prefix=maybe_prefix(prefix, "visual_tokenizer"))
            self.vte = ShardedVTE(shard, vocab, config.hidden_size)
        self.make_empty_intermediate_tensors = self.llm.make_empty_intermediate_tensors
        self.visual_embed_impl, self.visual_embed_chunk_mb = visual_embed_options(vllm_config)

    def _crop_embeddings(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(LayerNorm(logits)) @ VTE rows for this rank's logits [N, shard.size]."""
        ln, shard = self.visual_tokenizer.head[1], self.shards[self.tp_rank]
        x, w, b = logits[:, :shard.valid], ln.weight[:shard.valid], ln.bias[:shard.valid]
        if self.tp_size == 1:
            return visual_embedding(x, w, b, self.vte.table, ln.eps, impl=self.visual_embed_impl,
                                    chunk_mb=self.visual_embed_chunk_mb)
        return vocab_parallel_visual_embedding(
            x, w, b, self.vte.rows[:shard.valid], ln.eps,
            widths=[s.valid for s in self.shards], rank=self.tp_rank,
            all_gather=lambda t: tensor_model_parallel_all_gather(t, dim=-1),
            all_reduce=tensor_model_parallel_all_reduce, chunk_mb=self.visual_embed_chunk_mb)

    def _image_embeddings(self, logits: torch.Tensor, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Lay out indicators and crop embeddings per image, scaled like the LLM's text rows."""
        vocab, per_crop = self.vte.vocab, logits.shape[1]
        crop_embeds = self._crop_embeddings(logits.flatten(0, 1))
        # One table holding every crop token's embedding followed by the 5 indicator rows, so an
        # image is a single gather in the reference order.
        table = torch.cat([crop_embeds, self.vte.indicators])
        indicator_base = crop_embeds.shape[0] - (vocab - NUM_INDICATORS)
        if self.visual_scale is not None:  # in the embeddings' dtype, as the reference
            table = table * torch.tensor(self.visual_scale, dtype=table.dtype)
        images, next_crop = [], 0
        for grid in grids:
            index = []
            for item in image_layout(grid):
                if item == IMAGE_ATOM:
                    index.extend(range(next_crop * per_crop, (next_crop + 1) * per_crop))
                    next_crop += 1
                else:
                    index.append(indicator_base + indicator_vte_row(item, vocab))
            rows = torch.tensor(index, device=table.device)
            images.append(table.index_select(0, rows))
        return images

    def get_mm_mapping(self) -> MultiModelKeys:
        return MultiModelKeys.from_string_field(language_model="llm", connector="visual_tokenizer.head",
                                                tower_model="visual_tokenizer.backbone")

    def check_lora_modules(self, module_names) -> None:
        """Called by engine/lora.py with the modules an adapter adapts: LoRA is applied to the
        LLM only, so an adapter of anything else is refused rather than half served."""
        visual = sorted(name for name in module_names if not name.startswith("llm."))
        if visual:
            shown = ", ".join(visual[:6]) + (f" and {len(visual) - 6} more" if len(visual) > 6 else "")
            raise ValueError(
                f"this LoRA adapter also adapts {len(visual)} module(s) outside the LLM ({shown}); "
                "only the LLM's linear layers take LoRA here (as in vLLM), so it would be served "
                "without them. Train with the vision tower and aligner frozen (ms-swift's default "
                "--freeze_vit true --freeze_aligner true), or merge the adapter into the checkpoint "
                "and serve that")

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values, grids = kwargs.get("pixel_values"), kwargs.get("grids")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values))
        grids = [tuple(int(v) for v in g) for g in torch.as_tensor(grids).reshape(-1, 2).tolist()]
        dtype = self.vte.indicators.dtype
        logits = self.visual_tokenizer(pixel_values.to(dtype))
        return tuple(self._image_embeddings(logits, grids))

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.llm(input_ids=input_ids, positions=positions,
                        intermediate_tensors=intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.llm.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = AutoWeightsLoader(self).load_weights(weights)
        self.visual_tokenizer.head[0].pack_for_cpu()
        if self.tp_size == 1 and self.visual_embed_impl in ("auto", "chunked"):
            self.vte.pack_for_cpu()
        if self.tp_rank == 0:
            logger.info("Ovis visual embedding: %s", self.visual_embedding_paths())
        return loaded

    def visual_embedding_paths(self) -> str:
        """Which visual-embedding path and GEMMs this model runs, and why (logged at load)."""
        dtype, device = self.vte.indicators.dtype, self.vte.indicators.device
        impl = self.visual_embed_impl
        if impl == "unfused":
            path = "vLLM's unfused way (ovis_visual_embed=unfused)"
        elif self.tp_size > 1:
            path = f"vocabulary-parallel over {self.tp_size} ranks"
        elif impl == "triton" or (impl == "auto" and device.type == "cuda"):
            path = "fused Triton kernels"
        else:
            path = "chunked CPU path"
        if device.type != "cpu":
            return f"{path}, {dtype}"
        head_gemm = "oneDNN, packed" if self.visual_tokenizer.head[0].packed is not None else "torch"
        vte_gemm = "oneDNN, packed" if self.vte.packed is not None else "torch"
        why = onednn_unavailable(dtype)
        return (f"{path}, {dtype}; head GEMM on {head_gemm}, VTE product on {vte_gemm}"
                + (f" ({why})" if why else ""))
