"""A model's chat template and tool-call format, bound into token-in / token-out encoders.

:class:`ChatCodec` is what the rollout engine, the rollout server, SFT and the budget check use
to turn messages into ids, whatever model they run:

* **Tools always reach the model.** When the template renders ``tools`` (a probe tool's name
  shows up in the text) the schemas go through it; when it ignores them, the codec adds the
  format's tools section (how to call, then the schemas) to the system turn, and logs that it
  did.
* **Calls are read in the model's format** (:mod:`mtrl_local.chat_formats`, ``chat_format``).
* **Trajectories are append-only.** The prompt is encoded once; after each sampled turn (which
  ends in the eos the sampler stopped on) only the template's text for the new messages is
  encoded, found by rendering a one-turn anchor conversation with and without them. Earlier
  turns are never re-rendered, so a template that rewrites history (for instance one that drops
  earlier reasoning) still gives exactly the ids that were sampled. A template that cannot be
  used this way — it does not close an assistant turn with the eos token, or it changes an
  assistant turn once a message follows it — is refused with one line naming ``chat_format``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from mtrl_local.chat_formats import CHAT_FORMATS, Call, ChatFormat, resolve_format
from mtrl_local.env.actions import (
    TOOL_CALL_OPEN,
    TOOL_CALL_RE,
    ParsedCall,
    UnreadableJSON,
    load_json,
)
from mtrl_local.errors import UserError

logger = logging.getLogger(__name__)

Message = dict[str, Any]

#: The ``tokenizer_config.json`` key of the format a model was trained with (``mtrl sft``, the
#: trainer's export); ``auto`` reads it before the template.
FORMAT_RECORD_KEY = "mtrl_chat_format"
#: The tool the codec shows a template to learn whether it renders ``tools``.
PROBE_TOOL = "mtrl_probe_tool"
#: Content of the anchor assistant turn (found again in the render; no template writes it).
_ANCHOR = "MTRL-ANCHOR-7f3c"
_ANCHOR_TURNS: list[Message] = [
    {"role": "user", "content": "."},
    {"role": "assistant", "content": _ANCHOR},
]


class ChatCodec:
    """A tokenizer's chat template and a :class:`~mtrl_local.chat_formats.ChatFormat`, as ids.

    ``chat_format`` is a format or its name (``auto``: the one recorded with the model by
    :func:`record_chat_format`, else chosen from the template). Raises
    :class:`~mtrl_local.errors.UserError` when the tokenizer has no chat template or no eos.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, chat_format: ChatFormat | str = "auto"
    ) -> None:
        if not tokenizer.chat_template:
            raise UserError("tokenizer: no chat template (a chat model's tokenizer has one)")
        eos = tokenizer.eos_token_id
        if not isinstance(eos, int) or not tokenizer.eos_token:
            raise UserError("tokenizer: no eos token, so a sampled turn cannot end")
        self.tokenizer = tokenizer
        if chat_format == "auto":
            chat_format = recorded_chat_format(tokenizer) or "auto"
        try:
            self.format = (
                chat_format
                if isinstance(chat_format, ChatFormat)
                else resolve_format(chat_format, tokenizer.chat_template)
            )
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self.eos_id: int = eos
        self.eos_text: str = str(tokenizer.eos_token)
        self.template_renders_tools = self._renders_tools()
        self._writes_tags = TOOL_CALL_OPEN in self.format.render_calls([("f", {})])
        if not self.template_renders_tools:
            logger.warning(
                "the chat template ignores `tools`: adding a tools section in the %s format to "
                "the system turn",
                self.format.name,
            )

    # -- prompt -----------------------------------------------------------------------------------
    def prompt_messages(
        self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None
    ) -> list[Message]:
        """``messages`` with the tools section in the system turn when the template would drop
        the schemas (otherwise unchanged; the template renders them)."""
        out = [dict(m) for m in messages]
        if not tools or self.template_renders_tools:
            return out
        section = self.format.tools_section(tools)
        if out and out[0].get("role") == "system":
            out[0]["content"] = f"{out[0].get('content') or ''}\n\n{section}"
        else:
            out.insert(0, {"role": "system", "content": section})
        return out

    def render_prompt(
        self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None = None
    ) -> str:
        """The opening messages and the assistant header as text (what :meth:`encode_prompt`
        encodes)."""
        passed = list(tools) if tools and self.template_renders_tools else None
        return self._render(self.prompt_messages(messages, tools), passed, True)

    def encode_prompt(
        self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None = None
    ) -> list[int]:
        """Ids of the opening messages plus the assistant header: the sampler's first input."""
        return self.encode_text(self.render_prompt(messages, tools))

    # -- turns ------------------------------------------------------------------------------------
    def encode_assistant(self, content: str) -> list[int]:
        """Ids of an assistant turn as a sampler that stopped on eos produced them."""
        return [*self.encode_text(content), self.eos_id]

    def encode_calls_turn(self, content: str, calls: Sequence[Call]) -> list[int]:
        """Ids of an assistant turn with ``content`` and then ``calls`` in this format."""
        return self.encode_assistant(self.assistant_text(content, calls))

    def assistant_text(self, content: str, calls: Sequence[Call]) -> str:
        """An assistant turn's text: ``content`` then the calls as this format writes them."""
        if not calls:
            return content
        written = self.format.render_calls(calls)
        return f"{content}\n{written}" if content else written

    def assistant_text_of(self, message: Message) -> str:
        """The text an assistant ``message`` stands for in this format: its content as written
        when that already holds its calls in this format (or there are none), else its content
        without ``<tool_call>`` blocks followed by its ``tool_calls`` written in this format.
        ``tool_calls`` may be ``{"name", "arguments"}`` (the episode's record) or OpenAI-style
        ``{"function": {"name", "arguments"}}``, arguments as an object or a JSON string."""
        content = message.get("content")
        text = content if isinstance(content, str) else ""
        calls = [_call_of(c) for c in message.get("tool_calls") or []]
        if not calls:
            return text
        written = [(c.name, c.arguments) for c in self.parse_calls(text) if c.error is None]
        foreign_tags = TOOL_CALL_OPEN in text and not self._writes_tags
        if written == calls and not foreign_tags:
            return text
        bare = TOOL_CALL_RE.sub("", text).strip()
        return self.assistant_text(bare, calls)

    def encode_continuation(self, new_messages: Sequence[Message]) -> list[int]:
        """Ids to append after an assistant turn's sampled ids (which end in eos): the template's
        glue after that turn, the ``new_messages`` (tool results in the format's role) and the
        next assistant header. ``[]`` for no messages: the trajectory ends at the sampled eos."""
        if not new_messages:
            return []
        new = [self._in_format(m) for m in new_messages]
        before = self._render(_ANCHOR_TURNS, None, False)
        after = self._render([*_ANCHOR_TURNS, *new], None, True)
        cut = before.index(_ANCHOR) + len(_ANCHOR)
        if not before.startswith(self.eos_text, cut):
            raise UserError(
                f"chat_format: this chat template does not end an assistant turn with the eos "
                f"token {self.eos_text!r}, so sampled turns cannot be continued token for token"
            )
        cut += len(self.eos_text)
        if after[:cut] != before[:cut]:
            raise UserError(
                "chat_format: this chat template rewrites an assistant turn once a message follows "
                "it (not prefix-preserving); token-in/token-out trajectories need one that does not"
            )
        return self.encode_text(after[cut:])

    def parse_calls(self, text: str) -> list[ParsedCall]:
        """The tool calls of one assistant turn, read in this codec's format."""
        return self.format.parse_calls(text)

    def encode_text(self, text: str) -> list[int]:
        """``text`` as ids; the template writes every control token itself (none added here)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    # -- template ---------------------------------------------------------------------------------
    def _in_format(self, message: Message) -> Message:
        if message.get("role") != "tool" or self.format.tool_role == "tool":
            return dict(message)
        return {**message, "role": self.format.tool_role}

    def _render(
        self,
        messages: Sequence[Message],
        tools: Sequence[dict[str, Any]] | None,
        add_generation_prompt: bool,
    ) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                list(messages),
                tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except (TemplateError, TypeError, ValueError) as exc:
            raise UserError(f"chat_format: the chat template failed to render ({exc})") from None
        if not isinstance(text, str):
            raise TypeError(f"chat template rendered {type(text).__name__}, expected str")
        return text

    def _renders_tools(self) -> bool:
        return template_renders_tools(self.tokenizer)


def record_chat_format(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Record the format a model was trained to write: ``save_pretrained`` keeps it in
    ``tokenizer_config.json``, and ``chat_format = "auto"`` then uses it."""
    tokenizer.init_kwargs[FORMAT_RECORD_KEY] = name


