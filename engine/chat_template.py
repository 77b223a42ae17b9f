"""The reference's conversation formats as chat templates (AIDC-AI's *ConversationFormatter).

Gemma (Ovis1.6-Gemma2):
    <bos><start_of_turn>user\n{message}<end_of_turn>\n<start_of_turn>model\n
  Messages are stripped; assistant turns use the `model` role. The reference has no system role:
  the template rejects a system message (the API answers 400). The operator's opt-in fallback
  (`server.py --system-prompt merge`) puts the system text, with a blank line, in front of the
  first user message, a common convention for Gemma models that the reference itself never does.
Llama 3 (Ovis1.6-Llama3.2):
    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\n\n{message}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\n\n
  Messages are stripped; without a system message the reference's default one is used. A system
  message after the first is a turn of its own, as in the reference's role table.
Qwen (Ovis2):
    <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{message}<|im_end|>\n
    <|im_start|>assistant\n
  No bos; messages are NOT stripped; without a system message the reference's default one is used;
  a later system message is a turn of its own.

The templates write the special tokens as text; vLLM tokenizes the rendered prompt with the
reference's rule (engine/renderer.py), so they become the tokenizer's special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Conversation:
    name: str
    chat_template: str | None               # None: the checkpoint's own (tokenizer_config.json)
    stop_tokens: tuple[str, ...]             # end a reply, besides the tokenizer's eos
    system_merge_template: str | None = None  # --system-prompt merge (formats without a system role)


def _quoted(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _turns(opening: str, turn: dict[str, tuple[str, str]], generation_prompt: str,
           strip: bool = True) -> str:
    """`opening` (a Jinja expression), then per user/assistant message head + content|trim + tail,
    then the generation prompt. `prefix` (set by the caller) goes in front of the text of the
    first message when that is a user message."""
    branches = "".join(
        f"{'{%- if' if i == 0 else '{%- elif'} message['role'] == '{role}' -%}}"
        f"{{{{ {_quoted(head)} + "
        f"{'(prefix if loop.first else %s) + ' % _quoted('') if role == 'user' else ''}"
        f"message['content']{' | trim' if strip else ''} + {_quoted(tail)} }}}}"
        for i, (role, (head, tail)) in enumerate(turn.items()))
    return (
        f"{{{{ {opening} }}}}"
        "{%- for message in messages -%}" + branches +
        "{%- else -%}{{ raise_exception('unsupported role: ' + message['role']) }}"
        "{%- endif -%}{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {_quoted(generation_prompt)} }}}}{{%- endif -%}}"
    )


# ---- Gemma ------------------------------------------------------------------------------------
_GEMMA_TURNS = _turns(
    _quoted("<bos>"),
    {"user": ("<start_of_turn>user\n", "<end_of_turn>\n"),
     "assistant": ("<start_of_turn>model\n", "<end_of_turn>\n")},
    "<start_of_turn>model\n")

GEMMA_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ raise_exception('Ovis1.6-Gemma2 has no system role: put the instructions in the "
    "first user message') }}"
    "{%- endif -%}"
    "{%- set prefix = '' -%}"
) + _GEMMA_TURNS

GEMMA_SYSTEM_MERGE_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] | trim + '\\n\\n' -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- endif -%}"
) + _GEMMA_TURNS

GEMMA = Conversation("gemma", GEMMA_CHAT_TEMPLATE, ("<end_of_turn>",), GEMMA_SYSTEM_MERGE_CHAT_TEMPLATE)

# ---- Llama 3 ----------------------------------------------------------------------------------
LLAMA3_DEFAULT_SYSTEM_PROMPT = "You are a helpful and honest multimodal assistant."


def _header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


LLAMA3_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    f"{{%- else -%}}{{%- set system = {_quoted(LLAMA3_DEFAULT_SYSTEM_PROMPT)} -%}}{{%- endif -%}}"
    "{%- set prefix = '' -%}"
) + _turns(
    _quoted("<|begin_of_text|>" + _header("system")) + " + system | trim + '<|eot_id|>'",
    {"user": (_header("user"), "<|eot_id|>"), "assistant": (_header("assistant"), "<|eot_id|>"),
     "system": (_header("system"), "<|eot_id|>")},
    _header("assistant"))

LLAMA3 = Conversation("llama3", LLAMA3_CHAT_TEMPLATE, ("<|eot_id|>",))

# ---- Qwen -------------------------------------------------------------------------------------
QWEN_DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

QWEN_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    f"{{%- else -%}}{{%- set system = {_quoted(QWEN_DEFAULT_SYSTEM_PROMPT)} -%}}{{%- endif -%}}"
    "{%- set prefix = '' -%}"
) + _turns(
    _quoted("<|im_start|>system\n") + " + system + " + _quoted("<|im_end|>\n"),
    {"user": ("<|im_start|>user\n", "<|im_end|>\n"),
     "assistant": ("<|im_start|>assistant\n", "<|im_end|>\n"),
     "system": ("<|im_start|>system\n", "<|im_end|>\n")},
    "<|im_start|>assistant\n", strip=False)

QWEN = Conversation("qwen", QWEN_CHAT_TEMPLATE, ("<|im_end|>",))

# ---- Qwen3 (Ovis2.5, Ovis2.6) -----------------------------------------------------------------
# The published checkpoints' own template is the reference's format (docs/reference.md): served
# as is, so thinking is on unless a request passes chat_template_kwargs {"enable_thinking": false}.
QWEN3 = Conversation("qwen3", None, ("<|im_end|>",))

