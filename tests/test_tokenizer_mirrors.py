"""The tokenizer mirrors (engine/checkpoints/tokenizer_mirrors.py): special ids, structure, `<image>` handling,
round trips, marker-edge merges and save/reload. Fast; no vLLM engine."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ovis_vllm.engine.checkpoints.tokenizer_mirrors import (
    GEMMA2_CHAT_TEMPLATE,
    GEMMA_SPECIAL_TOKENS,
    LLAMA3_SPECIAL_TOKENS,
    LLAMA3_SPLIT_PATTERN,
    build_gemma_tokenizer,
    build_llama3_tokenizer,
    build_qwen2_tokenizer,
    write_special_tokens_map,
)

MARKER = "<image>"

ROUND_TRIP_TEXTS = [
    "Describe the image in detail.",
    "  two leading spaces, a tab\tand\nnew lines\n\n",
    "naïve café 日本 🙂",
    "Image 1:<image>Describe <image>\n",
]

# Ovis prompts with the marker at each kind of edge (the chat-formatted ones are added per kind).
MARKER_CASES = [
    "<image>\nDescribe the image.",                 # start of a message, newline after
    "Image 1:<image>Describe the first image.",     # glued on both sides
    "<image><image>\nCompare the two images.",      # several in a row
    "\n<image>\n",                                  # newlines around
    "Look at this picture:\n<image>\nHow many people are there?",
    "Here is a photo <image> of a dog.",            # spaces around
]
CHAT = [
    {"role": "user", "content": "<image>\nDescribe the image."},
    {"role": "assistant", "content": "The image shows a cat."},
    {"role": "user", "content": "Image 2:<image>Describe the second image.\n<image>"},
]


@dataclass
class Kind:
    tok: object
    length: int
    specials: dict[str, int]
    special_map: dict  # the published special_tokens_map.json, parsed
    special_map_bytes: int | None  # its size, where the published file is known
    edges: tuple[str, ...]  # marker edges a whole-text token must cross (as text)


GEMMA_MAP = {
    "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
    **{key: {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
             "single_word": False}
       for key, content in (("bos_token", "<bos>"), ("eos_token", "<eos>"),
                            ("pad_token", "<pad>"), ("unk_token", "<unk>"))},
}
LLAMA3_MAP = {
    key: {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
          "single_word": False}
    for key, content in (("bos_token", "<|begin_of_text|>"), ("eos_token", "<|eot_id|>"),
                         ("pad_token", "<|end_of_text|>"))
}


@pytest.fixture(scope="module")
def gemma():
    return build_gemma_tokenizer()


@pytest.fixture(scope="module")
def llama3():
    return build_llama3_tokenizer()


QWEN2_MAP = {
    "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    **{key: {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
             "single_word": False}
       for key, content in (("eos_token", "<|im_end|>"), ("pad_token", "<|endoftext|>"))},
}


@pytest.fixture(scope="module")
def qwen2():
    return build_qwen2_tokenizer()


@pytest.fixture(scope="module", params=["gemma", "llama3", "qwen2"])
def kind(request, gemma, llama3, qwen2):
    if request.param == "qwen2":
        specials = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                    "<|image_pad|>": 151655, "<|file_sep|>": 151664}
        return Kind(qwen2, 151665, specials, QWEN2_MAP, None, (">\n", ">D", " <", ":<"))
    if request.param == "gemma":
        specials = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "<2mass>": 5,
                    "[@BOS@]": 6, "<unused0>": 7, "<unused98>": 105, "<start_of_turn>": 106,
                    "<end_of_turn>": 107}
        return Kind(gemma, 1024, specials, GEMMA_MAP, 636, (">\n", "\n<", ">D", " <"))
    specials = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001,
                "<|reserved_special_token_0|>": 128002, "<|reserved_special_token_1|>": 128003,
                "<|finetune_right_pad_id|>": 128004, "<|reserved_special_token_2|>": 128005,
                "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008,
                "<|eot_id|>": 128009, "<|python_tag|>": 128010,
                "<|reserved_special_token_3|>": 128011, "<|reserved_special_token_247|>": 128255}
    # "\n<" cannot merge here: Llama 3's regex always cuts a newline from a following "<".
    return Kind(llama3, 128256, specials, LLAMA3_MAP, 444, (">\n", ">D", " <", ":<"))


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def chunked_ids(tok, text: str) -> list[int]:
    """The reference's tokenization (each piece between markers on its own), with the marker's own
    tokens between pieces, so that it is comparable with tokenizing the whole text."""
    pieces = text.split(MARKER)
    out = ids(tok, pieces[0])
    for piece in pieces[1:]:
        out += ids(tok, MARKER) + ids(tok, piece)
    return out


def marker_cases(tok) -> list[str]:
    return MARKER_CASES + [tok.apply_chat_template(CHAT, tokenize=False,
                                                   add_generation_prompt=True)]


# ---- special tokens, sizes, structure ------------------------------------------------------------
def test_special_ids_and_length(kind):
    tok = kind.tok
    assert len(tok) == kind.length
    for content, i in kind.specials.items():
        assert tok.convert_tokens_to_ids(content) == i, content
        assert ids(tok, content) == [i], content
        assert tok.added_tokens_decoder[i].special, content
    assert tok.all_special_ids  # bos/eos/pad resolved
    for key, entry in kind.special_map.items():
        if key != "additional_special_tokens":
            assert getattr(tok, key) == entry["content"]


def test_gemma_layout(gemma):
    assert [gemma.convert_ids_to_tokens(i) for i in range(108)] == GEMMA_SPECIAL_TOKENS
    assert all(gemma.added_tokens_decoder[i].special for i in range(108))
    base_vocab = gemma.backend_tokenizer.get_vocab(with_added_tokens=False)
    assert all(base_vocab[t] == i for i, t in enumerate(GEMMA_SPECIAL_TOKENS))  # also in the BPE
    assert base_vocab["<0x00>"] == 108 and base_vocab["<0xFF>"] == 363
    assert len(build_gemma_tokenizer(512)) == 512
    assert (gemma.bos_token_id, gemma.eos_token_id, gemma.pad_token_id, gemma.unk_token_id) \
        == (2, 1, 0, 3)
    assert gemma.add_bos_token and not gemma.add_eos_token
    assert gemma("Hi").input_ids[0] == 2
    assert gemma.chat_template == GEMMA2_CHAT_TEMPLATE
    assert gemma.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\n<image>\nDescribe the image.<end_of_turn>\n"
        "<start_of_turn>model\n")

    spec = json.loads(gemma.backend_tokenizer.to_str())
    assert spec["normalizer"] == {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    assert spec["pre_tokenizer"] is None
    assert spec["decoder"] == {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}]}
    post = spec["post_processor"]
    assert post["type"] == "TemplateProcessing"
    assert post["special_tokens"] == {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}}
    model = spec["model"]
    assert (model["type"], model["unk_token"], model["fuse_unk"], model["byte_fallback"]) \
        == ("BPE", "<unk>", True, True)
    assert len(model["vocab"]) == 1024


def test_llama3_layout(llama3):
    assert [llama3.convert_ids_to_tokens(128000 + i) for i in range(256)] == LLAMA3_SPECIAL_TOKENS
    assert all(llama3.added_tokens_decoder[128000 + i].special for i in range(256))
    assert (llama3.bos_token_id, llama3.eos_token_id, llama3.pad_token_id) \
        == (128000, 128009, 128001)
    assert llama3.model_max_length == 131072
    assert llama3.model_input_names == ["input_ids", "attention_mask"]
    assert llama3("Hi").input_ids[0] == 128000
    prompt = llama3.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert prompt.endswith("<|start_header_id|>user<|end_header_id|>\n\n<image>\nDescribe the "
                           "image.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")

    spec = json.loads(llama3.backend_tokenizer.to_str())
    assert spec["normalizer"] is None
    assert spec["pre_tokenizer"] == {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT_PATTERN}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]}
    byte_level, template = spec["post_processor"]["processors"]
    assert (byte_level["type"], byte_level["trim_offsets"]) == ("ByteLevel", False)
    assert template["type"] == "TemplateProcessing"
    assert template["special_tokens"]["<|begin_of_text|>"]["ids"] == [128000]
    assert spec["decoder"]["type"] == "ByteLevel"
    model = spec["model"]
    assert (model["type"], model["unk_token"], model["fuse_unk"], model["byte_fallback"],
            model["ignore_merges"]) == ("BPE", None, False, False, True)
    assert len(model["vocab"]) == 128000
    assert model["vocab"]["!"] == 0  # byte symbols first, in Llama 3's order

    # The fillers (the vocab's top, up to 127999) are unreachable from text.
    first_filler = min(i for t, i in model["vocab"].items() if t.startswith("fillerĠ"))
    text = " ".join(ROUND_TRIP_TEXTS + marker_cases(llama3)) + f" filler 123 filler {first_filler}"
    assert max(i for i in ids(llama3, text) if i < 128000) < first_filler


# ---- <image>, round trips, marker edges ---------------------------------------------------------
def test_image_marker_is_not_a_token(kind):
    tok = kind.tok
    assert MARKER not in tok.get_vocab()
    assert tok.convert_tokens_to_ids(MARKER) in (None, tok.unk_token_id)
    assert len(ids(tok, MARKER)) > 1
    assert tok.unk_token_id not in ids(tok, MARKER)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(kind, text):
    tok = kind.tok
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text  # bos dropped
    assert tok.decode(ids(tok, text)) == text


def test_gemma_byte_fallback(gemma):
    tokens = gemma.convert_ids_to_tokens(ids(gemma, "naïve café 日本 🙂"))
    assert {"<0xC3>", "<0xAF>", "<0xE6>", "<0xF0>"} <= set(tokens)
    assert gemma.unk_token not in tokens


def test_whole_text_merges_across_marker_edges(kind):
    """Tokenizing a whole prompt lets BPE merge across `<image>`'s edges, so it gives other ids
    than the reference's piece-by-piece tokenization, for each kind of edge."""
    tok = kind.tok
    differing = {}
    for text in marker_cases(tok):
        whole = ids(tok, text)
        if whole != chunked_ids(tok, text):
            differing[text] = [tok.decode([i]) for i in whole]
    assert len(differing) >= len(marker_cases(tok)) - 1, differing.keys()
    for edge in kind.edges:
        assert any(any(edge in piece for piece in pieces) for pieces in differing.values()), edge


