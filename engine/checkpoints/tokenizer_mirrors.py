"""Small tokenizers of the same kinds as the base-LLM tokenizers that published Ovis checkpoints
ship, for tests (no model hub here); and the `tiny` preset's tokenizer.

Published Ovis1.6 checkpoints carry their base LLM's tokenizer unchanged; neither knows `<image>`
as a token. These mirrors copy each kind's tokenizer.json *structure* (normalizer, pre-tokenizer,
post-processor, decoder, model flags), its special tokens at the real ids, and its
tokenizer_config / special_tokens_map entries. Only the vocabulary is ours: BPE merges learned
here from a short corpus (English text plus Ovis prompts). docs/reference.md ("The test
checkpoints") says what was read from the published files and what is inferred.

Gemma kind (Ovis1.6-Gemma2-9B/27B; google/gemma-2-*-it):
    SentencePiece-derived BPE with byte fallback. normalizer Replace(" " -> "▁"), no
    pre-tokenizer, post-processor TemplateProcessing prepending `<bos>`, decoder
    Sequence[Replace("▁" -> " "), ByteFallback, Fuse], BPE(unk "<unk>", fuse_unk, byte_fallback).
    Specials at Gemma's ids 0..107, then the 256 byte pieces `<0x00>`..`<0xFF>`, then learned
    pieces. The chat template is google/gemma-2-9b-it's, verbatim.
Llama 3 kind (Ovis1.6-Llama3.2-3B; meta-llama/Llama-3.2-3B-Instruct):
    Byte-level BPE. No normalizer, pre-tokenizer Sequence[Split(Llama 3 regex, isolated),
    ByteLevel(no prefix space, no regex)], post-processor Sequence[ByteLevel(trim_offsets false),
    TemplateProcessing prepending `<|begin_of_text|>`], decoder ByteLevel,
    BPE(ignore_merges, no unk, no byte fallback). Learned tokens from id 0, unreachable filler
    entries up to id 127999, then the 256 Llama 3.2 special tokens at 128000..128255, so
    `len(tokenizer) == 128256` as published.
Qwen2 kind (Ovis2; Qwen/Qwen2.5-*-Instruct):
    As Llama 3's, with an NFC normalizer, Qwen2's split regex (digits one by one), no BOS, and
    the 22 Qwen2.5 special tokens at 151643..151664 (`<|image_pad|>` = 151655).
`tiny` (the embedded default model; not a published kind): byte-level BPE with Gemma's special
ids that knows `<image>` as an added token.

What is NOT the published text:
- the vocabularies and merges (learned here; sizes differ from the real 256000 / 128000). The
  Gemma kind is learned SentencePiece-style (pieces start at "▁", digits stay single), but its
  pieces may join punctuation and letters (">Describe", "▁image."); whether Gemma's do is
  unverified;
- the Llama 3 and Qwen2 chat templates: short Llama-3.2-Instruct / Qwen2.5-Instruct-style
  templates without tool calling (`LLAMA32_CHAT_TEMPLATE`, `QWEN2_CHAT_TEMPLATE`); the server
  serves the reference's formats (engine/chat_template.py), not these;
- Gemma's `pre_tokenizer` is unverified for Gemma 2: null here (the notes' "older saves" value;
  the alternative, Split(" ", merged_with_previous), is a no-op after the normalizer), and so is
  its `clean_up_tokenization_spaces` (false here, GemmaTokenizerFast's default);
- the Llama 3 tokenizer.json was published with merges as "a b" strings; tokenizers 0.23 writes
  [a, b] pairs (both load the same);
- what transformers 5's save_pretrained writes: tokenizer_class "TokenizersBackend" (published:
  "GemmaTokenizer" / "PreTrainedTokenizerFast"), the chat template in chat_template.jinja
  (published: inline in tokenizer_config.json), "extra_special_tokens" for
  "additional_special_tokens", no add_bos_token / add_eos_token (the `<bos>` stays in the
  tokenizer.json post-processor, so ids do not change) and no special_tokens_map.json:
  `write_special_tokens_map` writes that one as published.

    tok = build_gemma_tokenizer(1024)
    tok.save_pretrained(out_dir); write_special_tokens_map(tok, out_dir)
"""

from __future__ import annotations

import json
import os
import re

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ..chat_template import GEMMA_CHAT_TEMPLATE

# Ovis' image marker (engine/placeholders.py IMAGE_TOKEN); neither kind has it as a token.
IMAGE_MARKER = "<image>"

