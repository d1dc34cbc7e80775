"""Synthetic copy curriculum: teach a tiny model to copy before it sees the long SOP prompts.

Why this exists: plain SFT on the demonstrations does not teach a sub-10M-parameter model to copy.
Measured on 2 CPU cores, 0.55M–5M models trained for 12–18 minutes on the task trajectories wrote
well-formed tool calls with the *wrong* aircraft id 100 % of the time: the id appears once per
trajectory, far from where it is needed, behind ~1.2k tokens of SOP and tool schemas, and
"predict the most frequent digit" is a cheaper way to lower the loss than learning an induction
head. One minute of the short, dense copy tasks below first builds that circuit; afterwards the
same SFT copied the id 99.5 % of the time.

Three kinds, each a one-turn chat (``user`` → ``assistant``) so it runs through the very same
``SFTTrainer(assistant_only_loss=True)`` path as the demonstrations:

* ``copy_id``: an id-like string (``AC-48213``, ``SN-70915``, ``N731QK``, ``ACC-44990``…) in
  filler text, to be copied into ``{"<key>": "<id>"}`` — the shape of a tool call's arguments.
* ``repeat``: a random run of tokens after a marker, repeated verbatim — copying in general.
* ``lookup``: a JSON object whose keys share words (``registered_serial``, ``serial_plate``,
  ``logged_serial``), and a question naming one key: answer ``{"<key>": <value>}`` — reading one
  value out of a tool result, the step before every rule-derived field.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mtrl_local.chat import ASSISTANT_HEADER, IM_END
from mtrl_local.env.actions import FINAL_CLOSE, FINAL_OPEN

CurriculumKind = Literal["copy_id", "repeat", "lookup"]
KINDS: tuple[CurriculumKind, ...] = ("copy_id", "repeat", "lookup")

#: Filler vocabulary: words of the suite's own SOPs and tool results, so the curriculum's text is
#: in-distribution for the tokenizer trained on that suite.
FILLER_TEXT = (
    "inspect aircraft before its next flight following the SOP check the component serial plate "
    "registered weight battery voltage circuit avionics maintenance log report discrepancy "
    "incident account customer order ticket warehouse count ledger variance approval record "
    "result pass fail consistent none value reading status open closed intermittent call tool "
    "with the id of this request please verify and reply"
)
FILLER = tuple(FILLER_TEXT.split())
KEY_TEXT = (
    "aircraft serial registered plate logged tail number spec measured weight min battery "
    "voltage account order ticket sku warehouse incident discrepancy session id code"
)
KEY_WORDS = tuple(KEY_TEXT.split())
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
DIGITS = "0123456789"


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(n))


def random_id(rng: random.Random) -> str:
    """An id in one of the suite's shapes (prefix + digits, or a tail number)."""
    shape = rng.randrange(6)
    if shape == 0:
        return f"AC-{_digits(rng, 5)}"
    if shape == 1:
        return f"SN-{_digits(rng, 5)}"
    if shape == 2:
        return f"N{_digits(rng, 3)}{rng.choice(LETTERS)}{rng.choice(LETTERS)}"
    if shape == 3:
        prefix = rng.choice(("ACC", "ORD", "TKT", "SKU", "INC", "DSC", "WH"))
        return f"{prefix}-{_digits(rng, rng.randint(1, 5))}"
    if shape == 4:
        return f"{rng.choice(LETTERS)}{rng.choice(LETTERS)}{_digits(rng, rng.randint(2, 6))}"
    return "".join(rng.choice(LETTERS + DIGITS) for _ in range(rng.randint(4, 8)))


def random_key(rng: random.Random) -> str:
    """A snake_case key of 1–3 suite words: keys that share words make lookups non-trivial."""
    return "_".join(rng.sample(KEY_WORDS, rng.randint(1, 3)))


def _filler(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(FILLER) for _ in range(rng.randint(lo, hi)))


def _value(rng: random.Random) -> Any:
    kind = rng.randrange(5)
    if kind == 0:
        return random_id(rng)
    if kind == 1:
        return rng.randint(0, 999)
    if kind == 2:
        return round(rng.uniform(0.5, 999.9), 1)
    if kind == 3:
        return rng.choice([True, False])
    return rng.choice(FILLER)


@dataclass(frozen=True)
class CopyExample:
    """One curriculum item: the user text, the exact assistant target, and its kind."""

    kind: CurriculumKind
    prompt: str
    target: str

    def messages(self) -> list[dict[str, str]]:
        """The item as a one-turn chat (the shape ``SFTTrainer`` trains on)."""
        return [
            {"role": "user", "content": self.prompt},
            {"role": "assistant", "content": self.target},
        ]


