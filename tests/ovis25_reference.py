"""Independent reference forward of Ovis2.5 (and the Qwen3-MoE LLM of Ovis2.6), for tests only.

Written from AIDC-AI's own code, not from vLLM's and not from `engine/`: it is the oracle a plugin's
Ovis2.5 forward is compared against (fp32 prompt log-probabilities). Pure PyTorch for the vision
side (a NaViT module written here), Hugging Face transformers for the LLM (`Qwen3ForCausalLM`, or
`Qwen3MoeForCausalLM` when the LLM's model_type is "qwen3_moe") and for the image processor's PIL
path (`SiglipImageProcessorPil`).

Sources read (no model hub access here):
- github AIDC-AI/Ovis (now ATH-MaaS/Ovis) at commit 4de4946166ee40a2c3c6209b7ef57c50a7eaaf99
  (2025-09-22, its HEAD): ovis/model/modeling_ovis.py, ovis/model/vit/modeling_siglip2_navit.py,
  ovis/model/vit/configuration_siglip2_navit.py, ovis/model/configuration_ovis.py,
  ovis/model/conversation_formatter.py, ovis/util/constants.py.
- The checkpoints' remote code modeling_ovis2_5.py / configuration_ovis2_5.py and the 9B's
  config.json, tokenizer_config.json (chat template), generation_config.json and
  model.safetensors.index.json, as copied into public repositories (e.g. Theo-Yim/VLMs,
  Ovis/HF_Repo/, commits 42837fe7 / 0d6f91cd / 125259cd). The remote code's NaViT is the GitHub one
  plus a non-flash fallback (rotate_half rotary in fp32, per-segment SDPA); its VisualTokenizer,
  merge_multimodal and _merge_inputs match GitHub; its prompt path is the checkpoint's chat
  template + `_tokenize_with_visual_placeholder` (GitHub uses a Python conversation formatter).

What the reference does, and this module with it:
- Features are `hidden_states[-1]` of the NaViT encoder: the last layer's output *before*
  `post_layernorm` (the encoder collects only per-layer outputs, so [-1] is the last layer). Both the
  GitHub HEAD above and every copy of the checkpoint code found agree; `post_layernorm` is loaded
  (its tensors are in the checkpoint) and used only when asked (quirks=("post_layernorm",)).
- Patch embedding: Conv2d(3, D, 16, stride 16) when vit_config.num_patches <= 0 (the published
  -1), Linear(3*16*16, D) otherwise. Position table: Embedding((image_size/patch)^2, D) (or
  num_patches rows for the Linear variant) as a square grid, `F.interpolate(mode="bicubic",
  align_corners=False)` (no antialias) to each frame's (h, w) patch grid, repeated per frame and laid
  out in hidden_stride x hidden_stride blocks like the patches.
- 2D rotary: VisionRotaryEmbedding(head_dim // 2): inv_freq = 1 / 10000^(arange(0, d, 2) / d) with
  d = head_dim // 2, fp32; per patch angles cat(row * inv_freq, col * inv_freq) (block layout), then
  cos/sin of cat(angles, angles), applied in fp32 (GPT-NeoX halves) and cast back.
- Attention segments: each frame (cu_seqlens = h*w repeated t times) for layers in
  fullatt_block_indexes ("i|j|k" string in the reference; a list is accepted here) or for every
  layer when that is None (the published config); other layers attend within windows of
  window_size // hidden_stride // patch_size merged units (aligned top-left per frame). The
  reference permutes tokens into window order and back; attention within a segment does not depend
  on token order, so here each segment is gathered by index instead (same result).
- Encoder layer: pre-LN (eps layer_norm_eps), attention with biases, scale head_dim^-0.5, residual;
  pre-LN MLP fc1 -> gelu_pytorch_tanh -> fc2, residual.
- Each run of hidden_stride^2 consecutive patches (one block) is concatenated -> [N/4, 4*D]; head =
  Linear(4*D, V-4, no bias) -> LayerNorm(V-4) (torch default eps 1e-5) -> softmax in fp32, cast to
  the head's dtype -> 4 zero columns appended -> @ vte.weight [V, hidden].
- Indicator rows: vte rows V-4, V-3, V-2, V-1 for ids -301 (image start), -302 (image end), -303
  (video start), -304 (video end). Atom -300. `<image>` -200, `<video>` -201.
- An image/video is [start] + t*h*w / hidden_stride^2 / temporal_patch_size atoms + [end].
- merge_multimodal: wte(ids with negatives -> 0), indicator positions overwritten, atom positions
  overwritten in order with the visual rows; the LLM then runs on inputs_embeds with plain 1D
  positions 0..L-1.
- Preprocessing: `image.convert("RGB")` when mode != "RGB" (alpha dropped, no compositing);
  smart_resize(height, width, factor=patch*hidden_stride) of the *first* image of the call (a video's
  first frame); `image_processor.preprocess(image, size={"height": h, "width": w},
  return_tensors="np")` of the checkpoint's SigLIP processor (AutoImageProcessor with
  do_center_crop=False; transformers 4.51 picks the slow = PIL path); patches laid out
  (t, h/2, w/2, 2, 2, C, tp, 16, 16); grid_thw = [t, H/16, W/16].

Choices where the reference is ambiguous or diverges (also in the report that came with this file):
- Pixel bounds: the reference's defaults disagree (modeling smart_resize/preprocess_inputs
  max 1344*1792, chat() and the 9B checkpoint's preprocess_inputs 1792*1792, min 448*448). Here
  the defaults are MIN_PIXELS = 448*448 and MAX_PIXELS = 1792*1792; pass others explicitly.
- Image processor: transformers 5.x's SiglipImageProcessorPil built from preprocessor_config.json
  (do_resize, size, resample, do_rescale, rescale_factor, do_normalize, image_mean, image_std).
  It matches 4.51's slow SiglipImageProcessor except for RGB images 1 or 3 pixels tall, whose
  channel axis 4.51 misreads (ambiguous-shape heuristic); that bug is not reproduced.
- Greedy: plain argmax over the fp32 logits with full recomputation (no KV cache); the
  reference's generate() would also apply generation_config's repetition_penalty 1.05.
- Attention mask: the reference's generate() masks positions whose id equals the pad id
  (<|endoftext|>); here nothing is masked (prompts are not expected to contain that token).
- Prompt text: the checkpoint's chat template (string content has `<image>`/`<video>` removed;
  list content items {"type": "image"|"video"|"text"} become the markers, joined by "\\n") then
  `_tokenize_with_visual_placeholder`: split on "<video>" if the text contains it, else on
  "<image>", each piece tokenized with add_special_tokens=False.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = -200, -201
VISUAL_ATOM_ID = -300
INDICATOR_IDS = [-301, -302, -303, -304]  # image start, image end, video start, video end
IMAGE_START_ID, IMAGE_END_ID, VIDEO_START_ID, VIDEO_END_ID = INDICATOR_IDS
MIN_PIXELS, MAX_PIXELS = 448 * 448, 1792 * 1792
THINK_END_TOKEN_ID, IM_END_TOKEN_ID = 151668, 151645  # of the published tokenizer (reference chat())
# chat()'s text for a thinking budget that runs out (modeling_ovis.py; the checkpoints' generate
# has the same string).
EARLY_STOP_TEXT = ("\n\nConsidering the limited time by the user, I have to give the solution "
                   "based on the thinking directly now.\n</think>\n\n")

# Deviations from the reference that can be switched on on purpose (none by default).
QUIRKS = ("post_layernorm",)

PROCESSOR_KEYS = ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize",
                  "image_mean", "image_std", "do_convert_rgb")


# ---- preprocessing ---------------------------------------------------------------------------
def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The reference's VisualTokenizer.smart_resize (Qwen2-VL's, adapted), statement for statement:
    (resized_height, resized_width), both multiples of `factor`."""
    if height < factor or width < factor:
        if height < width:
            width = round(factor / height * width)
            height = factor
        else:
            height = round(factor / width * height)
            width = factor
    elif max(height, width) / min(height, width) > 200:
        if height > width:
            height = 200 * width
        else:
            width = 200 * height
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


