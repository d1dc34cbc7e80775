"""Rewards NOT to train with: each lenient trick here pays for answers the evaluation scores 0.

These exist so the reward audit (``rewards.audit``, ``pytest --pyargs rewards.audits``) has a known
offender to catch, and so the mistakes have names. Each one looks like a harmless convenience ("the
model almost got the format right") and each one is a reward hack waiting to be found: the policy
learns whatever the reward pays for, and the strict scorer (the evaluation, docs/design.md, "Rewards
and the strict scorer") pays for none of these.

- :func:`lenient_parse` — reads other tags, bare JSON and JSON buried in prose. The model is
  never taught the output format the evaluation reads, so training reward rises while
  ``val/completion_rate`` does not.
- :func:`substring_match` — "the answer contains the expected value". ``"unsuccessful"`` contains
  ``"success"``, ``"failure"`` contains ``"fail"``, ``"not true"`` contains ``"true"``: hedging and
  negation are credited, and a value listing every option scores on every field.
- :func:`harvest_tool_results` — credits a field the answer omits when its value appears in some
  tool output. The agent is paid for calling tools, not for reporting what they said.
- :func:`key_insensitive_matches` — matches values regardless of field names, so an answer that
  puts the mechanical result under the electrical key (swapped fields) still scores.
- :func:`lenient_reward` — all of the above, with :func:`rewards.dense.dense_reward`'s signature
  and metric names; the built-in audit set must fail on it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mtrl_local.env.actions import extract_final_response, final_assistant_text
from mtrl_local.scoring import Message, RewardResult, normalize

#: WRONG: any of these tags is read as the final answer. The evaluation reads only the first.
LENIENT_TAGS = ("final_response", "final_answer", "answer", "final", "response", "output")
_TAG_RE = re.compile(r"<(" + "|".join(LENIENT_TAGS) + r")>(.*?)</\1>", re.S)


def _json_objects_in(text: str) -> list[dict[str, Any]]:
    """Every JSON object that can be decoded starting at some ``{`` in ``text``, in order."""
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    i = text.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except (json.JSONDecodeError, RecursionError):
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
        i = text.find("{", end)
    return found


def lenient_parse(
    messages: Sequence[Message], tail_chars: int | None = None
) -> dict[str, Any] | None:
    """WRONG: an answer from the last assistant turn, however it was written.

    Accepts ``<final_answer>``/``<answer>``/… blocks as well as ``<final_response>``, then falls
    back to bare JSON or the last JSON object found anywhere inside the text. Why it is wrong: the
    evaluation reads only ``<final_response>``; a model rewarded for the other forms keeps
    writing them and scores 0 where it matters.

    ``tail_chars`` reads only the last that many characters of the turn: the search backtracks over
    unclosed tags and braces, so a display of hostile text bounds it.

    >>> lenient_parse([{"role": "assistant", "content": 'Done: {"a": 1} thanks'}])
    {'a': 1}
    """
    text = final_assistant_text(messages)
    if not text:
        return None
    if tail_chars is not None:
        text = text[-tail_chars:]
    strict = extract_final_response(text)
    if strict is not None:
        return strict
    for _, body in reversed(_TAG_RE.findall(text)):
        objects = _json_objects_in(body)
        if objects:
            return objects[-1]
    objects = _json_objects_in(text)
    return objects[-1] if objects else None


def substring_match(answer_value: Any, expected: Any) -> bool:
    """WRONG: case-insensitive "contains" instead of equality.

    Why it is wrong: negations and hedges contain the word they negate.

    >>> substring_match("unsuccessful", "success"), substring_match("failure", "fail")
    (True, True)
    """
    want = normalize(expected).lower()
    return bool(want) and want in normalize(answer_value).lower()


def harvest_tool_results(messages: Sequence[Message], expected: Any) -> bool:
    """WRONG: whether ``expected`` appears in any tool message (used to credit omitted fields).

    Why it is wrong: the tool output is the agent's input, not its answer. Crediting it pays for
    reading, not for reporting, and the evaluation reads only the answer.
    """
    want = normalize(expected).lower()
    if not want:
        return False
    return any(
        m.get("role") == "tool" and want in str(m.get("content", "")).lower() for m in messages
    )


def key_insensitive_matches(
    answer: Mapping[str, Any], ground_truth: Mapping[str, Any]
) -> dict[str, bool]:
    """WRONG: a field counts as right if its expected value is *any* value of the answer.

    Each answer value may be used once. Why it is wrong: field names carry the meaning;
    ``{"mechanical": "fail", "electrical": "pass"}`` and the swapped answer are different reports,
    and the evaluation scores the swapped one wrong on both fields.
    """
    pool = list(answer.values())
    out: dict[str, bool] = {}
    for key, expected in ground_truth.items():
        hit = next((i for i, v in enumerate(pool) if substring_match(v, expected)), None)
        out[key] = hit is not None
        if hit is not None:
            pool.pop(hit)
    return out


def lenient_reward(
    messages: Sequence[Message],
    ground_truth: Mapping[str, Any],
    format_coef: float = 0.1,
    **_: Any,
) -> RewardResult:
    """WRONG: :func:`rewards.dense.dense_reward` built on every trick above. Do not train with it.

    A field is credited if the leniently parsed answer has it (substring match), or if some answer
    value matches it regardless of key, or if the answer lacks it and a tool output contains it.
    Same range and metric names as the dense reward (``completion``, ``field_acc``, ``strict``), so
    it drops into any place the dense reward goes — which is exactly the danger.
    """
    answer = lenient_parse(messages)
    emitted = answer is not None
    if answer is None:
        matches = {key: False for key in ground_truth}
    else:
        by_value = key_insensitive_matches(answer, ground_truth)
        matches = {}
        for key, expected in ground_truth.items():
            if key in answer:
                matches[key] = substring_match(answer[key], expected) or by_value[key]
            else:
                matches[key] = by_value[key] or harvest_tool_results(messages, expected)
    field_acc = sum(matches.values()) / len(matches) if matches else float(emitted)
    reward = field_acc + format_coef * (float(emitted) - 1.0)
    metrics = {
        "completion": float(emitted),
        "field_acc": field_acc,
        "strict": float(emitted and all(matches.values())),
    }
    return RewardResult(reward, metrics)