# ---- training text ------------------------------------------------------------------------------
# ASCII only, so that any other character goes to Gemma's byte fallback. The `tiny` tokenizer
# learns from the first six lines.
_TINY_CORPUS = """\
Describe the image in detail. What is shown in this picture? How many objects are there?
The quick brown fox jumps over the lazy dog. A photo of a cat sitting on a red sofa.
Read the text in the image and answer the question. Which color is the car on the left?
Compare the two images and list the differences. Summarize the chart and its main trend.
There is a small house near the river, with trees and mountains in the background.
Please answer in one short sentence. The answer is yes. The answer is no. Thank you.
"""
_ENGLISH = _TINY_CORPUS + """\
The picture shows a busy street at night. People are walking under bright lights and signs.
A woman is holding an umbrella while a man rides a bicycle past a blue bus.
On the table there are three cups of coffee, a plate of cookies and an open book.
The chart compares sales over four years; the highest value is reached in the last year.
Two children are playing football in a green park while their parents watch from a bench.
This document is a receipt from a grocery store. The total amount is written at the bottom.
The first image shows a beach at sunset, and the second image shows the same beach in the morning.
What is the name of the store? Where was this photo taken? Is there a person in the image?
Explain what is happening in the scene, step by step, and mention any text you can read.
The dog looks happy and is running towards the camera with a stick in its mouth.
In the background you can see a tall building, a bridge and several white clouds.
The menu lists soup, salad, pasta and cake. The prices are printed next to each item.
Count the apples in the basket. There are seven apples: five are red and two are green.
Write a short poem about the picture. Then translate the caption into simple words.
"""

# Ovis prompts: the marker at the start of a message, glued to text, several in a row, around
# newlines. Learned merges cross the marker's edges (">\\n", "\\n<", ">D", " <", ":<"), as the
# real vocabularies do for such text.
_OVIS_PROMPTS = (
    "<image>\nDescribe the image.",
    "<image>\nWhat is shown in this picture?",
    "<image>\nRead the text in the image.",
    "<image>\nDescribe the image in detail.",
    "Image 1:<image>Describe the first image.",
    "Image 2:<image>Describe the second image.",
    "<image>Describe the image.",
    "<image><image>\nCompare the two images.",
    "<image><image><image>\nWhat changed between these pictures?",
    "\n<image>\n",
    "Image 1: <image>\nImage 2: <image>\nWhich image is brighter?",
    "Look at this picture:\n<image>\nHow many people are there?",
    "Here is a photo <image> of a dog. Describe it.",
    "First <image> then <image>\nDescribe both.",
    "Question:\n<image>\nAnswer in one word.",
)
_ANSWERS = (
    "The image shows a cat sitting on a red sofa.",
    "There are two people and a dog.",
    "The second image is brighter.",
)
# Prompt text is repeated so that its merges come early even in a small vocabulary.
_PROMPT_WEIGHT = 6

# A split point used only while learning: the marker is written as "<" SEP "image" SEP ">", so
# its brackets merge only with their outer neighbours and neither kind learns `<image>` (or
# `<image` / `image>`) as one token, like the published vocabularies.
_SEP = "\x1f"


def _training_pieces(texts, specials) -> list[str]:
    """`texts` with the special tokens cut out (an added token never reaches BPE, so training
    must not see it either) and the marker marked up with `_SEP`."""
    split = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    out = []
    for text in texts:
        text = text.replace(IMAGE_MARKER, f"<{_SEP}image{_SEP}>")
        out.extend(piece for piece in split.split(text) if piece)
    return out


def _special(content: str) -> AddedToken:
    return AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False,
                      single_word=False)


# ---- Gemma kind ---------------------------------------------------------------------------------
GEMMA_SPECIAL_TOKENS = (
    ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<2mass>", "[@BOS@]"]
    + [f"<unused{i}>" for i in range(99)]
    + ["<start_of_turn>", "<end_of_turn>"]
)  # ids 0..107, as in google/gemma-2-*
GEMMA_BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
# Marker edges some learned piece must cross (e.g. ">\n", ">Describe", "▁<", ":\n<").
_GEMMA_EDGES = (">\n", "\n<", ">D", "▁<")

# google/gemma-2-9b-it's chat_template, verbatim.
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)


def _gemma_corpus() -> list[str]:
    chats = []
    for i, prompt in enumerate(_OVIS_PROMPTS):
        answer = _ANSWERS[i % len(_ANSWERS)]
        chats.append(f"<bos><start_of_turn>user\n{prompt}<end_of_turn>\n"
                     f"<start_of_turn>model\n{answer}<end_of_turn>\n")
    return [_ENGLISH] + (list(_OVIS_PROMPTS) + chats) * _PROMPT_WEIGHT