def copy_id_example(rng: random.Random) -> CopyExample:
    """An id in filler text, copied into ``{"<key>": "<id>"}``."""
    ident, key = random_id(rng), random_key(rng)
    prompt = (
        f'{_filler(rng, 3, 30)} {ident} {_filler(rng, 0, 30)}. Reply with {{"{key}": <the id>}}.'
    )
    return CopyExample("copy_id", prompt, json.dumps({key: ident}))


def repeat_example(rng: random.Random) -> CopyExample:
    """A run of 3–10 random id-like groups (8–60 symbols), repeated after a marker.

    Every target token is predictable only by copying, so this is the densest signal for the
    induction heads that copying needs; the symbols are digits and capitals, one token each.
    """
    run = " ".join(random_id(rng) for _ in range(rng.randint(3, 10)))
    return CopyExample("repeat", f"{_filler(rng, 0, 10)}\nRepeat: {run}", run)


def lookup_example(rng: random.Random) -> CopyExample:
    """A JSON object of 3–8 keys sharing words; answer the value of the key asked for."""
    obj: dict[str, Any] = {}
    while len(obj) < rng.randint(3, 8):
        obj[random_key(rng)] = _value(rng)
    key = rng.choice(list(obj))
    prompt = f"{json.dumps(obj)}\nWhat is {key}? Reply with {{{json.dumps(key)}: <value>}}."
    return CopyExample("lookup", prompt, json.dumps({key: obj[key]}))


GENERATORS = {"copy_id": copy_id_example, "repeat": repeat_example, "lookup": lookup_example}


#: Order in which the kinds cycle: half of the items are ``repeat`` (the densest copy signal).
CYCLE: tuple[CurriculumKind, ...] = ("copy_id", "repeat", "lookup", "repeat")


def induction_sequences(
    rng: random.Random,
    symbols: Sequence[int],
    fillers: Sequence[int],
    markers: tuple[int, int],
    n: int,
    width: int = 64,
) -> tuple[list[list[int]], list[list[int]]]:
    """``n`` token-level copy sequences ``filler · run · end · filler · start · run``.

    The stage before the text curriculum: a run of 5–15 ``symbols`` (the digit and capital-letter
    tokens ids are spelled with) appears once, and must be repeated after the second marker,
    at a distance that varies from sequence to sequence. Only the repeat is trained (labels -100
    elsewhere). A fixed distance would be learnt as a positional shortcut; a variable one needs an
    induction head (a previous-token head composed with a head that matches it), which is what
    copying an id out of a long prompt needs. The two ``markers`` (end, start) differ: with one
    marker, an induction head would copy the filler that followed its first occurrence. Returns
    ``(input_ids, labels)``, each ``width`` long (right-padded with the end marker, label -100).
    """
    end, start = markers
    inputs: list[list[int]] = []
    labels: list[list[int]] = []
    for _ in range(n):
        run = [rng.choice(symbols) for _ in range(rng.randint(5, 15))]
        pre = [rng.choice(fillers) for _ in range(rng.randint(0, 10))]
        gap = [rng.choice(fillers) for _ in range(rng.randint(0, 10))]
        ids = [*pre, *run, end, *gap, start, *run][:width]
        lab = [-100] * (len(ids) - len(run)) + ids[len(ids) - len(run) :]
        pad = width - len(ids)
        inputs.append(ids + [end] * pad)
        labels.append(lab + [-100] * pad)
    return inputs, labels


def keyed_runs(
    rng: random.Random,
    digits: Sequence[int],
    capitals: Sequence[int],
    fillers: Sequence[int],
    markers: tuple[int, int],
    n: int,
    width: int = 512,
) -> tuple[list[list[int]], list[list[int]]]:
    """``n`` token-level keyed-retrieval sequences, each ``width`` long.

    The stage after :func:`induction_sequences`. Each sequence holds 4–12 records
    ``filler · key · run · end`` (a key is two filler tokens; a run is 4–8 digits and capitals,
    a third of them shaped like a tail number ``N`` + 3 digits + 2 capitals), then a query
    ``start · key`` whose answer is that key's run, hundreds of tokens back. Only the answer is
    trained. ``capitals[0]`` is the tail-number prefix (``N``).

    Why: after the induction stage the model copied an id that follows a unique context (the
    aircraft id after ``"aircraft_id": "``) but not a tail number from a tool result ~1k tokens
    back: digits right, the two capitals wrong in every test case. With a one-token match, the
    token after ``N565`` is ambiguous wherever ``5`` also occurs (weights, voltages, serials).
    Runs drawn from the same few symbols, among stray digits, make a one-token match useless;
    retrieval must key on the record and the run so far. Measured: 200 steps of this, then 150
    SFT steps, raised teacher-forced exact tail numbers on the aircraft test split from 0.00 to
    0.75; the same 150 SFT steps alone left them at 0.00.
    """
    end, start = markers
    letters = list(capitals)
    inputs: list[list[int]] = []
    labels: list[list[int]] = []
    for _ in range(n):
        k = rng.randint(4, 12)
        keys = rng.sample(list(fillers), 2 * k)
        records: list[tuple[int, list[int], list[int]]] = []  # (position of key, key, run)
        ids: list[int] = []
        for i in range(k):
            shape = rng.randrange(3)
            if shape == 0:
                run = [capitals[0], *rng.choices(digits, k=3), *rng.choices(letters, k=2)]
            elif shape == 1:
                run = [*rng.choices(letters, k=2), *rng.choices(digits, k=5)]
            else:
                run = rng.choices([*digits, *capitals], k=rng.randint(4, 8))
            key = keys[2 * i : 2 * i + 2]
            ids += rng.choices(fillers, k=rng.randint(0, 40))
            ids += rng.choices(digits, k=rng.randint(0, 6))  # stray digits: numbers in the text
            records.append((len(ids), key, run))
            ids += [*key, *run, end]
        ids += [*rng.choices(fillers, k=rng.randint(0, 40)), start]
        # Ask for a record that stays inside the last ``width`` tokens once the answer is added.
        rng.shuffle(records)
        _, key, run = next(r for r in records if r[0] >= len(ids) + len(r[1]) + len(r[2]) - width)
        ids += key
        lab = [-100] * len(ids) + run
        ids += run
        ids, lab = ids[-width:], lab[-width:]
        pad = width - len(ids)
        inputs.append(ids + [end] * pad)
        labels.append(lab + [-100] * pad)
    return inputs, labels


