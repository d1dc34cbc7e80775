"""The chat format, token in / token out.

One ChatML-style Jinja template serves three consumers that must agree token for token:

* the rollout engine, which builds a trajectory purely by appending ids: :func:`encode_prompt`
  once, then for every turn the sampled ids (ending in ``<|im_end|>``) and
  :func:`encode_continuation` of the tool results. Nothing is ever decoded and re-encoded
  (docs/design.md, "Trajectories").
* TRL's ``SFTTrainer(assistant_only_loss=True)``, which masks the loss with the template's
  ``{% generation %}`` markers (they wrap each assistant reply *and* its ``<|im_end|>``, so the
  model is trained to stop).
* TRL's ``GRPOTrainer(environment_factory=…)``, which parses tool calls out of generated text with
  the tokenizer's ``response_template`` (set by :func:`prepare_tokenizer_for_trl`) and extends the
  sequence with template glue, which it gets by diffing two renders — so the template must be
  prefix-preserving.

Rendering (``<|im_end|>`` is the eos token)::

    <|im_start|>system
    {system content}

    # Tools
    …header…
    {schema 1 as JSON}
    {schema 2 as JSON}
    <|im_end|>
    <|im_start|>user
    {content}<|im_end|>
    <|im_start|>assistant
    {raw content, with its <tool_call>{…}</tool_call> blocks}<|im_end|>
    <|im_start|>tool
    {result}<|im_end|>
    <|im_start|>assistant
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from mtrl_local.env.actions import TAGS, TOOL_CALL_OPEN

Message = dict[str, Any]
#: OpenAI-style schemas, or typed callables (transformers derives their schema from the docstring).
ToolSpec = dict[str, Any] | Callable[..., Any]

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|endoftext|>"

#: Control tokens: never produced by the byte-level merges, stripped by ``skip_special_tokens``.
SPECIAL_TOKENS = (PAD, IM_START, IM_END)
#: Tags the agent writes: single added tokens, but *not* special, so decoding with
#: ``skip_special_tokens=True`` (TRL's fallback when parsing fails) keeps them in the text.
TAG_TOKENS = TAGS

#: The text every assistant turn starts with; the prompt ends with it (``add_generation_prompt``).
ASSISTANT_HEADER = f"{IM_START}assistant\n"

TOOLS_HEADER = (
    "# Tools\n"
    'Call a tool by writing <tool_call>{"name": <tool name>, "arguments": <JSON object>}'
    "</tool_call>. The tools, one JSON schema per line:\n"
)

# Notes on the template:
# * Tool schemas are rendered inside the system turn, so the whole prompt is fixed before the first
#   assistant turn and later turns never re-render it (prefix preservation). OpenAI-style
#   schemas {"type": "function", "function": {...}} are rendered as their inner function object
#   (fewer tokens).
# * An assistant turn is its raw ``content``: the model wrote the <tool_call> blocks itself, and
#   re-rendering them from ``tool_calls`` would change the text the model actually produced. Only
#   when the content lacks them (OpenAI-style messages from other agents) are ``tool_calls``
#   rendered; ``arguments`` may be a dict or an already-encoded JSON string (what datasets store).
# * {% generation %} wraps the reply and its <|im_end|>; the "\n" after it is glue, outside the
#   mask.
CHAT_TEMPLATE = (
    r"""{%- set ns = namespace(first=0) -%}
{%- if messages and messages[0].role == 'system' -%}{%- set ns.first = 1 -%}{%- endif -%}
{%- if tools or ns.first == 1 -%}
{{- '<|im_start|>system\n' -}}
{%- if ns.first == 1 -%}{{- messages[0].content -}}{%- endif -%}
{%- if tools -%}
{%- if ns.first == 1 -%}{{- '\n\n' -}}{%- endif -%}
{{- """
    + json.dumps(TOOLS_HEADER)  # a valid Jinja string literal too
    + r""" -}}
{%- for tool in tools -%}
{%- if tool.function is defined and tool.function -%}{{- tool.function | tojson -}}
{%- else -%}{{- tool | tojson -}}{%- endif -%}
{{- '\n' -}}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if loop.index0 >= ns.first -%}
{%- set content = message.content if message.content is string
    else ('' if (message.content is not defined or message.content is none)
          else message.content | tojson) -%}
{%- if message.role == 'assistant' -%}
{{- '<|im_start|>assistant\n' -}}
{%- generation -%}
{{- content -}}
{%- if message.tool_calls and '<tool_call>' not in content -%}
{%- if content -%}{{- '\n' -}}{%- endif -%}
{%- for call in message.tool_calls -%}
{%- set fn = call.function if (call.function is defined and call.function) else call -%}
{%- set args = fn.arguments if (fn.arguments is defined and fn.arguments is not none) else {} -%}
{{- '<tool_call>{"name": ' + (fn.name | tojson) + ', "arguments": '
    + (args if args is string else args | tojson) + '}</tool_call>' -}}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>' -}}
{%- endgeneration -%}
{{- '\n' -}}
{%- else -%}
{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' -}}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""
)

