"""Independent reference forward of Ovis1.6 (Gemma2 and Llama 3.2 members), for tests only.

Composed from Hugging Face transformers' own `SiglipVisionModel`, `SiglipImageProcessorPil` and
the LLM's `*ForCausalLM`, following docs/reference.md step by step (the AIDC-AI Ovis1.6 code
line, whose conversation formatters are reproduced here as written). It shares no code with
`engine/`, so the engine is checked against a second, separately written reading of the spec.
GPTQ checkpoints are dequantized here (AutoGPTQ's format) and run in floating point.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    Aimv2VisionConfig,
    Aimv2VisionModel,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

IMAGE_TOKEN_ID, IMAGE_ATOM_ID = -200, -300
IMAGE_INDICATOR_IDS = [-301, -302, -303, -304, -305]

# vLLM's built-in Ovis deviations (docs/reference.md, differences 1-3), for emulating it on purpose.
BUILTIN_QUIRKS = ("reversed_indicators", "post_layernorm", "unscaled_visual")

# The token vLLM (ours and the built-in) fills image positions with, per LLM type.
IMAGE_PAD_TOKENS = {"gemma2": "<unused0>", "llama": "<|reserved_special_token_0|>",
                    "qwen2": "<|image_pad|>"}


def dequantize_gptq(qweight, qzeros, scales, g_idx) -> torch.Tensor:
    """AutoGPTQ 4-bit ("gptq" format: stored zero = zero point - 1) -> float32 weight [out, in]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    q = (qweight[:, None, :] >> shifts[None, :, None]) & 15          # [in/8, 8, out]
    q = q.reshape(-1, qweight.shape[1])                                # [in, out]
    z = ((qzeros[:, :, None] >> shifts[None, None, :]) & 15) + 1      # [groups, out/8, 8]
    z = z.reshape(qzeros.shape[0], -1)                                 # [groups, out]
    g = g_idx.long()
    return ((q - z[g]).float() * scales.float()[g]).t().contiguous()


