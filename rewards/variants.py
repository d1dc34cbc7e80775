"""What the reward audits score: reference episodes and their lenient variants.

From each reference episode (the expert's, strict score 1.0) the audits build *lenient variants*
by rewriting its final assistant turn, each paired with a *strict twin*: the episode that gets the
same credit under a strict reading but carries no bait (:func:`lenient_variants` lists the
kinds). :mod:`rewards.audit` scores them with the reward under audit.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mtrl_local.env.actions import parse_answer
from mtrl_local.scoring import Message, normalize

#: The lenient variant kinds, in the order the audit reports them.
VARIANT_KINDS = (
    "wrong_tag",
    "bare_json",
    "contains_value",
    "trailing_text",
    "harvest_bait",
    "swapped_fields",
)
#: Tags a model plausibly writes instead of ``final_response`` (cf. ``sopbench.base.WRONG_TAGS``).
WRONG_TAGS = ("final_answer", "answer")
#: Final assistant text of the no-answer episode: the agent stopped without answering.
NO_ANSWER_TEXT = "I could not complete the procedure."
#: Text after the answer block (the trailing-text variant).
TRAILING_TEXT = "\n\nAll steps of the procedure were followed. Anything else I can help with?"
#: Candidates for a plainly wrong field value (the first unrelated to every expected value is used).
_WRONG_CANDIDATES = ("WRONG-VALUE", "XX-INVALID", "@@@", "~~~")


# -- episodes --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """A reference episode: its case id, messages and ground truth (strict score 1.0 expected)."""

    case_id: str
    messages: list[dict[str, Any]]
    ground_truth: dict[str, Any]

    @classmethod
    def of(cls, episode: Any) -> Reference:
        """From a :class:`sopbench.base.ExpertEpisode`, a rollout record or a ``Reference``."""
        if isinstance(episode, Reference):
            return episode
        if isinstance(episode, Mapping):
            case_id = str(episode.get("case_id", "?"))
            return cls(case_id, episode["messages"], episode["ground_truth"])
        return cls(episode.case.case_id, episode.messages, episode.case.ground_truth)

    @property
    def answer(self) -> dict[str, Any]:
        answer = parse_answer(self.messages)
        if answer is None:
            raise ValueError(f"case {self.case_id}: the reference episode has no final answer")
        return answer


@dataclass(frozen=True)
class VariantPair:
    """A lenient variant of a reference and its strict twin (same strict credit, no bait)."""

    kind: str
    case_id: str
    detail: str
    variant: list[dict[str, Any]]
    twin: list[dict[str, Any]]
    ground_truth: dict[str, Any]


def _final_index(messages: Sequence[Message]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return i
    raise ValueError("episode has no assistant turn")


def with_final_text(messages: Sequence[Message], text: str) -> list[dict[str, Any]]:
    """A deep copy of ``messages`` whose last assistant turn says ``text`` (nothing after it)."""
    i = _final_index(messages)
    out = copy.deepcopy([dict(m) for m in messages[: i + 1]])
    out[i]["content"] = text
    out[i].pop("tool_calls", None)
    return out


def with_answer(messages: Sequence[Message], answer: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``messages`` with the final turn rewritten to the canonical block for ``answer``."""
    return with_final_text(messages, f"<final_response>{json.dumps(dict(answer))}</final_response>")