def recorded_chat_format(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The format recorded with the tokenizer (:func:`record_chat_format`), if a known one."""
    name = getattr(tokenizer, "init_kwargs", {}).get(FORMAT_RECORD_KEY)
    return name if name in CHAT_FORMATS else None


def template_renders_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``tokenizer``'s chat template puts the ``tools`` it is given into the text (a
    probe tool's name shows up); a template that fails on them does not."""
    probe = {
        "type": "function",
        "function": {
            "name": PROBE_TOOL,
            "description": "probe",
            "parameters": {"type": "object", "properties": {}},
        },
    }
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "."}],
            tools=[probe],
            add_generation_prompt=True,
            tokenize=False,
        )
    except (TemplateError, TypeError, ValueError):
        return False
    return isinstance(text, str) and PROBE_TOOL in text


def _call_of(call: Any) -> Call:
    """``(name, arguments)`` of a recorded or OpenAI-style tool call (refused with a one-line
    error when it has no name or its arguments are not a JSON object)."""
    function = call.get("function") if isinstance(call, dict) else None
    holder = function if isinstance(function, dict) else call
    name = holder.get("name") if isinstance(holder, dict) else None
    arguments = holder.get("arguments", {}) if isinstance(holder, dict) else None
    if isinstance(arguments, str):
        try:
            arguments = load_json(arguments)
        except UnreadableJSON as exc:
            raise UserError(f"tool_calls: arguments of '{name}' {exc}") from None
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        raise UserError(
            f"tool_calls: {json.dumps(call)[:80]} is not a call with a name and a "
            "JSON object of arguments"
        )
    return name, arguments


__all__ = [
    "FORMAT_RECORD_KEY",
    "PROBE_TOOL",
    "ChatCodec",
    "record_chat_format",
    "recorded_chat_format",
    "template_renders_tools",
]