def make_image_processor(config: dict | str | Path | SiglipImageProcessorPil) -> SiglipImageProcessorPil:
    """The checkpoint's SigLIP image processor, PIL path, centre crop off (as the reference's
    `AutoImageProcessor.from_pretrained(path, do_center_crop=False)` under transformers 4.51).
    `config`: the preprocessor_config.json contents, its path, a checkpoint dir, or a processor."""
    if isinstance(config, SiglipImageProcessorPil):
        return config
    if isinstance(config, (str, Path)):
        path = Path(config)
        config = json.loads((path / "preprocessor_config.json" if path.is_dir() else path).read_text())
    kind = config.get("image_processor_type", "SiglipImageProcessor")
    assert kind.startswith("SiglipImageProcessor"), f"not a SigLIP image processor: {kind}"
    kwargs = {k: config[k] for k in PROCESSOR_KEYS if config.get(k) is not None}
    return SiglipImageProcessorPil(do_center_crop=False, **kwargs)


def reference_preprocess(image: Image.Image | None = None, video: list[Image.Image] | None = None,
                         min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                         image_processor_config=None, patch_size: int = 16, hidden_stride: int = 2,
                         temporal_patch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's VisualTokenizer.preprocess: one image or one video (a list of frames) ->
    (flattened patches [t*h*w, C*tp*ps*ps] float32, grid_thw [[t, h, w]] int64)."""
    assert (image is None) ^ (video is None), "Invalid input: expect either image or video"
    processor = make_image_processor(image_processor_config)
    images = [image] if image is not None else list(video)
    images = [im.convert("RGB") if im.mode != "RGB" else im for im in images]
    width, height = images[0].size
    processed = []
    for im in images:
        resized_height, resized_width = smart_resize(height, width, factor=patch_size * hidden_stride,
                                                     min_pixels=min_pixels, max_pixels=max_pixels)
        new_size = dict(height=resized_height, width=resized_width)
        processed.append(processor.preprocess(im, size=new_size, return_tensors="np")["pixel_values"][0])
    patches = np.array(processed)
    if patches.shape[0] % temporal_patch_size != 0:  # as the reference (tp - 1 copies of the last)
        repeats = np.repeat(patches[-1][np.newaxis], temporal_patch_size - 1, axis=0)
        patches = np.concatenate([patches, repeats], axis=0)
    channel = patches.shape[1]
    grid_t = patches.shape[0] // temporal_patch_size
    grid_h, grid_w = resized_height // patch_size, resized_width // patch_size
    patches = patches.reshape(grid_t, temporal_patch_size, channel,
                              grid_h // hidden_stride, hidden_stride, patch_size,
                              grid_w // hidden_stride, hidden_stride, patch_size)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, channel * temporal_patch_size * patch_size * patch_size)
    return torch.tensor(flat), torch.tensor([[grid_t, grid_h, grid_w]])


# ---- prompt ----------------------------------------------------------------------------------
def tokenize_with_visual_placeholder(tokenizer, text: str) -> list[int]:
    """The checkpoint's `_tokenize_with_visual_placeholder` (= GitHub's `_tokenize_with_image_symbol`):
    split on "<video>" if the text contains it, else on "<image>"; every piece tokenized alone
    without special tokens; -201 / -200 between pieces."""
    if VIDEO_TOKEN in text:
        placeholder, placeholder_id = VIDEO_TOKEN, VIDEO_TOKEN_ID
    else:
        placeholder, placeholder_id = IMAGE_TOKEN, IMAGE_TOKEN_ID
    chunks = [tokenizer(chunk, add_special_tokens=False).input_ids for chunk in text.split(placeholder)]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids.append(placeholder_id)
        ids.extend(chunk)
    return ids


def visual_atoms(grid_thw, hidden_stride: int = 2, temporal_patch_size: int = 1) -> int:
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // hidden_stride**2 // temporal_patch_size


def merge_visual_placeholders(raw_ids: list[int], placeholder_id: int, grid_thws, begin_id: int,
                              end_id: int, hidden_stride: int = 2, temporal_patch_size: int = 1) -> list[int]:
    """The reference's `_merge_inputs`: each placeholder -> [begin] + atoms + [end]."""
    indexes = [i for i, v in enumerate(raw_ids) if v == placeholder_id]
    assert len(indexes) == len(grid_thws), f"{len(indexes)} placeholders for {len(grid_thws)} inputs"
    ids, prev = [], 0
    for index, grid_thw in zip(indexes, grid_thws):
        ids.extend(raw_ids[prev:index])
        ids.extend([begin_id] + [VISUAL_ATOM_ID] * visual_atoms(grid_thw, hidden_stride, temporal_patch_size)
                   + [end_id])
        prev = index + 1
    ids.extend(raw_ids[prev:])
    return ids