def dequantized_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors with every GPTQ layer replaced by its float `.weight`."""
    out = {k: v for k, v in weights.items()
           if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    for name in weights:
        if name.endswith(".qweight"):
            layer = name.removesuffix(".qweight")
            out[layer + ".weight"] = dequantize_gptq(*(weights[f"{layer}.{k}"] for k in
                                                       ("qweight", "qzeros", "scales", "g_idx")))
    return out


class GemmaConversationFormatter:
    """AIDC-AI's formatter: per turn, role head + stripped message + turn end, each turn's text
    split on <image> and tokenized piece by piece without special tokens."""
    from2role = {"human": "<start_of_turn>user\n", "gpt": "<start_of_turn>model\n"}
    im_end = "<end_of_turn>\n"
    bos_token = "<bos>"
    default_system_prompt = None
    strip_messages = True

    def __init__(self, tokenize_with_image_symbol):
        self.tokenize = tokenize_with_image_symbol

    def format(self, conversations, generation_preface=None):
        conversations = list(conversations)
        if conversations[0]["from"] == "system" and self.default_system_prompt is None:
            raise ValueError("Gemma does not support system prompt")
        if self.default_system_prompt is not None and conversations[0]["from"] != "system":
            conversations.insert(0, {"from": "system", "value": self.default_system_prompt})
        if generation_preface is not None:
            conversations.append({"from": "gpt", "value": generation_preface})
        prompt, input_ids = self.bos_token, self.tokenize(self.bos_token)
        for i, conversation in enumerate(conversations):
            message = conversation["value"]
            text = self.from2role[conversation["from"]] + (message.strip() if self.strip_messages else message)
            if i < len(conversations) - 1 or generation_preface is None:
                text += self.im_end
            prompt += text
            input_ids += self.tokenize(text)
        assert self.tokenize(prompt) == input_ids  # as the reference asserts
        return prompt, input_ids


class Llama3ConversationFormatter(GemmaConversationFormatter):
    from2role = {"system": "<|start_header_id|>system<|end_header_id|>\n\n",
                 "human": "<|start_header_id|>user<|end_header_id|>\n\n",
                 "gpt": "<|start_header_id|>assistant<|end_header_id|>\n\n"}
    im_end = "<|eot_id|>"
    bos_token = "<|begin_of_text|>"
    default_system_prompt = "You are a helpful and honest multimodal assistant."


class QwenConversationFormatter(GemmaConversationFormatter):
    from2role = {"system": "<|im_start|>system\n", "human": "<|im_start|>user\n",
                 "gpt": "<|im_start|>assistant\n"}
    im_end = "<|im_end|>\n"
    bos_token = ""
    default_system_prompt = "You are a helpful assistant."
    strip_messages = False


FORMATTERS = {"GemmaConversationFormatter": GemmaConversationFormatter,
              "Llama3ConversationFormatter": Llama3ConversationFormatter,
              "QwenConversationFormatter": QwenConversationFormatter}


def aimv2_weights(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """AIDC-AI's AIMv2 tensor names (preprocessor.*, trunk.blocks.N.{attn.qkv, attn.proj, norm_1,
    norm_2, mlp.fc1/fc2/fc3}) renamed to transformers' Aimv2VisionModel ones; qkv split in three."""
    out = {}
    for name, tensor in weights.items():
        if not name.startswith(prefix):
            continue
        name = name[len(prefix):]
        if name == "preprocessor.pos_embed":
            out["embeddings.position_embedding.weight"] = tensor[0]
            continue
        if name.endswith("attn.qkv.weight"):
            block = name.removesuffix("attn.qkv.weight").replace("trunk.blocks.", "encoder.layers.")
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3)):
                out[f"{block}attention.{proj}.weight"] = part
            continue
        for old, new in (("preprocessor.patchifier.proj.", "embeddings.patch_embed."),
                         ("preprocessor.patchifier.norm.", "embeddings.rms_norm."),
                         ("trunk.post_trunk_norm.", "rms_norm."), ("trunk.blocks.", "encoder.layers."),
                         ("attn.proj.", "attention.out_proj."), ("norm_1.", "rms_norm1."),
                         ("norm_2.", "rms_norm2."), ("mlp.fc1.", "ffn.gate_proj."),
                         ("mlp.fc3.", "ffn.up_proj."), ("mlp.fc2.", "ffn.down_proj.")):
            name = name.replace(old, new)
        out[name] = tensor
    return out


def reference_partition(width, height, grid):
    row_height = height // grid[0]
    col_width = width // grid[1]
    partition = []
    for row in range(grid[0]):
        for col in range(grid[1]):
            left = col * col_width
            upper = row * row_height
            right = width if col == grid[1] - 1 else (col + 1) * col_width
            lower = height if row == grid[0] - 1 else (row + 1) * row_height
            partition.append((left, upper, right, lower))
    return partition


def reference_sorted_grids(width, height, side, max_partition, covering_threshold):
    """The reference's sorted list of (grid, ratio); its first element is the chosen grid."""

    def covering_area(left, upper, right, lower):
        w = right - left
        h = lower - upper
        w, h = max(w, h), min(w, h)
        if w > side:
            h = h / w * side
            w = side
        return w * h

    candidate_grids = []
    for i in range(1, max_partition + 1):
        for j in range(1, max_partition + 1):
            if i * j <= max_partition:
                candidate_grids.append((i, j))
    all_grids, good_grids = [], []
    for grid in candidate_grids:
        partition = reference_partition(width, height, grid)
        ratio = sum([covering_area(*p) for p in partition]) / (width * height)
        assert ratio <= 1.0
        all_grids.append((grid, ratio))
        if ratio > covering_threshold:
            good_grids.append((grid, ratio))
    if good_grids:
        return sorted(good_grids, key=lambda x: (x[0][0] * x[0][1], -x[1]))
    return sorted(all_grids, key=lambda x: (-x[1], x[0][0] * x[0][1]))


def reference_grid(width, height, side, max_partition=9, covering_threshold=0.9):
    return reference_sorted_grids(width, height, side, max_partition, covering_threshold)[0][0]


