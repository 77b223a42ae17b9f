"""What differs between the Ovis checkpoints on vLLM's "Ovis" architecture: one row per member.

Every checkpoint whose config.json says `"architectures": ["Ovis"]` reaches this plugin. The
members share the visual tokenizer design (docs/reference.md); they differ in the LLM, the
vision backbone, the token that fills an image's prompt positions, whether the LLM scales its
input embeddings, and the conversation format. A new member is a row in MEMBERS.

Checkpoints with no row here (Ovis1.5, or a combination no release uses) are handed to vLLM's
built-in Ovis (engine/model.py), so installing the plugin never loses a checkpoint that vLLM
serves.
"""

from __future__ import annotations

from dataclasses import dataclass

from .chat_template import GEMMA, LLAMA3, QWEN, QWEN3, Conversation


@dataclass(frozen=True)
class Member:
    name: str
    llm_type: str                   # llm_config.model_type
    backbone_type: str              # visual_tokenizer_config.model_type
    image_pad_token: str            # fills an image's positions in the prompt (as vLLM's built-in)
    scales_visual_embeddings: bool  # the LLM multiplies the whole merged sequence by sqrt(hidden)
    conversation: Conversation
    architectures: tuple[str, ...] = ("Ovis",)  # config.json's "architectures"
    video_pad_token: str | None = None  # fills a video's positions (None: no video)
    thinks: bool = False  # a thinking mode (`<think>` ... `</think>`, the reference's budget)


MEMBERS = (
    # Ovis1.6-Gemma2-9B / -27B (and GPTQ-Int4). Gemma2 scales every input embedding, visual rows
    # included, by sqrt(hidden_size) in the reference (transformers 4.44).
    Member("Ovis1.6-Gemma2", "gemma2", "siglip_visual_tokenizer", "<unused0>", True, GEMMA),
    # Ovis1.6-Llama3.2-3B (and GPTQ-Int4): Llama has no embedding scale.
    Member("Ovis1.6-Llama3.2", "llama", "siglip_visual_tokenizer", "<|reserved_special_token_0|>",
           False, LLAMA3),
    # Ovis2-1B ... 34B: AIMv2 + Qwen2.5, no embedding scale.
    # A video is its frames, each an image with max_partition 1, as Ovis2's guide runs one.
    Member("Ovis2", "qwen2", "aimv2_visual_tokenizer", "<|image_pad|>", False, QWEN,
           video_pad_token="<|video_pad|>"),
    # Ovis2.5-2B / -9B and Ovis2.6 dense: SigLIP2-NaViT + Qwen3 (engine/model_ovis2_5.py), the
    # checkpoint's own chat template, images and one video.
    Member("Ovis2.5", "qwen3", "siglip2_navit", "<|image_pad|>", False, QWEN3,
           architectures=("Ovis2_5", "Ovis2_6ForCausalLM"), video_pad_token="<|video_pad|>", thinks=True),
    # Ovis2.6-30B-A3B: the same with a Qwen3-MoE LLM.
    Member("Ovis2.6-MoE", "qwen3_moe", "siglip2_navit", "<|image_pad|>", False, QWEN3,
           architectures=("Ovis2_6_MoeForCausalLM",), video_pad_token="<|video_pad|>", thinks=True),
)

# The architectures this plugin registers (engine/__init__.py); each is built by the model file
# of its generation, which hands a checkpoint without a member row to vLLM's built-in class.
OVIS_ARCHITECTURES = ("Ovis",)
OVIS2_5_ARCHITECTURES = ("Ovis2_5", "Ovis2_6ForCausalLM", "Ovis2_6_MoeForCausalLM")


def _field(config, key: str):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def _parts(config) -> tuple[object, object]:
    """(visual tokenizer config, LLM config) of an Ovis config: vLLM's OvisConfig (which keeps
    llm_config as its text config), ours for Ovis2.5 (`vit_config`), or config.json as a dict."""
    if isinstance(config, dict):
        visual = config.get("visual_tokenizer_config") or config.get("vit_config") or {}
        return visual, config.get("llm_config") or {}
    visual = getattr(config, "visual_tokenizer_config", None) or getattr(config, "vit_config", None)
    return visual, config.get_text_config()


def checkpoint_kind(config) -> tuple[str | None, str | None]:
    """(visual tokenizer model_type, LLM model_type) of an Ovis config."""
    visual, llm = _parts(config)
    return _field(visual, "model_type"), _field(llm, "model_type")


def member_of(config) -> Member | None:
    """The member row of an Ovis checkpoint's config, or None when this plugin does not
    implement it (vLLM's built-in then serves it)."""
    visual, _ = _parts(config)
    # Ovis1.5 shares Ovis1.6's visual tokenizer type but has no hidden_stride merge and may use a
    # multi-scale "hd_booster": a different model.
    if (_field(visual, "hidden_stride") or 1) < 2 or _field(visual, "hd_booster"):
        return None
    backbone_type, llm_type = checkpoint_kind(config)
    architectures = _field(config, "architectures") or []
    for member in MEMBERS:
        if member.backbone_type == backbone_type and member.llm_type == llm_type and \
                set(member.architectures) & set(architectures):
            return member
    return None


def builtin_fallback_message(config) -> str:
    """The log line for a checkpoint handed to vLLM's built-in Ovis (docs/reference.md lists
    what it computes differently on every member)."""
    backbone, llm = checkpoint_kind(config)
    if set(_field(config, "architectures") or []) & set(OVIS2_5_ARCHITECTURES):
        return (f"This Ovis2.5/2.6 checkpoint (vision tower {backbone}, LLM {llm}) is not "
                "implemented by the ovis-vllm plugin yet: it is served by vLLM's built-in Ovis2_5 "
                "(unfused visual embedding, run-time visual token ids). See README.md.")
    return (f"This Ovis checkpoint (visual tokenizer {backbone}, LLM {llm}) is not implemented by "
            "the ovis-vllm plugin yet: it is served by vLLM's built-in Ovis, which computes "
            "differently from AIDC-AI's reference (image indicator rows in reversed order; "
            "prompts with images of different crop grids fail). See README.md.")


def pad_token_id(tokenizer, member: Member, token: str) -> int:
    """A pad token's id in this checkpoint's tokenizer; a clear error if it has none."""
    ids = tokenizer.convert_tokens_to_ids([token])
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or ids[0] is None or ids[0] == unk:
        raise ValueError(f"{member.name}: the tokenizer has no {token!r} token, which this "
                         "member's images and videos are placed on")
    return ids[0]


def image_pad_id(tokenizer, member: Member) -> int:
    return pad_token_id(tokenizer, member, member.image_pad_token)