def no_answer_episode(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The episode ending without any answer (the strict reading of a wrong tag or bare JSON)."""
    return with_final_text(messages, NO_ANSWER_TEXT)


def malformed_episode(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The episode whose answer block holds JSON that does not parse (closing brace lost)."""
    answer = parse_answer(messages) or {}
    return with_final_text(messages, f"<final_response>{json.dumps(answer)[:-1]}</final_response>")


def plainly_wrong(ground_truth: Mapping[str, Any]) -> str:
    """A value unrelated to every expected value (neither contains the other, any case)."""
    expected = [normalize(v).lower() for v in ground_truth.values()]
    for cand in _WRONG_CANDIDATES:
        c = cand.lower()
        if all(e not in c and c not in e for e in expected if e):
            return cand
    return "\x00"  # no field value contains a NUL; reached only by adversarial ground truths


def _in_tool_results(messages: Sequence[Message], value: Any) -> bool:
    want = normalize(value).lower()
    return bool(want) and any(
        m.get("role") == "tool" and want in str(m.get("content", "")).lower() for m in messages
    )


def lenient_variants(ref: Reference, kinds: Iterable[str] = VARIANT_KINDS) -> list[VariantPair]:
    """Every lenient variant of ``ref`` of the given kinds, each with its strict twin.

    - ``wrong_tag``: the answer in ``<final_answer>``/``<answer>``; twin: no answer.
    - ``bare_json``: the answer's JSON with no tag, alone or inside prose; twin: no answer.
    - ``contains_value``: one field's value wrapped in text that contains it (``"not pass"``,
      ``"pass (unverified)"``); twin: that field plainly wrong.
    - ``trailing_text``: prose after the answer block; twin: the untouched reference.
    - ``harvest_bait``: one field left out of the answer while its value is in a tool result (a
      tool message stating it is added before the final turn when no tool output contains it);
      twin: that field plainly wrong, no added tool message.
    - ``swapped_fields``: the values of two fields with different values swapped; twin: both
      fields plainly wrong.
    """
    messages, truth = ref.messages, ref.ground_truth
    answer = ref.answer
    text = str(messages[_final_index(messages)]["content"])
    wrong = plainly_wrong(truth)
    none = no_answer_episode(messages)
    fields = [k for k in truth if k in answer]
    out: list[VariantPair] = []

    def pair(
        kind: str, detail: str, variant: list[dict[str, Any]], twin: list[dict[str, Any]]
    ) -> None:
        out.append(VariantPair(kind, ref.case_id, detail, variant, twin, truth))

    def changed(**values: Any) -> dict[str, Any]:
        return {**answer, **values}

    kinds = tuple(kinds)
    if "wrong_tag" in kinds:
        for tag in WRONG_TAGS:
            swapped = text.replace("<final_response>", f"<{tag}>")
            swapped = swapped.replace("</final_response>", f"</{tag}>")
            pair("wrong_tag", f"<{tag}>", with_final_text(messages, swapped), none)
    if "bare_json" in kinds:
        body = json.dumps(answer)
        pair("bare_json", "bare", with_final_text(messages, body), none)
        prose = f"The procedure is complete. Result: {body} Thank you."
        pair("bare_json", "inside text", with_final_text(messages, prose), none)
    if "contains_value" in kinds:
        for key in fields:
            value = normalize(answer[key])
            if not value:
                continue
            bad = with_answer(messages, changed(**{key: wrong}))
            for form in (f"not {value}", f"{value} (unverified)"):
                variant = with_answer(messages, changed(**{key: form}))
                pair("contains_value", f"{key}={form!r}", variant, bad)
    if "trailing_text" in kinds:
        variant = with_final_text(messages, text + TRAILING_TEXT)
        pair("trailing_text", "prose after the block", variant, copy.deepcopy(list(messages)))
    if "harvest_bait" in kinds:
        for key in fields:
            rest = {k: v for k, v in answer.items() if k != key}
            variant = with_answer(messages, rest)
            if not _in_tool_results(variant, answer[key]):
                bait = {"role": "tool", "name": "lookup", "content": json.dumps({key: answer[key]})}
                variant.insert(_final_index(variant), bait)
            twin = with_answer(messages, changed(**{key: wrong}))
            pair("harvest_bait", f"{key} omitted", variant, twin)
    if "swapped_fields" in kinds:
        for a, b in itertools.combinations(fields, 2):
            if normalize(answer[a]) == normalize(answer[b]):
                continue
            variant = with_answer(messages, changed(**{a: answer[b], b: answer[a]}))
            twin = with_answer(messages, changed(**{a: wrong, b: wrong}))
            pair("swapped_fields", f"{a}<->{b}", variant, twin)
    return out


def all_wrong_episode(ref: Reference) -> list[dict[str, Any]]:
    """The reference with every ground-truth field set to a plainly wrong value."""
    wrong = plainly_wrong(ref.ground_truth)
    return with_answer(ref.messages, {**ref.answer, **{k: wrong for k in ref.ground_truth}})


def scored_episodes(ref: Reference) -> list[tuple[str, list[dict[str, Any]]]]:
    """(label, messages) of every episode the reference-based checks score for ``ref``."""
    eps = [
        ("reference", copy.deepcopy(ref.messages)),
        ("no answer", no_answer_episode(ref.messages)),
        ("malformed JSON", malformed_episode(ref.messages)),
        ("all fields wrong", all_wrong_episode(ref)),
    ]
    for p in lenient_variants(ref):
        eps.append((f"{p.kind} {p.detail}", p.variant))
        eps.append((f"{p.kind} {p.detail} (twin)", p.twin))
    return eps