def _gemma_learned(n_learned: int) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Pieces (in id order) and merges learned SentencePiece-style: pieces never cross a "▁"
    except as their first character, and digits stay single (Gemma splits digits)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # training only; the result has none
        pre_tokenizers.Split(_SEP, "removed"),
        pre_tokenizers.Split("▁", "merged_with_next"),
        pre_tokenizers.Split(Regex(r"\p{N}"), "isolated"),
    ])
    trainer = trainers.BpeTrainer(vocab_size=n_learned, show_progress=False)
    tok.train_from_iterator(_training_pieces(_gemma_corpus(), GEMMA_SPECIAL_TOKENS), trainer)
    state = json.loads(tok.to_str())["model"]
    pieces = tuple(sorted(state["vocab"], key=state["vocab"].get))
    return pieces, tuple(tuple(m) for m in state["merges"])


def build_gemma_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A Gemma-2-kind tokenizer of exactly `vocab_size` entries (see the module docstring).

    The corpus supports 497 <= vocab_size <= 1071: below, some marker-edge piece is not learned
    yet; above, nothing is left to merge. ValueError outside."""
    n_fixed = len(GEMMA_SPECIAL_TOKENS) + len(GEMMA_BYTE_TOKENS)
    if vocab_size <= n_fixed:
        raise ValueError(f"vocab_size {vocab_size}: specials and byte pieces take {n_fixed}")
    pieces, merges = _gemma_learned(vocab_size - n_fixed)
    vocab = {t: i for i, t in enumerate(GEMMA_SPECIAL_TOKENS + GEMMA_BYTE_TOKENS + list(pieces))}
    if len(vocab) != vocab_size:  # below the corpus' alphabet, or above all it can merge
        raise ValueError(f"vocab_size {vocab_size}: the training corpus gives "
                         f"{n_fixed + len(pieces)} entries")
    for edge in _GEMMA_EDGES:
        if not any(edge in piece for piece in pieces):
            raise ValueError(f"vocab_size {vocab_size} is too small to learn a piece with {edge!r}")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", 2)])
    tok.add_special_tokens([_special(t) for t in GEMMA_SPECIAL_TOKENS])  # already in the vocab

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        add_bos_token=True, add_eos_token=False,
        clean_up_tokenization_spaces=False,
        chat_template=GEMMA2_CHAT_TEMPLATE,
    )
    assert len(fast) == vocab_size
    return fast


# ---- Llama 3 kind -------------------------------------------------------------------------------
# Llama 3.2's special tokens, ids 128000..128255 (transformers convert_llama_weights_to_hf.py,
# DEFAULT_LLAMA_SPECIAL_TOKENS["3.2"]).
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",            # 128000
    "<|end_of_text|>",              # 128001
    "<|reserved_special_token_0|>",  # 128002 (vLLM's Ovis image pad token)
    "<|reserved_special_token_1|>",  # 128003
    "<|finetune_right_pad_id|>",    # 128004
    "<|reserved_special_token_2|>",  # 128005
    "<|start_header_id|>",          # 128006
    "<|end_header_id|>",            # 128007
    "<|eom_id|>",                   # 128008
    "<|eot_id|>",                   # 128009
    "<|python_tag|>",               # 128010
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - 8)]  # 128011..128255
LLAMA3_FIRST_SPECIAL_ID = 128000
LLAMA3_MAX_LENGTH = 131072  # Llama 3.2's context length (model_max_length)

# The Split regex of Llama 3's tokenizer.json (TikTokenConverter's pattern), verbatim.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Ovis' Llama3ConversationFormatter default system prompt.
LLAMA3_DEFAULT_SYSTEM_PROMPT = "You are a helpful and honest multimodal assistant."

# NOT the published text: a short Llama-3.2-Instruct-style template (the published one also
# handles tools and takes today's date from strftime_now). It writes what the published one writes
# for plain conversations dated "26 Jul 2024" (its fallback date).
LLAMA32_CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

# Cap on the learned tokens (the 256 byte symbols included); the corpus runs out first (~830),
# so the Llama 3 kind holds every merge its corpus yields.
_LLAMA3_LEARNED = 4096
# Marker edges some learned token must cross, as text. "\n<" cannot: the regex always cuts a
# newline from the "<" that follows it.
_LLAMA3_EDGES = (">\n", ">D", " <", ":<")


def _llama3_header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def _llama3_corpus() -> list[str]:
    chats = []
    for i, prompt in enumerate(_OVIS_PROMPTS):
        answer = _ANSWERS[i % len(_ANSWERS)]
        chats.append(  # Ovis' Llama3ConversationFormatter layout
            "<|begin_of_text|>" + _llama3_header("system") + LLAMA3_DEFAULT_SYSTEM_PROMPT
            + "<|eot_id|>" + _llama3_header("user") + prompt + "<|eot_id|>"
            + _llama3_header("assistant") + answer + "<|eot_id|>")
    return [_ENGLISH] + (list(_OVIS_PROMPTS) + chats) * _PROMPT_WEIGHT


def _llama3_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])


def _byte_level_learned(pre_tokenizer, corpus, specials, normalizer=None
                        ) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Byte-level tokens (in id order; the 256 byte symbols first, sorted by code point, which is
    Llama 3's and Qwen2's order for ids 0..255) and merges, learned within the pre-tokens."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(_SEP, "removed"), pre_tokenizer])
    trainer = trainers.BpeTrainer(vocab_size=_LLAMA3_LEARNED, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_pieces(corpus, specials), trainer)
    state = json.loads(tok.to_str())["model"]
    pieces = tuple(sorted(state["vocab"], key=state["vocab"].get))
    return pieces, tuple(tuple(m) for m in state["merges"])


def _byte_level_vocab(pieces, first_special_id: int, edges) -> dict[str, int]:
    """Learned tokens from id 0, then fillers up to `first_special_id` (see build_llama3_tokenizer)."""
    assert len(pieces) < first_special_id
    vocab = {t: i for i, t in enumerate(pieces)}
    for i in range(len(vocab), first_special_id):
        vocab[f"fillerĠ{i}"] = i
    decoded = {bytes(_BYTE_DECODER[c] for c in p).decode("utf-8", "replace") for p in pieces}
    for edge in edges:
        if not any(edge in piece for piece in decoded):
            raise RuntimeError(f"the training corpus yields no token with {edge!r}")
    return vocab


def build_llama3_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-3.2-kind tokenizer of 128256 entries (see the module docstring)."""
    pieces, merges = _byte_level_learned(_llama3_pre_tokenizer(), _llama3_corpus(),
                                         LLAMA3_SPECIAL_TOKENS)
    # Fillers up to id 127999 keep the specials at their real ids (the tokenizers library
    # renumbers added tokens past the vocabulary). "filler" + "Ġ" (a space) + digits can never be
    # one pre-token (the regex cuts letters from the space and the digits) and no merge builds
    # it, so no text ever maps to a filler; each still decodes, to "filler 123".
    vocab = _byte_level_vocab(pieces, LLAMA3_FIRST_SPECIAL_ID, _LLAMA3_EDGES)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), fuse_unk=False,
                               byte_fallback=False, ignore_merges=True, dropout=None))
    tok.normalizer = None
    tok.pre_tokenizer = _llama3_pre_tokenizer()
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|>:0 $A:0 <|begin_of_text|>:1 $B:1",
            special_tokens=[("<|begin_of_text|>", LLAMA3_FIRST_SPECIAL_ID)]),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([_special(t) for t in LLAMA3_SPECIAL_TOKENS])

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>",
        clean_up_tokenization_spaces=True,
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=LLAMA3_MAX_LENGTH,
        chat_template=LLAMA32_CHAT_TEMPLATE,
    )
    assert len(fast) == LLAMA3_FIRST_SPECIAL_ID + len(LLAMA3_SPECIAL_TOKENS) == 128256
    return fast

