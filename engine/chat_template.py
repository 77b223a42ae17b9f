"""Chat templates in the reference prompt format (Ovis's GemmaConversationFormatter).

    <bos><start_of_turn>user\n{message}<end_of_turn>\n<start_of_turn>model\n

Messages are stripped; assistant turns use the `model` role. The reference has no system role:
CHAT_TEMPLATE rejects a system message (the API answers 400). SYSTEM_MERGE_CHAT_TEMPLATE is the
operator's opt-in fallback (`server.py --system-prompt merge`): the system text is put, with a
blank line, in front of the first user message, a common convention for Gemma models that the
reference itself never does.
"""

_TURNS = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<start_of_turn>user\\n' + (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<start_of_turn>model\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- else -%}"
    "{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ raise_exception('Ovis1.6-Gemma2 has no system role: put the instructions in the "
    "first user message') }}"
    "{%- endif -%}"
    "{%- set prefix = '' -%}"
) + _TURNS

SYSTEM_MERGE_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] | trim + '\\n\\n' -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- endif -%}"
) + _TURNS