# ---- save / reload / determinism ----------------------------------------------------------------
def test_save_and_reload(kind, tmp_path):
    tok = kind.tok
    tok.save_pretrained(tmp_path)
    path = Path(write_special_tokens_map(tok, tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).is_file(), name
    assert json.loads(path.read_text()) == kind.special_map
    if kind.special_map_bytes is not None:
        assert path.stat().st_size == kind.special_map_bytes  # the published file's size

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == kind.length
    assert loaded.chat_template == tok.chat_template
    for text in ROUND_TRIP_TEXTS + marker_cases(tok):
        assert loaded(text).input_ids == tok(text).input_ids, text
        assert ids(loaded, text) == ids(tok, text), text
    for content, i in kind.specials.items():
        assert loaded.convert_tokens_to_ids(content) == i
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(loaded, key) == getattr(tok, key)


@pytest.mark.parametrize("build", [build_gemma_tokenizer, build_llama3_tokenizer,
                                   build_qwen2_tokenizer])
def test_deterministic(build):
    assert build().backend_tokenizer.to_str() == build().backend_tokenizer.to_str()


def test_renderer_adds_the_special_tokens_the_tokenizer_would(kind):
    """Prompts tokenized with add_special_tokens (e.g. completions) get the same wrapping as the
    tokenizer gives a whole text (engine/renderer.py)."""
    from ovis_vllm.engine.renderer import special_token_wrapping

    tok = kind.tok
    prefix, suffix = special_token_wrapping(tok)
    for text in ROUND_TRIP_TEXTS[:2]:
        assert prefix + ids(tok, text) + suffix == tok(text).input_ids