# ---- Qwen2 kind (Ovis2; Qwen/Qwen2.5-*-Instruct) ------------------------------------------------
# Byte-level BPE like Llama 3, with an NFC normalizer, Qwen2's split regex (digits one by one), no
# BOS, and 22 special tokens at 151643..151664; the LLM's vocabulary is padded to 151936.
QWEN2_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]  # <|image_pad|> = 151655, vLLM's Ovis2 image pad token
QWEN2_FIRST_SPECIAL_ID = 151643
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# NOT the published text: Qwen2.5-Instruct's template without tool calling.
QWEN2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def _qwen2_corpus() -> list[str]:
    chats = []
    for i, prompt in enumerate(_OVIS_PROMPTS):  # Ovis' QwenConversationFormatter layout
        chats.append(f"<|im_start|>system\n{QWEN2_DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
                     f"<|im_start|>user\n{prompt}<|im_end|>\n"
                     f"<|im_start|>assistant\n{_ANSWERS[i % len(_ANSWERS)]}<|im_end|>\n")
    return [_ENGLISH] + (list(_OVIS_PROMPTS) + chats) * _PROMPT_WEIGHT


def _qwen_tokenizer(added: list[str], num_special: int, additional_special: list[str],
                    chat_template: str) -> PreTrainedTokenizerFast:
    """A Qwen-kind byte-level BPE tokenizer with `added` tokens from id 151643 on, the first
    `num_special` of them special."""
    pieces, merges = _byte_level_learned(_qwen2_pre_tokenizer(), _qwen2_corpus(), added, normalizers.NFC())
    vocab = _byte_level_vocab(pieces, QWEN2_FIRST_SPECIAL_ID, (">\n", ">D", " <", ":<"))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), fuse_unk=False,
                               byte_fallback=False, dropout=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _qwen2_pre_tokenizer()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=i < num_special, normalized=False, lstrip=False,
                               rstrip=False, single_word=False) for i, t in enumerate(added)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=additional_special, clean_up_tokenization_spaces=False,
        model_max_length=131072, chat_template=chat_template,
    )
    assert len(fast) == QWEN2_FIRST_SPECIAL_ID + len(added)
    return fast


