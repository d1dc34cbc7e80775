"""Chat templates of our own, written in the style of three model families, for the format tests.

Each is a complete Jinja chat template in the shape its family uses (control tokens, where the
tools go, how calls and results are written); none is copied from a model's files. They run on
the real SmolLM2 tokenizer with each family's control tokens added (:func:`family_tokenizer`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

# Llama 3.x: header tokens around the role, <|eot_id|> ends a turn, tools listed in the system
# turn, calls as bare JSON with "parameters", results in the ipython role.
LLAMA3_STYLE = r"""{{- '<|begin_of_text|>' -}}
{%- set sys = messages[0].content if messages and messages[0].role == 'system' else '' -%}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' -}}
{%- if tools -%}
{{- 'Environment: ipython\nAnswer a tool request with {"name": function name, "parameters": '
    'dictionary of argument name and its value}.\n\n' -}}
{%- for t in tools -%}{{- (t.function if t.function is defined else t) | tojson -}}{{- '\n\n' -}}
{%- endfor -%}
{%- endif -%}
{{- sys -}}{{- '<|eot_id|>' -}}
{%- for m in messages -%}
{%- if m.role == 'system' -%}
{%- elif m.role == 'assistant' -%}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- if m.tool_calls and not m.content -%}
{%- for c in m.tool_calls -%}
{%- set f = c.function if c.function is defined else c -%}
{{- '{"name": "' + f.name + '", "parameters": ' + (f.arguments | tojson) + '}' -}}
{%- endfor -%}
{%- else -%}{{- m.content -}}{%- endif -%}
{{- '<|eot_id|>' -}}
{%- elif m.role in ('tool', 'ipython') -%}
{{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + m.content + '<|eot_id|>' -}}
{%- else -%}
{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' + m.content + '<|eot_id|>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}"""

# Mistral (v3 tokenizer): [INST] … [/INST], tools in [AVAILABLE_TOOLS] before the last user turn,
# calls after [TOOL_CALLS], results in [TOOL_RESULTS]; the reply follows [/INST] with no header
# and ends with </s>; the system text is put before the last user message.
MISTRAL_STYLE = r"""{{- bos_token -}}
{%- set sys = messages[0].content if messages and messages[0].role == 'system' else '' -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}
{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
{%- if m.role == 'user' -%}
{%- if tools and loop.index0 == ns.last_user -%}
{{- '[AVAILABLE_TOOLS]' -}}{{- tools | tojson -}}{{- '[/AVAILABLE_TOOLS]' -}}
{%- endif -%}
{{- '[INST]' -}}
{%- if sys and loop.index0 == ns.last_user -%}{{- sys + '\n\n' -}}{%- endif -%}
{{- m.content + '[/INST]' -}}
{%- elif m.role == 'assistant' -%}
{%- if m.tool_calls and not m.content -%}
{{- '[TOOL_CALLS]' -}}{{- m.tool_calls | tojson -}}
{%- else -%}{{- m.content -}}{%- endif -%}
{{- eos_token -}}
{%- elif m.role == 'tool' -%}
{{- '[TOOL_RESULTS]{"content": ' + (m.content | tojson) + '}[/TOOL_RESULTS]' -}}
{%- endif -%}
{%- endfor -%}"""

# Qwen3 / reasoning models: ChatML with the tools as JSON lines inside <tools> in the system
# turn, calls in <tool_call> blocks, results as <tool_response> blocks in a *user* turn, and the
# reasoning of every assistant turn but the last dropped from history (not prefix-preserving).
QWEN3_STYLE = r"""{%- if tools or (messages and messages[0].role == 'system') -%}
{{- '<|im_start|>system\n' -}}
{%- if messages and messages[0].role == 'system' -%}{{- messages[0].content -}}{%- endif -%}
{%- if tools -%}
{{- '\n\n# Tools\n\nYou may call functions. Signatures in <tools></tools>:\n<tools>' -}}
{%- for t in tools -%}{{- '\n' -}}{{- t | tojson -}}{%- endfor -%}
{{- '\n</tools>\n\nFor each call return <tool_call>\n{"name": <function-name>, "arguments": '
    '<args-json-object>}\n</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endif -%}
{%- for m in messages -%}
{%- if m.role == 'system' and loop.first -%}
{%- elif m.role == 'assistant' -%}
{%- set content = m.content or '' -%}
{%- if not loop.last and '</think>' in content -%}
{%- set content = content.split('</think>')[-1].lstrip('\n') -%}
{%- endif -%}
{{- '<|im_start|>assistant\n' + content -}}
{%- if m.tool_calls and '<tool_call>' not in content -%}
{%- for c in m.tool_calls -%}
{%- set f = c.function if c.function is defined else c -%}
{{- '\n<tool_call>\n{"name": "' + f.name + '", "arguments": ' + (f.arguments | tojson)
    + '}\n</tool_call>' -}}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- elif m.role == 'tool' -%}
{{- '<|im_start|>user\n<tool_response>\n' + m.content + '\n</tool_response><|im_end|>\n' -}}
{%- else -%}
{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"""


@dataclass(frozen=True)
class Family:
    """A family's template, control tokens, eos, the format ``auto`` should pick, and the text
    its template wraps a tool result in."""

    name: str
    template: str
    special_tokens: tuple[str, ...]
    eos: str
    bos: str | None
    chat_format: str
    result_marker: str


FAMILIES = (
    Family(
        "llama3",
        LLAMA3_STYLE,
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
        "<|begin_of_text|>",
        "llama3_json",
        "<|start_header_id|>ipython<|end_header_id|>",
    ),
    Family(
        "mistral",
        MISTRAL_STYLE,
        (
            "<s>",
            "</s>",
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ),
        "</s>",
        "<s>",
        "mistral",
        "[TOOL_RESULTS]",
    ),
    Family(
        "qwen3",
        QWEN3_STYLE,
        ("<|im_start|>", "<|im_end|>"),
        "<|im_end|>",
        None,
        "hermes",
        "<tool_response>",
    ),
)


def family_tokenizer(base: PreTrainedTokenizerBase, family: Family) -> PreTrainedTokenizerBase:
    """A copy of ``base`` with the family's control tokens, eos and template."""
    tok = copy.deepcopy(base)
    new = [t for t in family.special_tokens if t not in tok.get_vocab()]
    if new:
        tok.add_special_tokens({"additional_special_tokens": new})
    tok.eos_token = family.eos
    if family.bos is not None:
        tok.bos_token = family.bos
    tok.chat_template = family.template
    return tok
