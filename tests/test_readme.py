"""The README's code examples run as written: an environment driven by an episode, and a task of a
user's own package resolved by its import path and run through the rollout engine."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from mtrl_local.env import render_final_response, render_tool_call
from mtrl_local.model_io import load_model
from mtrl_local.plugins import load_task
from mtrl_local.rollout import RolloutEngine, SamplingParams, ScriptedSampler
from mtrl_local.scoring import strict_score
from sopbench.default_model.cache import default_model_path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(containing: str) -> str:
    """The README's Python code block that contains ``containing``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


def test_the_environment_example_runs() -> None:
    namespace: dict[str, Any] = {}
    exec(python_block("class Hangar"), namespace)
    assert namespace["episode"].stats.done_reason == "final_answer"
    assert namespace["episode"].messages[-2]["content"] == '{"voltage_v": 24.8}'


@pytest.fixture
def readme_tasks(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The "bring your own task" example as an importable module ``readme_tasks``."""
    module = types.ModuleType("readme_tasks")
    monkeypatch.setitem(sys.modules, "readme_tasks", module)  # dataclasses look their module up
    exec(python_block("class OrderStatus"), module.__dict__)
    return module


def test_your_own_task_runs_through_the_engine(readme_tasks: types.ModuleType) -> None:
    task = load_task("readme_tasks:OrderStatus")
    _, tok = load_model(default_model_path(progress=False))
    cases = task.cases("test")

    def script(key: str, turn: int, context: list[int]) -> list[int]:
        order = key.split("#")[0]
        text = (
            render_tool_call("get_order", {"order_id": order})
            if turn == 0
            else render_final_response({"status": "shipped"})
        )
        return [*tok.encode(text, add_special_tokens=False), tok.eos_token_id]

    engine = RolloutEngine(ScriptedSampler(script, tok.eos_token_id), tok, progress=False)
    trajectories = engine.run(task, cases, sampling=SamplingParams(), scorer=strict_score)
    assert len(trajectories) == len(cases) == 10
    for t in trajectories:
        assert t.done_reason == "final_answer" and t.strict == 1.0 and t.tool_errors == 0
