"""The reference's tokenization for Ovis prompts given as text, whatever the tokenizer knows.

AIDC-AI's formatter writes the conversation as text, splits it on the literal `<image>` and
tokenizes each piece on its own (add_special_tokens=False), an image placeholder between pieces.
Published checkpoints ship the base LLM's tokenizer, which has no `<image>` token: tokenizing the
whole text lets BPE merge across the marker's edges (">\\n", "\\n<", ">D") and gives other ids
than the reference. vLLM turns text prompts into ids in one place, its renderer's
`_tokenize_prompt` (chat, completions and `LLM.generate` alike; the async path runs the same
method in a thread). This subclass of vLLM's HF renderer tokenizes there the reference's way for
the checkpoints this plugin implements (engine/members.py) and leaves every other model to vLLM.

Each marker becomes one id, the member's image pad token, which the processor expands to the
image's positions. Refused with a clear error, as the reference refuses them:
- `<image>` in a prompt that carries no image (the reference's image count check fails);
- the pad token written as text in a prompt with images (it would be taken for a marker).
"""

from __future__ import annotations

import re

from vllm.renderers.hf import HfRenderer

from .members import OVIS2_5_ARCHITECTURES, OVIS_ARCHITECTURES, member_of, pad_token_id
from .placeholders import IMAGE_TOKEN, VIDEO_TOKEN


def reference_token_ids(tokenizer, text: str, marker_ids: dict[str, int],
                        pad_tokens: dict[str, tuple[str, int]]) -> list[int]:
    """The pieces of `text` between markers (the keys of `marker_ids`), each tokenized on its own
    without special tokens, with each marker's id between pieces. `pad_tokens` (modality ->
    (token, id)) may not appear as text."""
    parts = re.split("(" + "|".join(map(re.escape, marker_ids)) + ")", text)
    pieces, markers = parts[0::2], parts[1::2]
    encoded = tokenizer(pieces, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for i, piece_ids in enumerate(encoded):
        for modality, (pad_token, pad_id) in pad_tokens.items():
            if pad_id in piece_ids:
                raise ValueError(f"the prompt contains the {modality} pad token {pad_token!r} as "
                                 f"text; it is reserved for {modality} positions: mark each "
                                 f"{modality} with <{modality}>")
        if i:
            ids.append(marker_ids[markers[i - 1]])
        ids.extend(piece_ids)
    return ids


def special_token_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the special tokens the tokenizer adds around a text (e.g. a leading
    <bos>), found by encoding a probe with and without them."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    wrapped = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(wrapped) - len(plain) + 1):
        if wrapped[start:start + len(plain)] == plain:
            return wrapped[:start], wrapped[start + len(plain):]
    raise ValueError("cannot tell which special tokens this tokenizer adds around a text")


class OvisHfRenderer(HfRenderer):
    def __init__(self, config, tokenizer) -> None:
        super().__init__(config, tokenizer)
        model_config = config.model_config
        member = None
        ours = set(OVIS_ARCHITECTURES + OVIS2_5_ARCHITECTURES)
        if ours & set(model_config.architectures or []) and self.tokenizer is not None:
            member = member_of(model_config.hf_config)
        self._ovis_member = member
        # marker -> (pad token, its id): <image> always, <video> where the member takes videos.
        self._ovis_markers = {}
        if member:
            for marker, pad in ((IMAGE_TOKEN, member.image_pad_token), (VIDEO_TOKEN, member.video_pad_token)):
                if pad is not None:
                    self._ovis_markers[marker] = (pad, pad_token_id(self.tokenizer, member, pad))
        self._ovis_wrapping = special_token_wrapping(self.tokenizer) if member else None

    def _tokenize_prompt(self, prompt, params):
        text = prompt["prompt"]
        has_media = bool(prompt.get("multi_modal_data"))
        found = [m for m in self._ovis_markers if m in text]
        if self._ovis_member is None or not (has_media or found):
            return super()._tokenize_prompt(prompt, params)
        if not has_media:
            raise ValueError(
                f"the prompt contains {found[0]} but no {found[0][1:-1]} was given; each "
                f"{found[0]} marks where one goes (the reference model refuses this prompt too)")
        if self._ovis_member.video_pad_token and "Ovis" in self._ovis_member.architectures:
            # Ovis2: a video stands for its frames' <image> markers, and the text between
            # markers of either kind is tokenized piece by piece (engine/processor.py).
            markers = found or [IMAGE_TOKEN]
        else:
            # Ovis2.5's _tokenize_with_visual_placeholder: a prompt with <video> is split on
            # <video> only.
            markers = [VIDEO_TOKEN if VIDEO_TOKEN in found else IMAGE_TOKEN]
        pads = {m[1:-1]: pad for m, pad in self._ovis_markers.items()}  # "image" -> (token, id)
        ids = reference_token_ids(self.tokenizer, text, {m: self._ovis_markers[m][1] for m in markers}, pads)
        if params.add_special_tokens:
            # Chat prompts are tokenized without: the reference's template writes <bos> itself.
            prefix, suffix = self._ovis_wrapping
            ids = prefix + ids + suffix
        return self._build_tokens_prompt(ids, prompt)

    def _validate_mm_uuids(self, mm_data, mm_data_items, mm_uuid_items) -> None:
        try:
            super()._validate_mm_uuids(mm_data, mm_data_items, mm_uuid_items)
        except ValueError as exc:
            if "is empty" not in str(exc):
                raise
            # An image_url part whose url is "" reaches here as an empty item.
            raise ValueError(f"an image_url part has an empty url; give the image as a data: or "
                             f"http(s): URL ({exc})") from exc
