"""The context-budget check before step 0: the arithmetic, and the episode it measures."""

from __future__ import annotations

from typing import Any

import pytest

from mtrl_local.chat_codec import ChatCodec
from mtrl_local.errors import UserError
from mtrl_local.model_io import load_model
from mtrl_local.plugins import load_task
from mtrl_local.train.budget import check_context_budget, measure_episode
from sopbench.default_model.cache import default_model_path


def test_context_budget() -> None:
    assert check_context_budget(9, 512, 256, 1000, 8192) is None  # 1000 + 9·768 = 7912
    with pytest.raises(UserError) as err:
        check_context_budget(10, 512, 256, 1000, 8192)  # 8680 > 8192
    msg = str(err.value)
    assert "8680 tokens > context window 8192" in msg
    assert "lower max_turns to 9" in msg and "lower sampling_max_tokens to 463" in msg
    with pytest.raises(UserError, match="prompt alone"):
        check_context_budget(4, 512, 0, 7900, 8192)
    with pytest.raises(UserError, match="max_turns must be >= 1"):
        check_context_budget(0, 512, 0, 10, 8192)


class NoExpert:
    """The aircraft task seen through the library's Task protocol only (no expert program)."""

    def __init__(self, task: Any) -> None:
        self._task = task
        self.name, self.output_fields, self.outcome_field = task.name, task.output_fields, None
        self.max_turns = task.max_turns

    def make_env(self) -> Any:
        return self._task.make_env()

    def cases(self, split: str | None = None) -> list[Any]:
        return self._task.cases(split)


def test_measure_episode_reads_the_experts_tool_outputs_or_only_the_prompt() -> None:
    task = load_task("aircraft_inspection")
    _, tok = load_model(default_model_path(progress=False))
    case = task.cases("train")[0]
    episode = task.run_expert(case)
    prompt = len(ChatCodec(tok).encode_prompt(episode.messages[:2], episode.tools))
    longest = max(
        len(tok.encode(m["content"], add_special_tokens=False))
        for m in episode.messages
        if m["role"] == "tool"
    )
    assert measure_episode(task, ChatCodec(tok), case) == (prompt, longest + 8)
    # A task without an expert: the prompt is measured from the environment, tool output as 0.
    assert measure_episode(NoExpert(task), ChatCodec(tok), case) == (prompt, 0)
