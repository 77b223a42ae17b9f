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

from .chat_template import GEMMA, LLAMA3, QWEN, Conversation


@dataclass(frozen=True)
class Member:
    name: str
    llm_type: str                   # llm_config.model_type
    backbone_type: str              # visual_tokenizer_config.model_type
    image_pad_token: str            # fills an image's positions in the prompt (as vLLM's built-in)
    scales_visual_embeddings: bool  # the LLM multiplies the whole merged sequence by sqrt(hidden)
    conversation: Conversation


MEMBERS = (
    # Ovis1.6-Gemma2-9B / -27B (and GPTQ-Int4). Gemma2 scales every input embedding, visual rows
    # included, by sqrt(hidden_size) in the reference (transformers 4.44).
    Member("Ovis1.6-Gemma2", "gemma2", "siglip_visual_tokenizer", "<unused0>", True, GEMMA),
    # Ovis1.6-Llama3.2-3B (and GPTQ-Int4): Llama has no embedding scale.
    Member("Ovis1.6-Llama3.2", "llama", "siglip_visual_tokenizer", "<|reserved_special_token_0|>",
           False, LLAMA3),
    # Ovis2-1B ... 34B: AIMv2 + Qwen2.5, no embedding scale.
    Member("Ovis2", "qwen2", "aimv2_visual_tokenizer", "<|image_pad|>", False, QWEN),
)


def _field(config, key: str):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def _parts(config) -> tuple[object, object]:
    """(visual tokenizer config, LLM config) of an Ovis config: vLLM's OvisConfig (which keeps
    llm_config as its text config) or config.json as a dict."""
    if isinstance(config, dict):
        return config.get("visual_tokenizer_config") or {}, config.get("llm_config") or {}
    return getattr(config, "visual_tokenizer_config", None), config.get_text_config()


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
    for member in MEMBERS:
        if member.backbone_type == backbone_type and member.llm_type == llm_type:
            return member
    return None


def builtin_fallback_message(config) -> str:
    """The log line for a checkpoint handed to vLLM's built-in Ovis (docs/reference.md lists
    what it computes differently on every member)."""
    backbone, llm = checkpoint_kind(config)
    return (f"This Ovis checkpoint (visual tokenizer {backbone}, LLM {llm}) is not implemented by "
            "the ovis-vllm plugin yet: it is served by vLLM's built-in Ovis, which computes "
            "differently from AIDC-AI's reference (image indicator rows in reversed order; "
            "prompts with images of different crop grids fail). See README.md.")


def image_pad_id(tokenizer, member: Member) -> int:
    """The pad token's id in this checkpoint's tokenizer; a clear error if it has none."""
    ids = tokenizer.convert_tokens_to_ids([member.image_pad_token])
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or ids[0] is None or ids[0] == unk:
        raise ValueError(f"{member.name}: the tokenizer has no {member.image_pad_token!r} token, "
                         "which this member's images are placed on")
    return ids[0]
