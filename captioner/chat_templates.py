"""Jinja chat templates of the original LLaVA conversation formats, for processors that lack one.

transformers renders them through `processor.apply_chat_template`; messages are
`[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]}]`. The image
placeholder `<image>` goes before the text, followed by a newline, as LLaVA-1.5 trained with
(`mm_use_im_start_end: false`).
"""

from __future__ import annotations

# LLaVA-1.5's `conv_vicuna_v1` system prompt (haotian-liu/LLaVA, llava/conversation.py).
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# LLaVA-NeXT's `conv_llava_llama_3` system prompt. The Recap-DataComp-1B captioner's exact
# system prompt was not released; override it with the converter's --system-prompt if known.
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)

_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set system = messages[0]['content'] -%}"
    "{%- else -%}{%- set system = messages[0]['content'][0]['text'] -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = DEFAULT_SYSTEM -%}{%- set loop_messages = messages -%}{%- endif -%}"
)
_CONTENT = (
    "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
    "{%- for c in m['content'] if c['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for c in m['content'] if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}"
    "{%- endif -%}"
)


def _with_system(template: str, system: str) -> str:
    return "{%- set DEFAULT_SYSTEM = " + repr(system) + " -%}" + _SYSTEM + template


def vicuna_template(system: str = VICUNA_SYSTEM) -> str:
    """`SYSTEM USER: <image>\\nPROMPT ASSISTANT: ANSWER</s>` (LLaVA-1.5 `vicuna_v1`)."""
    body = (
        "{%- if system -%}{{ system + ' ' }}{%- endif -%}"
        "{%- for m in loop_messages -%}"
        "{%- if m['role'] == 'user' -%}{{ 'USER: ' }}{%- else -%}{{ 'ASSISTANT: ' }}{%- endif -%}"
        + _CONTENT
        + "{%- if m['role'] == 'user' -%}{{ ' ' }}{%- else -%}{{ eos_token }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )
    return _with_system(body, system)


def llama3_template(system: str = LLAMA3_SYSTEM) -> str:
    """LLaMA-3 headers (`<|start_header_id|>user<|end_header_id|>` ... `<|eot_id|>`), as LLaVA-NeXT's `llava_llama_3`."""
    header = "{{ '<|start_header_id|>' + ROLE + '<|end_header_id|>\\n\\n' }}"
    body = (
        "{{ bos_token }}"
        "{%- if system -%}" + header.replace("ROLE", "'system'") + "{{ system + '<|eot_id|>' }}{%- endif -%}"
        "{%- for m in loop_messages -%}" + header.replace("ROLE", "m['role']") + _CONTENT + "{{ '<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}" + header.replace("ROLE", "'assistant'") + "{%- endif -%}"
    )
    return _with_system(body, system)


TEMPLATES = {"vicuna_v1": vicuna_template, "llama_3": llama3_template}
