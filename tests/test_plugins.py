"""Names → objects at the edge: entry points and module:attribute specs, one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from mtrl_local.errors import UserError
from mtrl_local.plugins import (
    check_model,
    command_plugins,
    load_reward,
    load_task,
    model_names,
    resolve_agent,
    resolve_model,
    task_names,
)
from rewards.dense import dense_reward
from sopbench.aircraft_inspection import AircraftInspection

SUITE = ["aircraft_inspection", "customer_service", "inventory_reconciliation"]


def tiny_task() -> Any:
    """A task made by a function (what ``module:function`` may name)."""
    return AircraftInspection()


NOT_A_TASK = object()


def agent(ctx: Any) -> None:
    """A function agent (what ``--agent-cmd module:function`` may name)."""


def test_the_suite_and_the_default_model_are_registered() -> None:
    assert task_names() == SUITE
    assert "default" in model_names()
    assert "dash" in [ep.name for ep in command_plugins()]
    task = load_task("aircraft_inspection")
    assert isinstance(task, AircraftInspection)
    assert load_task("aircraft_inspection") is task  # one instance per name: cases made once


def test_a_task_by_import_path() -> None:
    by_class = load_task("sopbench.aircraft_inspection:AircraftInspection")
    assert isinstance(by_class, AircraftInspection)
    assert isinstance(load_task("tests.test_plugins:tiny_task"), AircraftInspection)
    with pytest.raises(UserError, match="is not a task"):
        load_task("tests.test_plugins:NOT_A_TASK")


def test_unknown_or_broken_names_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(UserError, match="unknown task 'nope' \\(known tasks: aircraft_inspection"):
        load_task("nope")
    assert load_reward("rewards.dense:dense_reward") is dense_reward
    for spec, message in [
        ("rewards.dense", "expected module:function"),
        ("no_such_module_x:f", "cannot import module 'no_such_module_x'"),
        ("rewards.dense:nope", "has no function 'nope'"),
        ("rewards.dense:__doc__", "is not a function"),
    ]:
        with pytest.raises(UserError, match=message):
            load_reward(spec)
    # A module that imports but raises: still the user's file, one line naming it.
    (tmp_path / "broken_reward_mod.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        UserError, match=r"importing 'broken_reward_mod' failed \(RuntimeError: boom"
    ):
        load_reward("broken_reward_mod:f")


def test_models_are_registered_names_or_model_directories(tmp_path: Path) -> None:
    assert check_model("default") == "default"
    with pytest.raises(UserError, match=r"no such directory \(registered: default"):
        check_model(tmp_path / "missing")
    with pytest.raises(UserError, match="not a model directory"):
        check_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"config\.json names no model_type"):
        check_model(tmp_path)
    shipped = Path(__file__).parents[1] / "sopbench" / "default_model" / "shipped"
    assert resolve_model(shipped) == shipped


def test_agents_are_functions_or_command_lines() -> None:
    assert resolve_agent("tests.test_plugins:agent") is agent
    assert resolve_agent("python my_agent.py --x 'a b'") == [
        sys.executable,
        "my_agent.py",
        "--x",
        "a b",
    ]
    assert resolve_agent("./run.sh") == ["./run.sh"]
    with pytest.raises(UserError, match="agent command is empty"):
        resolve_agent("   ")
    with pytest.raises(UserError, match="has no function"):
        resolve_agent("tests.test_plugins:nope")


def test_a_reward_in_the_current_directory_is_found_without_changing_sys_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "here_reward.py").write_text(
        "def reward(messages, ground_truth):\n    return 1.0\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert load_reward("here_reward:reward")([], {}) == 1.0
    assert str(tmp_path) not in sys.path
    with pytest.raises(UserError, match="cannot import module 'not_here'"):
        load_reward("not_here:reward")
