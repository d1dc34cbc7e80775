"""Warm-start data of the default model: noisy-expert demonstrations of the suite's train split.

A demonstration is one whole trajectory as one sequence (sequence extension): every assistant
turn of an episode is trained in one forward pass over ~2.5k tokens, instead of one sample per
turn that would re-encode the 1.25k-token prompt ten times.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, cast

from mtrl_local.plugins import load_task
from sopbench.base import ExpertEpisode, Task


def jsonable_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with every tool call's ``arguments`` as a JSON string.

    ``datasets`` infers one Arrow struct per column: differing argument dicts would be merged into
    one struct whose missing fields come back as ``None`` (and would then be rendered). A string
    is rendered verbatim by the template, and it is the string the policy wrote.
    """
    out = []
    for m in messages:
        row: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            row["tool_calls"] = [
                {
                    "name": c["name"],
                    "arguments": c["arguments"]
                    if isinstance(c["arguments"], str)
                    else json.dumps(c["arguments"]),
                }
                for c in m["tool_calls"]
            ]
        out.append(row)
    return out


def demonstration_episodes(
    mix: Sequence[tuple[str, int]], noise_rate: float, seed: int, max_cases: int | None = None
) -> list[ExpertEpisode]:
    """Noisy-expert episodes on the **train** split: ``(task, repeats)`` per task in ``mix``.

    ``max_cases`` keeps the first N cases of each task (tiny test builds). Each repeat runs the
    expert with another noise seed, so repeats of a case differ where the
    expert slips (and are identical where it does not).
    """
    episodes: list[ExpertEpisode] = []
    for name, repeats in mix:
        task = cast(Task, load_task(name))
        cases = task.cases("train")[:max_cases]
        for r in range(repeats):
            episodes += [
                task.run_expert(c, seed=seed * 1000 + r, noise_rate=noise_rate) for c in cases
            ]
    return episodes


def demonstration_rows(episodes: Iterable[ExpertEpisode]) -> list[dict[str, Any]]:
    """SFT rows ``{"messages", "tools"}`` (tools as one JSON string, see above)."""
    return [
        {"messages": jsonable_messages(e.messages), "tools": json.dumps(e.tools)} for e in episodes
    ]


def suite_texts(episodes: Iterable[ExpertEpisode]) -> list[str]:
    """The text a tokenizer is trained on: every SOP, every tool schema and every message.

    Only train-split episodes are passed in, so the test split never shapes the vocabulary.
    """
    texts: list[str] = []
    seen_tools: set[str] = set()
    for e in episodes:
        tools = json.dumps(e.tools)
        if tools not in seen_tools:
            seen_tools.add(tools)
            texts += [json.dumps(t.get("function", t)) for t in e.tools]
        texts += [m.get("content") or "" for m in e.messages]
    return texts