def content_items(text: str) -> list[dict]:
    """Convenience: "a <image> b" -> [{"type": "text", "text": "a "}, {"type": "image"},
    {"type": "text", "text": " b"}] (empty text pieces dropped). The chat template joins the
    items of a message with "\\n"."""
    items = []
    for piece in re.split(r"(<image>|<video>)", text):
        if piece in (IMAGE_TOKEN, VIDEO_TOKEN):
            items.append({"type": piece[1:-1]})
        elif piece:
            items.append({"type": "text", "text": piece})
    return items


# ---- NaViT (SigLIP2 at native resolution), written from modeling_siglip2_navit.py -------------
class _Embeddings(nn.Module):
    def __init__(self, vc: dict):
        super().__init__()
        d, p, c = vc["hidden_size"], vc["patch_size"], vc.get("num_channels", 3)
        num_patches = vc.get("num_patches", -1)
        if num_patches > 0:
            self.patch_embedding = nn.Linear(c * p * p, d)
            self.side = int(num_patches**0.5)
        else:
            self.patch_embedding = nn.Conv2d(c, d, kernel_size=p, stride=p, padding="valid")
            self.side = vc["image_size"] // p
        if vc.get("preserve_original_pe", True):
            self.position_embedding = nn.Embedding(self.side * self.side, d)
        else:
            self.position_embedding = None