#: How ``tokenizer.parse_response`` (transformers >= 5.13, the "new-style" format) reads one
#: generated assistant turn: text up to ``<|im_end|>`` is ``content``; every
#: ``<tool_call>{json}</tool_call>`` block becomes an OpenAI-style call
#: ``{"type": "function", "function": {"name", "arguments"}}``, which is what TRL's tool loop
#: executes as ``fn(**arguments)``. ``<final_response>`` blocks stay in ``content`` (the reward
#: reads them).
RESPONSE_TEMPLATE: dict[str, Any] = {
    "defaults": {"role": "assistant"},
    "start_anchor": ASSISTANT_HEADER,
    "fields": {
        "tool_calls": {
            "open": TOOL_CALL_OPEN,
            "close_pattern": r"</tool_call>\s*",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {
            "close_pattern": r"<\|im_end\|>\s*",
            "content": "text",
        },
    },
}


def prepare_tokenizer_for_trl(
    tokenizer: PreTrainedTokenizerBase, overwrite_template: bool = False
) -> PreTrainedTokenizerBase:
    """Make ``tokenizer`` acceptable to TRL 1.16's SFT and GRPO trainers; returns it (mutated).

    TRL only knows the response parsers of a fixed list of hub templates
    (``trl.chat_template_utils.add_response_schema`` raises for anything else) and GRPOTrainer
    calls it whenever tools are in play and ``tokenizer.response_template`` is unset. So we set it
    by hand; it is saved by ``save_pretrained`` and restored on load.

    Also set: our chat template, eos = ``<|im_end|>`` (TRL stops generation and trains the stop on
    ``eos_token_id``) and a pad token (``<|endoftext|>`` when the vocabulary has it, so padding is
    never mistaken for a learned stop). A tokenizer that already carries a *different* template is
    refused unless ``overwrite_template``: our response parser would misread its turns (for a hub
    model keep its own template and use TRL's ``add_response_schema``).
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in (IM_START, IM_END) if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks the chat control tokens {missing}")
    current = tokenizer.chat_template
    if current and current != CHAT_TEMPLATE and not overwrite_template:
        raise ValueError(
            "tokenizer has another chat template; pass overwrite_template=True to replace it"
        )
    tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.eos_token != IM_END:
        tokenizer.eos_token = IM_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD if PAD in vocab else IM_END
    tokenizer.response_template = RESPONSE_TEMPLATE
    return tokenizer


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    tools: Sequence[ToolSpec] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The conversation as text, via the tokenizer's chat template (for logs and tests)."""
    text = tokenizer.apply_chat_template(
        list(messages),
        tools=list(tools) if tools else None,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )
    if not isinstance(text, str):
        raise TypeError(f"chat template rendered {type(text).__name__}, expected str")
    return text


__all__ = [
    "ASSISTANT_HEADER",
    "CHAT_TEMPLATE",
    "IM_END",
    "IM_START",
    "PAD",
    "RESPONSE_TEMPLATE",
    "SPECIAL_TOKENS",
    "TAG_TOKENS",
    "TOOLS_HEADER",
    "prepare_tokenizer_for_trl",
    "render",
]
