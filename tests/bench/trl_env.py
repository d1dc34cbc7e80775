"""The TRL 1.16 side of the trainer benchmark: our aircraft environment as a TRL environment.

``GRPOTrainer(environment_factory=…)`` builds one instance per rollout, calls
``reset(**row)`` with the dataset row, and exposes every public method as a tool whose JSON schema
it derives from the method's signature and Google-style docstring. :func:`trl_environment_class`
writes that class from our environment's tool surface: each method has the original tool's
parameters and a docstring written from its schema (no return annotation), so the schema TRL
renders equals ``env.tool_schemas()`` and both trainers see token-identical prompts; it delegates to
``env.call_tool``, so a wrong argument gets the same error string on both sides instead of a
Python ``TypeError``.

Also here: :func:`bench_reward`, the reward both trainers optimise in the benchmark, and the TRL
reward-function adapter around it.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any

from mtrl_local.env import Environment
from mtrl_local.scoring import RewardResult
from rewards.dense import dense_reward

#: Reward per tool result in :func:`bench_reward` (see there).
TOOL_RESULT_BONUS = 0.01


def bench_reward(
    messages: Sequence[dict[str, Any]], ground_truth: dict[str, Any], **_: Any
) -> RewardResult:
    """The dense reward plus ``TOOL_RESULT_BONUS`` per tool result in the episode.

    A briefly warmed-up model rarely writes a parseable answer, so the dense reward alone is the
    same (−0.1) for every rollout of a group: zero advantage everywhere, and mtrl-local skips such
    trajectories in the update (they carry no gradient) while TRL still runs them through the model.
    The bonus gives groups variance, so both trainers do a full update every step. Its cost is
    nil; it is the same function on both sides.
    """
    result = dense_reward(messages, ground_truth)
    assert isinstance(result.reward, float)
    tools = sum(1 for m in messages if m.get("role") == "tool")
    return RewardResult(result.reward + TOOL_RESULT_BONUS * tools, result.metrics)


def _docstring(schema: dict[str, Any]) -> str:
    """A Google-style docstring that parses back to ``schema``'s descriptions.

    Written from our schema rather than copied from the tool: our parser joins a description
    wrapped over several lines with spaces, transformers keeps the newlines.
    """
    lines = [schema["description"], "", "Args:"]
    for param, spec in schema["parameters"]["properties"].items():
        lines.append(f"    {param}: {spec.get('description', '')}")
    return "\n".join(lines)


def _tool_method(
    name: str, original: Callable[..., Any], schema: dict[str, Any]
) -> Callable[..., Any]:
    """A method ``name(self, <original's parameters>)`` that calls ``self.env.call_tool``."""

    def method(self: Any, **arguments: Any) -> str:
        return str(self.env.call_tool(name, arguments).content)

    sig = inspect.signature(original)  # bound method: no ``self``
    hints = typing.get_type_hints(original)
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [p.replace(annotation=hints[p.name]) for p in sig.parameters.values()]
    method.__name__ = method.__qualname__ = name
    method.__doc__ = _docstring(schema)
    method.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    method.__annotations__ = {p.name: hints[p.name] for p in sig.parameters.values()}
    return method


def trl_environment_class(
    make_env: Callable[[], Environment], case_by_id: Callable[[str], Any]
) -> type:
    """A TRL environment class over ``make_env()``; a dataset row names its case by ``case_id``."""
    probe = make_env()
    namespace: dict[str, Any] = {}

    def __init__(self: Any) -> None:
        self.env = make_env()

    def reset(self: Any, case_id: str, **_: Any) -> None:
        # The prompt (system + user turns) is in the dataset row already; nothing to append.
        self.env.reset(case_by_id(case_id), 0)
        return None

    namespace["__init__"] = __init__
    namespace["reset"] = reset
    for tool in probe.tools:
        schema = tool.schema()["function"]
        namespace[tool.name] = _tool_method(tool.name, getattr(probe, tool.name), schema)
    return type("TRLAircraftEnvironment", (), namespace)


class EpisodeLog:
    """What TRL's rollouts looked like: filled by :func:`trl_reward`, one entry per completion."""

    def __init__(self) -> None:
        self.turns: list[int] = []
        self.tool_results: list[int] = []
        self.rewards: list[float] = []


def trl_reward(case_by_id: Callable[[str], Any], log: EpisodeLog) -> Callable[..., list[float]]:
    """:func:`bench_reward` as a TRL reward function (``completions`` are message lists)."""

    def reward(
        prompts: list[list[dict[str, Any]]],
        completions: list[list[dict[str, Any]]],
        case_id: list[str],
        **_: Any,
    ) -> list[float]:
        out = []
        for prompt, completion, cid in zip(prompts, completions, case_id, strict=True):
            messages = [*prompt, *completion]
            value = bench_reward(messages, case_by_id(cid).ground_truth).reward
            assert isinstance(value, float)
            out.append(value)
            log.turns.append(sum(1 for m in completion if m.get("role") == "assistant"))
            log.tool_results.append(sum(1 for m in completion if m.get("role") == "tool"))
            log.rewards.append(value)
        return out

    reward.__name__ = "bench_reward"
    return reward