class _Attention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)


class _MLP(nn.Module):
    def __init__(self, d: int, i: int):
        super().__init__()
        self.fc1 = nn.Linear(d, i)
        self.fc2 = nn.Linear(i, d)


class _Layer(nn.Module):
    def __init__(self, vc: dict):
        super().__init__()
        d, eps = vc["hidden_size"], vc.get("layer_norm_eps", 1e-6)
        self.layer_norm1 = nn.LayerNorm(d, eps=eps)
        self.self_attn = _Attention(d)
        self.layer_norm2 = nn.LayerNorm(d, eps=eps)
        self.mlp = _MLP(d, vc["intermediate_size"])


class _Encoder(nn.Module):
    def __init__(self, vc: dict):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(vc) for _ in range(vc["num_hidden_layers"]))


class NaViT(nn.Module):
    """The vision tower; parameter names are those under `visual_tokenizer.vit.vision_model.`."""

    def __init__(self, vc: dict):
        super().__init__()
        self.vc = vc
        self.dim = vc["hidden_size"]
        self.heads = vc["num_attention_heads"]
        self.head_dim = self.dim // self.heads
        assert self.head_dim * self.heads == self.dim
        self.patch = vc["patch_size"]
        self.stride = vc.get("hidden_stride", 2)
        self.tp = vc.get("temporal_patch_size", 1)
        self.channels = vc.get("num_channels", 3)
        self.use_rope = vc.get("use_rope", True)
        self.window_size = vc.get("window_size", 112)
        full = vc.get("fullatt_block_indexes")
        if isinstance(full, str):
            full = [int(i) for i in full.split("|")]
        self.full_layers = None if full is None else {int(i) for i in full}
        assert vc.get("hidden_act", "gelu_pytorch_tanh") == "gelu_pytorch_tanh", vc.get("hidden_act")
        self.embeddings = _Embeddings(vc)
        self.encoder = _Encoder(vc)
        self.post_layernorm = nn.LayerNorm(self.dim, eps=vc.get("layer_norm_eps", 1e-6))

    # -- pieces, each checkable on its own --
    def block_order(self, grid_thw) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, col) of every patch of one frame in the patch order (h/s, w/s, s, s)."""
        _, h, w = (int(x) for x in grid_thw)
        s = self.stride
        rows = torch.arange(h)[:, None].expand(h, w).reshape(h // s, s, w // s, s).permute(0, 2, 1, 3)
        cols = torch.arange(w)[None, :].expand(h, w).reshape(h // s, s, w // s, s).permute(0, 2, 1, 3)
        return rows.flatten(), cols.flatten()

    def position_embeddings(self, grid_thw) -> torch.Tensor:
        """[t*h*w, D]: the learned square table resized bicubically to (h, w), in block order."""
        t, h, w = (int(x) for x in grid_thw)
        side = self.embeddings.side
        table = self.embeddings.position_embedding.weight.reshape(side, side, -1).permute(2, 0, 1)[None]
        resized = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)[0]  # [D, h, w]
        rows, cols = self.block_order(grid_thw)
        return resized[:, rows, cols].t().repeat(t, 1)

    def rotary_angles(self, grid_thw) -> torch.Tensor:
        """[t*h*w, head_dim/2] fp32: cat(row * inv_freq, col * inv_freq), inv_freq of dim head_dim/2."""
        t = int(grid_thw[0])
        dim = self.head_dim // 2
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        rows, cols = self.block_order(grid_thw)
        angles = torch.cat([rows.float()[:, None] * inv_freq, cols.float()[:, None] * inv_freq], dim=-1)
        return angles.repeat(t, 1)

    def segments(self, grid_thws, windowed: bool) -> list[torch.Tensor]:
        """Token index sets that attend among themselves: frames, or windows within frames."""
        out, offset = [], 0
        ws = self.window_size // self.stride // self.patch if windowed else 0
        if windowed:
            assert ws > 0, "window_size // hidden_stride // patch_size must be positive"
        for grid_thw in grid_thws:
            t, h, w = (int(x) for x in grid_thw)
            n = h * w
            if not windowed:
                out.extend(torch.arange(offset + f * n, offset + (f + 1) * n) for f in range(t))
            else:
                rows, cols = self.block_order(grid_thw)
                win = (rows // self.stride // ws) * 10**6 + (cols // self.stride // ws)
                for f in range(t):
                    for key in torch.unique(win):  # empty windows cannot occur here
                        out.append(offset + f * n + torch.nonzero(win == key).flatten())
            offset += t * n
        return out

    def _attention(self, layer: _Attention, x, cos, sin, segments) -> torch.Tensor:
        n = x.shape[0]
        q = layer.q_proj(x).view(n, self.heads, self.head_dim)
        k = layer.k_proj(x).view(n, self.heads, self.head_dim)
        v = layer.v_proj(x).view(n, self.heads, self.head_dim)
        if self.use_rope:
            def rot(y):
                yf = y.float()
                half = self.head_dim // 2
                rotated = torch.cat([-yf[..., half:], yf[..., :half]], dim=-1)
                return (yf * cos[:, None, :] + rotated * sin[:, None, :]).to(y.dtype)
            q, k = rot(q), rot(k)
        out = torch.empty_like(q)
        for idx in segments:
            qi, ki, vi = (y[idx].transpose(0, 1)[None] for y in (q, k, v))  # [1, H, n, d]
            out[idx] = F.scaled_dot_product_attention(qi, ki, vi)[0].transpose(0, 1)
        return layer.out_proj(out.reshape(n, self.dim))

    def forward(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor,
                post_layernorm: bool = False) -> torch.Tensor:
        """[N, C*tp*ps*ps] patches -> [N, D]: the last encoder layer's output (hidden_states[-1])."""
        dtype = self.embeddings.patch_embedding.weight.dtype
        pe = self.embeddings.patch_embedding
        if isinstance(pe, nn.Linear):
            x = pe(pixel_values.to(dtype))
        else:
            x = pe(pixel_values.view(-1, self.channels * self.tp, self.patch, self.patch).to(dtype))
            x = x.reshape(-1, self.dim)
        if self.embeddings.position_embedding is not None:
            x = x + torch.cat([self.position_embeddings(g) for g in grid_thws]).to(x.dtype)
        angles = torch.cat([self.rotary_angles(g) for g in grid_thws])
        emb = torch.cat([angles, angles], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        frames = self.segments(grid_thws, windowed=False)
        windows = None
        for i, layer in enumerate(self.encoder.layers):
            full = self.full_layers is None or i in self.full_layers
            if not full and windows is None:
                windows = self.segments(grid_thws, windowed=True)
            x = x + self._attention(layer.self_attn, layer.layer_norm1(x), cos, sin, frames if full else windows)
            x = x + layer.mlp.fc2(F.gelu(layer.mlp.fc1(layer.layer_norm2(x)), approximate="tanh"))
        if post_layernorm:
            x = self.post_layernorm(x)
        return x


# ---- weights ---------------------------------------------------------------------------------
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fuse_experts(sd: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Per-expert MoE tensors (the checkpoint's mlp.experts.N.{gate,up,down}_proj.weight) -> the
    3D `gate_up_proj` [E, 2I, H] (gate rows first) / `down_proj` [E, H, I] that transformers 5's
    Qwen3-MoE holds, when the module has those."""
    wanted = {name for name, _ in module.named_parameters()}
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for name, t in sd.items():
        m = _EXPERT.match(name)
        if m and f"{m.group(1)}.gate_up_proj" in wanted:
            groups.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
        else:
            out[name] = t
    for prefix, experts in groups.items():
        order = sorted(experts)
        assert order == list(range(len(order))), prefix
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]) for e in order])
        out[f"{prefix}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in order])
    return out


def _load(module: nn.Module, weights: dict, prefix: str, allow_missing=()) -> None:
    sd = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    sd = fuse_experts(sd, module)
    missing, unexpected = module.load_state_dict(sd, strict=False)
    missing = set(missing) - set(allow_missing)
    assert not missing and not unexpected, (prefix, sorted(missing), sorted(unexpected))


class ReferenceOvis25:
    """Ovis2.5 from a checkpoint directory (config.json, *.safetensors, tokenizer files,
    preprocessor_config.json, optional generation_config.json)."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32):
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        self.path, self.config, self.dtype = path, cfg, dtype
        llm_cfg = dict(cfg.get("llm_config") or cfg["text_config"])
        vc = dict(cfg.get("vit_config") or cfg["vision_config"])
        self.vit_config = vc
        self.visual_vocab = cfg["visual_vocab_size"]
        self.hidden_size = cfg.get("hidden_size") or llm_cfg["hidden_size"]
        assert self.hidden_size == llm_cfg["hidden_size"], "hidden size mismatch"
        self.patch_size = vc["patch_size"]
        self.hidden_stride = vc.get("hidden_stride", 2)
        self.temporal_patch_size = vc.get("temporal_patch_size", 1)

        # tokenizer: its own class (tokenizer_config.json), so the checkpoint's auto_map (remote
        # code) is never consulted.
        tok_cfg_file = path / "tokenizer_config.json"
        tok_cls = json.loads(tok_cfg_file.read_text()).get("tokenizer_class") if tok_cfg_file.exists() else None
        import transformers
        cls = getattr(transformers, tok_cls, None) if tok_cls else None
        if cls is None and tok_cls and tok_cls.endswith("Fast"):
            cls = getattr(transformers, tok_cls[:-4], None)
        self.tokenizer = (cls or AutoTokenizer).from_pretrained(path)
        if self.tokenizer.chat_template is None:
            for name in ("chat_template.jinja", "chat_template.json"):
                f = path / name
                if f.exists():
                    text = f.read_text()
                    self.tokenizer.chat_template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                    break
        pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.image_pad_id = pad if isinstance(pad, int) and pad != self.tokenizer.unk_token_id else None

        # LLM
        self.llm_type = llm_cfg.pop("model_type")
        assert self.llm_type in ("qwen3", "qwen3_moe"), self.llm_type
        eos = llm_cfg.get("eos_token_id")
        self.stop_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        gen = path / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id", [])
            self.stop_ids |= set(eos if isinstance(eos, list) else [eos])
        for key in [k for k in llm_cfg if k.startswith("_") or k in ("torch_dtype", "dtype", "auto_map",
                                                                       "architectures", "transformers_version")]:
            llm_cfg.pop(key)
        llm_config = AutoConfig.for_model(self.llm_type, **llm_cfg)
        llm_config._attn_implementation = "eager"
        self.tie_word_embeddings = bool(llm_cfg.get("tie_word_embeddings", False))
        self.llm = AutoModelForCausalLM.from_config(llm_config, attn_implementation="eager").to(dtype).eval()

        # vision
        self.vit = NaViT(vc).to(dtype).eval()
        head_width = self.visual_vocab - len(INDICATOR_IDS)
        self.head = nn.Sequential(nn.Linear(self.vit.dim * self.hidden_stride**2, head_width, bias=False),
                                  nn.LayerNorm(head_width)).to(dtype).eval()
        self.vte = nn.Embedding(self.visual_vocab, self.hidden_size).to(dtype).eval()

        weights = {}
        for file in sorted(path.glob("*.safetensors")):
            weights |= load_file(file)
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
        known = ("llm.", "visual_tokenizer.vit.vision_model.", "visual_tokenizer.head.", "vte.")
        stray = [k for k in weights if not k.startswith(known)]
        assert not stray, f"unexpected tensors: {stray[:5]}"
        _load(self.llm, weights, "llm.", allow_missing={"lm_head.weight"} if self.tie_word_embeddings else ())
        if self.tie_word_embeddings:  # the reference ties after loading: lm_head = embed_tokens
            self.llm.lm_head.weight = self.llm.get_input_embeddings().weight
        # Ovis2.6-30B-A3B is reported to ship no post_layernorm tensors (unused by the reference).
        _load(self.vit, weights, "visual_tokenizer.vit.vision_model.",
              allow_missing={"post_layernorm.weight", "post_layernorm.bias"})
        _load(self.head, weights, "visual_tokenizer.head.")
        _load(self.vte, weights, "vte.")

        for module in (self.llm, self.vit, self.head, self.vte):
            module.requires_grad_(False)
        self.image_processor = make_image_processor(path)

    # ---- inputs ------------------------------------------------------------------------------
    def preprocess_image(self, image: Image.Image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
        return reference_preprocess(image=image, min_pixels=min_pixels, max_pixels=max_pixels,
                                    image_processor_config=self.image_processor, patch_size=self.patch_size,
                                    hidden_stride=self.hidden_stride, temporal_patch_size=self.temporal_patch_size)

    def preprocess_video(self, frames: list[Image.Image], min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
        return reference_preprocess(video=frames, min_pixels=min_pixels, max_pixels=max_pixels,
                                    image_processor_config=self.image_processor, patch_size=self.patch_size,
                                    hidden_stride=self.hidden_stride, temporal_patch_size=self.temporal_patch_size)

    def render_chat(self, messages, add_generation_prompt: bool = True, enable_thinking: bool = False) -> str:
        """The checkpoint's chat template over `messages` (dicts with role and content, or
        (role, content) pairs; content a string or a list of {"type": "text"|"image"|"video"})."""
        msgs = [m if isinstance(m, dict) else {"role": m[0], "content": m[1]} for m in messages]
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  enable_thinking=enable_thinking)

    def prompt_ids(self, text: str) -> list[int]:
        """Raw ids of an already rendered prompt: -200 per "<image>" (or -201 per "<video>")."""
        return tokenize_with_visual_placeholder(self.tokenizer, text)

    def format_conversation(self, turns, enable_thinking: bool = False,
                            add_generation_prompt: bool = True) -> list[int]:
        """render_chat + prompt_ids, i.e. the checkpoint's preprocess_inputs before the images
        are spliced in (thinking off by default, as chat())."""
        return self.prompt_ids(self.render_chat(turns, add_generation_prompt, enable_thinking))

    def expand(self, raw_ids: list[int], images=None, video=None, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
        """preprocess_inputs' second half: (ids with [start, atoms, end] spliced in, pixel_values or
        None, grid_thws or None)."""
        images = list(images or [])
        if images and video is not None:
            raise ValueError("the reference takes either images or one video, not both")
        if images:
            pv, grids = zip(*(self.preprocess_image(im, min_pixels, max_pixels) for im in images))
            ids = merge_visual_placeholders(raw_ids, IMAGE_TOKEN_ID, [g[0] for g in grids], IMAGE_START_ID,
                                            IMAGE_END_ID, self.hidden_stride, self.temporal_patch_size)
            return ids, torch.cat(pv), torch.cat(grids)
        if video is not None:
            pv, grid = self.preprocess_video(video, min_pixels, max_pixels)
            ids = merge_visual_placeholders(raw_ids, VIDEO_TOKEN_ID, [grid[0]], VIDEO_START_ID, VIDEO_END_ID,
                                            self.hidden_stride, self.temporal_patch_size)
            return ids, pv, grid
        assert not any(t in (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID) for t in raw_ids), "placeholders without media"
        return list(raw_ids), None, None

    # ---- forward -----------------------------------------------------------------------------
    @torch.no_grad()
    def vit_features(self, pixel_values, grid_thws, quirks=()) -> torch.Tensor:
        return self.vit(pixel_values, grid_thws, post_layernorm="post_layernorm" in quirks)

    @torch.no_grad()
    def visual_tokens(self, pixel_values, grid_thws, quirks=()) -> torch.Tensor:
        """[atoms, V] probabilities (4 zero indicator columns), the reference's VisualTokenizer."""
        features = self.vit_features(pixel_values, grid_thws, quirks)
        features = features.reshape(features.shape[0] // self.hidden_stride**2, -1)
        logits = self.head(features)
        tokens = torch.softmax(logits, dim=-1, dtype=torch.float32).to(logits.dtype)
        return torch.cat([tokens, tokens.new_zeros(tokens.shape[0], len(INDICATOR_IDS))], dim=1)

    @torch.no_grad()
    def embeddings(self, input_ids, pixel_values=None, grid_thws=None, quirks=()) -> torch.Tensor:
        """The reference's merge_multimodal for one sequence: [L, hidden]."""
        assert set(quirks) <= set(QUIRKS), quirks
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        embeds = self.llm.get_input_embeddings()(ids.masked_fill(ids < 0, 0))
        if pixel_values is not None:
            indicator = self.vte(torch.arange(self.visual_vocab - len(INDICATOR_IDS), self.visual_vocab))
            visual = torch.matmul(self.visual_tokens(pixel_values, grid_thws, quirks), self.vte.weight)
            for i, ind in enumerate(INDICATOR_IDS):
                embeds[ids == ind] = indicator[i].to(embeds.dtype)
            atoms = ids == VISUAL_ATOM_ID
            assert int(atoms.sum()) == visual.shape[0], (int(atoms.sum()), visual.shape[0])
            embeds[atoms] = visual.to(embeds.dtype)
        return embeds

    @torch.no_grad()
    def merged_embeddings(self, raw_ids: list[int], images=None, video=None, min_pixels=MIN_PIXELS,
                          max_pixels=MAX_PIXELS, quirks=()):
        """Raw ids (-200 / -201 placeholders) + media -> (embeddings [L, hidden], expanded ids with
        -300..-304 at the visual positions), as tests/ovis_reference.py's ReferenceOvis."""
        ids, pv, grids = self.expand(raw_ids, images, video, min_pixels, max_pixels)
        return self.embeddings(ids, pv, grids, quirks), ids

    @torch.no_grad()
    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        """The LLM over one merged sequence, positions 0..L-1: fp32 logits [L, vocab]."""
        return self.llm(inputs_embeds=embeds[None], use_cache=False).logits[0].float()

    @torch.no_grad()
    def prompt_logprobs(self, embeds: torch.Tensor, ids: list[int]) -> list[float | None]:
        """Per position i: log p(ids[i] | prefix) (None at 0 and where ids[i] < 0). Pass the
        engine's ids to score its placeholder token instead."""
        lp = torch.log_softmax(self.logits(embeds), dim=-1)
        return [None] + [lp[i - 1, t].item() if t >= 0 else None for i, t in enumerate(ids) if i > 0]

    @torch.no_grad()
    def greedy(self, embeds: torch.Tensor, max_new_tokens: int, logit_bias: dict[int, float] | None = None):
        """Greedy tokens (until one of the checkpoint's eos ids) and, per step, the logits they
        were chosen from (`logit_bias` added first, as an OpenAI request's)."""
        tokens, step_logits = [], []
        table = self.llm.get_input_embeddings().weight
        for _ in range(max_new_tokens):
            logits = self.logits(embeds)[-1]
            for token, bias in (logit_bias or {}).items():
                logits[token] += bias
            tok = int(logits.argmax())
            tokens.append(tok)
            step_logits.append(logits)
            if tok in self.stop_ids:
                break
            embeds = torch.cat([embeds, table[tok][None].to(embeds.dtype)])
        return tokens, step_logits

    @torch.no_grad()
    def generate_with_thinking_budget(self, embeds: torch.Tensor, thinking_budget: int, max_new_tokens: int,
                                      logit_bias: dict[int, float] | None = None) -> list[int]:
        """chat()'s two-phase generation with enable_thinking and a thinking budget, greedy: phase
        1 generates at most `thinking_budget` tokens; if they hold `<|im_end|>` they are the
        answer; if they hold no `</think>`, EARLY_STOP_TEXT (tokenized on its own) is appended;
        phase 2 generates what is left of max_new_tokens after the prompt and all of that,
        prefilled again (GitHub's way). chat() skips the budget when it is 0 (the checkpoints'
        generate fails on 0); here 0 runs the same two phases with an empty first phase, which
        is what the plugin serves (docs/reference.md)."""
        phase1, _ = self.greedy(embeds, thinking_budget, logit_bias) if thinking_budget else ([], [])
        if IM_END_TOKEN_ID in phase1:
            return phase1
        intermediate = list(phase1)
        if THINK_END_TOKEN_ID not in intermediate:
            intermediate += self.tokenizer(EARLY_STOP_TEXT, add_special_tokens=False).input_ids
        remaining = max_new_tokens - len(intermediate)
        if remaining <= 0:
            return intermediate
        table = self.llm.get_input_embeddings().weight
        phase2, _ = self.greedy(torch.cat([embeds, table[intermediate].to(embeds.dtype)]), remaining, logit_bias)
        return intermediate + phase2
