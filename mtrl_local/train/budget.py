"""Before step 0: does a full-length episode fit the model's context window?

The worst case is ``prompt + max_turns × (sampling_max_tokens + tool output)``: every turn can
call tools, the last one included. A config that cannot fit is refused with the knob to change;
otherwise late turns would be silently squeezed (the engine caps a turn's budget by the room
left) and would look like truncation.
"""

from __future__ import annotations

from typing import Any

from mtrl_local.chat_codec import ChatCodec
from mtrl_local.errors import UserError
from mtrl_local.task import ExpertTask, Task


def measure_episode(task: Task, codec: ChatCodec, case: Any) -> tuple[int, int]:
    """``(prompt tokens, most tokens one turn's tool results add)`` of one episode of ``case``.

    The tool results come from the task's expert when it has one (real tool outputs); without
    an expert they count as 0 and only the prompt is measured.
    """
    if isinstance(task, ExpertTask):
        run = task.run_expert(case)
        messages, tools = run.messages, run.tools
    else:
        env = task.make_env()
        try:
            messages, tools = env.reset(case), env.tool_schemas()
        finally:
            env.close()
    prompt = codec.encode_prompt(messages[:2], tools)
    tool_tokens = max(
        (
            len(codec.encode_text(m["content"])) + 8  # + template glue
            for m in messages
            if m["role"] == "tool"
        ),
        default=0,
    )
    return len(prompt), tool_tokens


def check_context_budget(
    max_turns: int,
    sampling_max_tokens: int,
    tool_output_tokens: int,
    prompt_tokens: int,
    context_window: int,
) -> None:
    """Raise :class:`UserError` unless a full-length episode fits the context window.

    ``tool_output_tokens`` is the most one turn's tool results (plus template glue) add; every
    turn can call tools, the last one included, so the worst case is
    ``prompt_tokens + max_turns × (sampling_max_tokens + tool_output_tokens)``. Checked before
    training: otherwise late turns are silently squeezed (the engine caps a turn's budget by the
    room left) and look like truncation.
    """
    for name, value in (
        ("max_turns", max_turns),
        ("sampling_max_tokens", sampling_max_tokens),
        ("context_window", context_window),
    ):
        if value < 1:
            raise UserError(f"config: {name} must be >= 1, got {value}")
    if tool_output_tokens < 0 or prompt_tokens < 0:
        raise UserError("config: tool_output_tokens and prompt_tokens must be >= 0")
    need = prompt_tokens + max_turns * (sampling_max_tokens + tool_output_tokens)
    if need <= context_window:
        return None
    room = context_window - prompt_tokens
    if room <= sampling_max_tokens:
        raise UserError(
            f"config: the prompt alone ({prompt_tokens} tokens) leaves {max(room, 0)} of the "
            f"{context_window}-token context window, less than one turn's sampling_max_tokens "
            f"({sampling_max_tokens}): shorten the system prompt / tool schemas or use a model "
            "with a longer context window"
        )
    fit_turns = room // (sampling_max_tokens + tool_output_tokens)
    fit_tokens = room // max_turns - tool_output_tokens
    options = []
    if fit_turns >= 1:
        options.append(f"lower max_turns to {fit_turns}")
    if fit_tokens >= 1:
        options.append(f"lower sampling_max_tokens to {fit_tokens}")
    options.append("cap tool output lower")
    raise UserError(
        f"config: a full episode needs prompt {prompt_tokens} + max_turns {max_turns} × "
        f"(sampling_max_tokens {sampling_max_tokens} + tool output {tool_output_tokens}) = "
        f"{need} tokens > context window {context_window}: " + ", or ".join(options)
    )


def check_model_budget(
    model: Any,
    task: Task,
    codec: ChatCodec,
    case: Any,
    *,
    max_turns: int,
    sampling_max_tokens: int,
) -> None:
    """:func:`check_context_budget` for ``model``'s own window (none declared: nothing to check),
    measured on one episode of ``case``."""
    window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if window is None:
        return
    prompt, tool_output = measure_episode(task, codec, case)
    check_context_budget(
        max_turns=max_turns,
        sampling_max_tokens=sampling_max_tokens,
        tool_output_tokens=tool_output,
        prompt_tokens=prompt,
        context_window=int(window),
    )