#: The verdict fields of an aircraft_inspection answer as ``(field, passing, failing)``. SOP step 6:
#: ``aircraft_ready`` is true exactly when all three hold their passing value.
VERDICTS = (
    ("mechanical_inspection_result", "pass", "fail"),
    ("electrical_inspection_result", "pass", "fail"),
    ("cross_check_reporting_response", "consistent", "inconsistent"),
)


def verdict_answer(rng: random.Random) -> tuple[str, list[tuple[int, int]]]:
    """One final assistant turn in the aircraft answer format whose ``aircraft_ready`` is the
    conjunction of its own verdicts, and the character spans of its random values.

    The verdicts, tail number and ids are drawn at random (about half the answers pass all three),
    so only the rest is predictable: the caller trains the field names, the punctuation and the
    ``aircraft_ready`` value, never the random spans (training them would teach that verdicts are
    coin flips). The text is the turn as the chat template writes it (header to ``<|im_end|>``).

    Why: the SFT'd model answered "pass, pass, consistent" with ``aircraft_ready: false`` in 93 of
    94 greedy test answers. Its ready value ignored the verdicts written just before it
    (teacher-forced on reference trajectories, with correct verdicts given: right 58 % of the
    time, the share of "false" in the data). The demonstrations hold one such decision per
    900-token-plus trajectory; 150 steps of them, ready token weighted 5x, left its loss at
    ln 2. Dense sequences of these answers form the "any verdict failed" head after ~200 steps
    (the loss drops suddenly after a plateau, like the induction head).
    """
    failed = {f: False for f, _, _ in VERDICTS}
    if rng.random() >= 0.35:
        failed = {f: rng.random() < 0.4 for f in failed}
    mechanical = failed["mechanical_inspection_result"]
    values = {
        "tail_number": f"N{_digits(rng, 3)}{rng.choice(LETTERS)}{rng.choice(LETTERS)}",
        **{f: bad if failed[f] else good for f, good, bad in VERDICTS[:2]},
        "component_incident_response": f"INC-{_digits(rng, 5)}"
        if mechanical and rng.random() < 0.5
        else "none",
        "component_mismatch_response": f"DR-{_digits(rng, 5)}"
        if mechanical and rng.random() < 0.3
        else "none",
        VERDICTS[2][0]: VERDICTS[2][2] if failed[VERDICTS[2][0]] else VERDICTS[2][1],
    }
    answer = {**values, "aircraft_ready": not any(failed.values())}
    text = f"{ASSISTANT_HEADER}{FINAL_OPEN}{json.dumps(answer)}{FINAL_CLOSE}{IM_END}\n"
    spans = []
    for field in values:
        start = text.index(f'"{field}": ') + len(f'"{field}": ')
        spans.append((start, text.index('"', start + 1) + 1))
    return text, spans


def curriculum(n: int, seed: int = 0) -> Iterator[CopyExample]:
    """``n`` examples cycling through :data:`CYCLE`, deterministic given ``seed``."""
    rng = random.Random(seed)
    for i in range(n):
        yield GENERATORS[CYCLE[i % len(CYCLE)]](rng)


__all__ = [
    "KINDS",
    "VERDICTS",
    "CopyExample",
    "CurriculumKind",
    "copy_id_example",
    "curriculum",
    "induction_sequences",
    "keyed_runs",
    "lookup_example",
    "random_id",
    "repeat_example",
    "verdict_answer",
]