def build_qwen2_tokenizer() -> PreTrainedTokenizerFast:
    """A Qwen2.5-kind tokenizer of 151665 entries (ids up to <|file_sep|> = 151664)."""
    return _qwen_tokenizer(QWEN2_SPECIAL_TOKENS, len(QWEN2_SPECIAL_TOKENS), ["<|im_start|>", "<|im_end|>"],
                           QWEN2_CHAT_TEMPLATE)


# Qwen3 (Ovis2.5 / Ovis2.6): Qwen2.5's tokens plus four, and, as in the published
# tokenizer_config.json, only the first 14 added tokens special (<tool_call>, <think> and the rest
# are added tokens that decoding keeps).
QWEN3_ADDED_TOKENS = QWEN2_SPECIAL_TOKENS + ["<tool_response>", "</tool_response>", "<think>", "</think>"]
QWEN3_NUM_SPECIAL = 14  # <|endoftext|> 151643 ... <|video_pad|> 151656


def build_qwen3_tokenizer(chat_template: str) -> PreTrainedTokenizerFast:
    """A Qwen3-kind tokenizer of 151669 entries (ids up to </think> = 151668), with the
    checkpoint's chat template."""
    return _qwen_tokenizer(QWEN3_ADDED_TOKENS, QWEN3_NUM_SPECIAL, QWEN3_ADDED_TOKENS[1:QWEN3_NUM_SPECIAL],
                           chat_template)


# ---- the `tiny` preset's tokenizer --------------------------------------------------------------
def build_bytelevel_image_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """The `tiny` preset's tokenizer: byte-level BPE with Gemma's special tokens at Gemma's ids.

    `<image>` is an added (non-special) token: the tokenizer then splits text around it before
    BPE, so whole-text tokenization equals the reference's chunked one. Published checkpoints
    have no such token; the member presets use the builders above.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # the last id is `<image>`
        special_tokens=GEMMA_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    tok.add_tokens([IMAGE_MARKER])
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    fast.chat_template = GEMMA_CHAT_TEMPLATE  # the reference's format
    fast.add_bos_token = False  # the chat template writes `<bos>` itself
    assert fast.convert_tokens_to_ids("<end_of_turn>") == 107
    return fast


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character table, which byte-level BPE tokens are written in."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


# ---- saving -------------------------------------------------------------------------------------
def write_special_tokens_map(tokenizer: PreTrainedTokenizerFast, out_dir: str | os.PathLike) -> str:
    """Write `special_tokens_map.json` as transformers 4.x did and the published checkpoints have
    it; transformers 5's save_pretrained no longer writes it.

    The named special tokens as {content, lstrip, normalized, rstrip, single_word} and the extra
    ones as strings under "additional_special_tokens"; keys sorted, indent 2, final newline. For
    `build_gemma_tokenizer()` this has the content and the 636-byte size of google/gemma-2-9b-it's
    (and Ovis1.6-Gemma2-9B's) file; for `build_llama3_tokenizer()`, those of the 444-byte file
    inferred for Ovis1.6-Llama3.2-3B. Returns the file's path.
    """
    flags = {str(t): t for t in tokenizer.added_tokens_decoder.values()}
    out: dict[str, object] = {}
    for key, content in tokenizer.special_tokens_map.items():  # bos/eos/unk/pad/... when set
        token = flags.get(str(content), AddedToken(str(content), normalized=False))
        out[key] = {"content": str(content), "lstrip": token.lstrip, "normalized": token.normalized,
                    "rstrip": token.rstrip, "single_word": token.single_word}
    extra = [str(t) for t in getattr(tokenizer, "extra_special_tokens", None) or []]
    if extra:
        out["additional_special_tokens"] = extra
    path = os.path.join(out_dir, "special_tokens_map.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(out, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return path
