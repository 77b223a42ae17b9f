"""Independent reference forward of Ovis1.6-Gemma2, for tests only.

Composed from Hugging Face transformers' own `SiglipVisionModel`, `SiglipImageProcessorPil` and
`Gemma2ForCausalLM`, following REFERENCE.md step by step (the AIDC-AI Ovis1.6 code line). It
shares no code with `engine/`, so the engine is checked against a second, separately written
reading of the spec.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

IMAGE_TOKEN_ID, IMAGE_ATOM_ID = -200, -300
IMAGE_INDICATOR_IDS = [-301, -302, -303, -304, -305]

# vLLM's built-in Ovis deviations (REFERENCE.md, differences 1-3), for emulating it on purpose.
BUILTIN_QUIRKS = ("reversed_indicators", "post_layernorm", "unscaled_visual")


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

        llm_cfg = dict(cfg["llm_config"])
        llm_cfg.pop("model_type")
        self.llm = Gemma2ForCausalLM(Gemma2Config(**llm_cfg, attn_implementation="eager")).to(dtype).eval()

        vt = cfg["visual_tokenizer_config"]
        bb = dict(vt["backbone_config"])
        bb.pop("model_type")
        self.backbone = SiglipVisionModel(SiglipVisionConfig(**bb)).to(dtype).eval()
        self.side = bb["image_size"]
        self.hidden_stride = vt["hidden_stride"]
        self.visual_vocab = vt["vocab_size"]
        head_width = self.visual_vocab - 5
        self.head = torch.nn.Sequential(
            torch.nn.Linear(bb["hidden_size"] * self.hidden_stride**2, head_width, bias=False),
            torch.nn.LayerNorm(head_width)).to(dtype).eval()
        self.vte = torch.nn.Embedding(self.visual_vocab, cfg["hidden_size"]).to(dtype).eval()

        weights = load_file(path / "model.safetensors")
        self._load(self.llm, weights, "llm.", strict_missing={"lm_head.weight"})
        # transformers 5.x's SiglipVisionModel names its tensors without the `vision_model.` level.
        self._load(self.backbone, weights, "visual_tokenizer.backbone.vision_model.")
        self._load(self.head, weights, "visual_tokenizer.head.")
        self._load(self.vte, weights, "vte.")
        self.llm.tie_weights()

        pp = json.loads((path / "preprocessor_config.json").read_text())
        self.image_processor = SiglipImageProcessorPil(
            do_resize=True, size={"height": self.side, "width": self.side}, resample=pp["resample"],
            do_rescale=True, rescale_factor=pp["rescale_factor"], do_normalize=True,
            image_mean=pp["image_mean"], image_std=pp["image_std"])

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
        """Gemma conversation formatter: turns of ("user"|"assistant", text); a generation prompt
        (`<start_of_turn>model\\n`) is appended."""
        if turns and turns[0][0] == "system":
            raise ValueError("Gemma does not support system prompt")
        ids = self.tokenizer("<bos>", add_special_tokens=False).input_ids
        for role, message in turns:
            head = {"user": "<start_of_turn>user\n", "assistant": "<start_of_turn>model\n"}[role]
            ids += self._tokenize_with_image_symbol(head + message.strip() + "<end_of_turn>\n")
        ids += self._tokenize_with_image_symbol("<start_of_turn>model\n")
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
        if "unscaled_visual" in quirks:  # cancel the sqrt(hidden) that logits() applies
            visual = torch.tensor([t < 0 for t in ids])
            embeds[visual] /= torch.tensor(self.config["hidden_size"] ** 0.5, dtype=embeds.dtype)
        embeds = embeds[: self.multimodal_max_length]
        return embeds, ids[: self.multimodal_max_length]

    @torch.no_grad()
    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        """Gemma2 over a merged sequence. transformers 5.x scales embeddings inside its embedding
        module, so for `inputs_embeds` the sqrt(hidden_size) factor of transformers 4.44 (applied
        to the whole merged sequence, visual rows included) is applied here."""
        normalizer = torch.tensor(self.config["hidden_size"] ** 0.5, dtype=embeds.dtype)
        out = self.llm(inputs_embeds=(embeds * normalizer)[None], use_cache=False)
        return out.logits[0].float()

    @torch.no_grad()
    def greedy(self, embeds: torch.Tensor, max_new_tokens: int, stop_ids=(1, 107)):
        """Greedy tokens and, per step, the logits they were chosen from."""
        tokens, step_logits = [], []
        emb_table = self.llm.get_input_embeddings().weight
        for _ in range(max_new_tokens):
            logits = self.logits(embeds)[-1]
            tok = int(logits.argmax())
            tokens.append(tok)
            step_logits.append(logits)
            if tok in stop_ids:
                break
            embeds = torch.cat([embeds, emb_table[tok][None]])
        return tokens, step_logits