def reference_pixels(image: Image.Image, side: int, processor, max_partition=9,
                     covering_threshold=0.9) -> tuple[torch.Tensor, tuple[int, int]]:
    """The reference's crops, each through `processor` (transformers' PIL SigLIP processor)
    resized to long side `side`, then zero-padded, centred, to side x side."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    grid = reference_grid(*image.size, side, max_partition, covering_threshold)
    crops = [image.crop(b) for b in reference_partition(*image.size, grid)]
    if len(crops) > 1:
        crops.insert(0, image)
    pixel_values = []
    for crop in crops:
        w, h = crop.size
        if w == h:
            nw = nh = side
        elif w > h:
            nw, nh = side, int(h / w * side)
        else:
            nw, nh = int(w / h * side), side
        pv = processor.preprocess(crop, size={"height": nh, "width": nw},
                                  return_tensors="pt")["pixel_values"]
        square = torch.zeros(1, 3, side, side, dtype=pv.dtype)
        if nh == nw:
            square[:] = pv
        elif nh > nw:
            off = (side - nw) // 2
            square[:, :, :, off:off + nw] = pv
        else:
            off = (side - nh) // 2
            square[:, :, off:off + nh, :] = pv
        pixel_values.append(square)
    return torch.cat(pixel_values), grid


def reference_placeholders(grid: tuple[int, int]) -> list[int]:
    ids = [-301, IMAGE_ATOM_ID, -302]
    if grid[0] * grid[1] > 1:
        for r in range(grid[0]):
            for c in range(grid[1]):
                ids.append(IMAGE_ATOM_ID)
                if c < grid[1] - 1:
                    ids.append(-303)
            if r < grid[0] - 1:
                ids.append(-304)
    ids.append(-305)
    return ids


class ReferenceOvis:
    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32):
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        self.config = cfg
        self.dtype = dtype
        self.multimodal_max_length = cfg["multimodal_max_length"]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.formatter = FORMATTERS[cfg["conversation_formatter_class"]](self._tokenize_with_image_symbol)

        llm_cfg = dict(cfg["llm_config"])
        self.llm_type = llm_cfg.pop("model_type")
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD_TOKENS[self.llm_type])
        eos = llm_cfg["eos_token_id"]
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])
        generation = path / "generation_config.json"
        if generation.exists():
            eos = json.loads(generation.read_text()).get("eos_token_id", [])
            self.stop_ids |= set(eos if isinstance(eos, list) else [eos])
        llm_config = AutoConfig.for_model(self.llm_type, **llm_cfg, attn_implementation="eager")
        self.llm = AutoModelForCausalLM.from_config(llm_config).to(dtype).eval()
        # Gemma2 multiplies the whole merged input sequence by sqrt(hidden) (transformers 4.44).
        self.embedding_scale = cfg["hidden_size"] ** 0.5 if self.llm_type == "gemma2" else None

        vt = cfg["visual_tokenizer_config"]
        bb = dict(vt["backbone_config"])
        self.backbone_type = bb.pop("model_type")
        if self.backbone_type == "aimv2":  # AIDC-AI's AIMv2Config -> transformers' (no pooling head)
            self.backbone = Aimv2VisionModel(Aimv2VisionConfig(
                hidden_size=bb["hidden_size"], intermediate_size=bb["intermediate_size"],
                num_hidden_layers=bb["num_hidden_layers"], num_attention_heads=bb["num_attention_heads"],
                num_channels=bb["num_channels"], image_size=bb["image_size"], patch_size=bb["patch_size"],
                rms_norm_eps=bb["rms_norm_eps"], qkv_bias=bb["qkv_bias"], mlp_bias=bb["use_bias"],
                use_head=False)).to(dtype).eval()
        else:
            self.backbone = SiglipVisionModel(SiglipVisionConfig(**bb)).to(dtype).eval()
        self.hidden_stride = vt["hidden_stride"]
        self.visual_vocab = vt["vocab_size"]
        head_width = self.visual_vocab - 5
        self.head = torch.nn.Sequential(
            torch.nn.Linear(bb["hidden_size"] * self.hidden_stride**2, head_width, bias=False),
            torch.nn.LayerNorm(head_width)).to(dtype).eval()
        self.vte = torch.nn.Embedding(self.visual_vocab, cfg["hidden_size"]).to(dtype).eval()

        weights = {}
        for file in sorted(path.glob("*.safetensors")):
            weights |= load_file(file)
        weights = {k: v.to(dtype) if v.is_floating_point() else v
                   for k, v in dequantized_weights(weights).items()}
        self._load(self.llm, weights, "llm.", strict_missing={"lm_head.weight"})
        if self.backbone_type == "aimv2":
            self._load(self.backbone, aimv2_weights(weights, "visual_tokenizer.backbone."), "")
        else:
            # transformers 5.x's SiglipVisionModel names its tensors without `vision_model.`.
            self._load(self.backbone, weights, "visual_tokenizer.backbone.vision_model.")
        self._load(self.head, weights, "visual_tokenizer.head.")
        self._load(self.vte, weights, "vte.")
        self.llm.tie_weights()

        # The reference's image processor: SigLIP's (Ovis1.6, side = size) or CLIP's without the
        # centre crop (Ovis2, side = crop_size), with the checkpoint's settings.
        pp = json.loads((path / "preprocessor_config.json").read_text())
        common = dict(do_resize=True, resample=pp["resample"], do_rescale=True,
                      rescale_factor=pp["rescale_factor"], do_normalize=True,
                      image_mean=pp["image_mean"], image_std=pp["image_std"])
        if pp["image_processor_type"] == "CLIPImageProcessor":
            self.side = pp["crop_size"]["height"]
            self.image_processor = CLIPImageProcessorPil(
                size={"shortest_edge": self.side}, crop_size=pp["crop_size"], do_center_crop=False,
                do_convert_rgb=pp.get("do_convert_rgb", True), **common)
        else:
            self.side = pp["size"]["height"]
            self.image_processor = SiglipImageProcessorPil(
                size={"height": self.side, "width": self.side}, **common)

    def _load(self, module, weights, prefix, strict_missing=()):
        sd = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(sd, strict=False)
        missing = set(missing) - set(strict_missing)
        assert not missing and not unexpected, (prefix, missing, unexpected)

    # ---- images ----------------------------------------------------------------------------
    def preprocess_image(self, image: Image.Image, max_partition=9, covering_threshold=0.9):
        return reference_pixels(image, self.side, self.image_processor, max_partition, covering_threshold)

    @torch.no_grad()
    def visual_tokens(self, pixel_values: torch.Tensor, quirks=()) -> torch.Tensor:
        """[crops, 3, side, side] -> [crops, T, V] probabilities (5 zero indicator columns)."""
        out = self.backbone(pixel_values.to(self.dtype), output_hidden_states=True)
        features = out.hidden_states[-1]  # before the post-LayerNorm
        if "post_layernorm" in quirks:
            features = self.backbone.post_layernorm(features)
        n, length, d = features.shape
        g = int(length**0.5)
        s = self.hidden_stride
        pad = (s - g % s) % s
        features = torch.nn.functional.pad(features.reshape(n, g, g, d), (0, 0, 0, pad, 0, pad))
        g += pad
        features = features.reshape(n, g // s, s, g // s, s, d).permute(0, 1, 3, 2, 4, 5)
        features = features.flatten(3).reshape(n, -1, s * s * d)
        probs = torch.softmax(self.head(features), dim=-1)
        return torch.nn.functional.pad(probs, (0, 5))

    # ---- prompt ----------------------------------------------------------------------------
    def _tokenize_with_image_symbol(self, text: str) -> list[int]:
        ids: list[int] = []
        chunks = text.split("<image>")
        for i, chunk in enumerate(chunks):
            ids.extend(self.tokenizer(chunk, add_special_tokens=False).input_ids)
            if i < len(chunks) - 1:
                ids.append(IMAGE_TOKEN_ID)
        return ids

    def format_conversation(self, turns: list[tuple[str, str]]) -> list[int]:
        """The checkpoint's conversation formatter over turns of ("system"|"user"|"assistant",
        text), with the generation prompt (generation_preface "") appended: token ids, -200 for
        each <image>."""
        role = {"system": "system", "user": "human", "assistant": "gpt"}
        _, ids = self.formatter.format([{"from": role[r], "value": t} for r, t in turns],
                                       generation_preface="")
        return ids

    @torch.no_grad()
    def merged_embeddings(self, raw_ids: list[int], images: list[Image.Image], max_partition=9,
                          covering_threshold=0.9, quirks=()):
        """Splice each image's placeholders, then embed: returns (unscaled embeddings [L, D], ids
        with the placeholder ids in place). `quirks` (a subset of BUILTIN_QUIRKS) reproduces
        vLLM's built-in Ovis instead of the reference."""
        assert set(quirks) <= set(BUILTIN_QUIRKS), quirks
        ids, crops, grids = [], [], []
        image_iter = iter(images)
        for t in raw_ids:
            if t == IMAGE_TOKEN_ID:
                pv, grid = self.preprocess_image(next(image_iter), max_partition, covering_threshold)
                crops.append(pv)
                grids.append(grid)
                ids.extend(reference_placeholders(grid))
            else:
                ids.append(t)
        ids_t = torch.tensor(ids)
        placeholder = ids_t < 0
        embeds = self.llm.get_input_embeddings().weight[ids_t.masked_fill(placeholder, 0)].clone()
        indicator_rows = self.vte.weight[self.visual_vocab - 5:]
        if "reversed_indicators" in quirks:
            indicator_rows = indicator_rows.flip(0)
        for i, ind in enumerate(IMAGE_INDICATOR_IDS):
            embeds[ids_t == ind] = indicator_rows[i]
        if crops:
            tokens = self.visual_tokens(torch.cat(crops), quirks)
            visual = torch.matmul(tokens, self.vte.weight)  # [crops, T, D]
            parts, prev = [], -1
            atoms = torch.where(ids_t == IMAGE_ATOM_ID)[0].tolist()
            assert len(atoms) == visual.shape[0]
            for k, pos in enumerate(atoms):
                parts += [embeds[prev + 1:pos], visual[k]]
                prev = pos
            parts.append(embeds[prev + 1:])
            embeds = torch.cat(parts)
            expanded = []
            for t in ids:
                expanded.extend([IMAGE_ATOM_ID] * visual.shape[1] if t == IMAGE_ATOM_ID else [t])
            ids = expanded
        if "unscaled_visual" in quirks and self.embedding_scale:  # cancel logits()'s scale
            visual = torch.tensor([t < 0 for t in ids])
            embeds[visual] /= torch.tensor(self.embedding_scale, dtype=embeds.dtype)
        embeds = embeds[: self.multimodal_max_length]
        return embeds, ids[: self.multimodal_max_length]

    @torch.no_grad()
    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        """The LLM over a merged sequence. transformers 5.x's Gemma2 scales embeddings inside its
        embedding module, so for `inputs_embeds` the sqrt(hidden_size) factor of transformers
        4.44 (applied to the whole merged sequence, visual rows included) is applied here."""
        if self.embedding_scale is not None:
            embeds = embeds * torch.tensor(self.embedding_scale, dtype=embeds.dtype)
        out = self.llm(inputs_embeds=embeds[None], use_cache=False)
        return out.logits[0].float()

    @torch.no_grad()
    def greedy(self, embeds: torch.Tensor, max_new_tokens: int):
        """Greedy tokens (until one of the checkpoint's eos ids) and, per step, the logits they
        were chosen from."""
        tokens, step_logits = [], []
        emb_table = self.llm.get_input_embeddings().weight
        for _ in range(max_new_tokens):
            logits = self.logits(embeds)[-1]
            tok = int(logits.argmax())
            tokens.append(tok)
            step_logits.append(logits)
            if tok in self.stop_ids:
                break
            embeds = torch.cat([embeds, emb_table[tok][None]])
        return tokens, step_logits
