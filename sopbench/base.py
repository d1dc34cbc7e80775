"""What every SOP task is made of, and the machinery they share.

A task subclasses :class:`Task` and provides: the SOP text, the output fields, a seeded case
generator (:meth:`Task.generate`), an environment factory (:meth:`Task.make_env`) and an
**expert program** (:meth:`Task.expert`). The base class gives it stable splits, the noisy
expert (the same program slipping at a seeded rate), JSONL import/export of cases and
:meth:`Task.validate`. A task is what :class:`mtrl_local.task.Task` asks for, plus these.

An expert program is a generator: it yields :class:`Call` or :class:`Answer` actions and receives
the text of the first tool result of each call (``None`` if a step was skipped). It decides from
what the tools returned, never from the ground truth — so a reference TSR of 1.0 (the expert
without noise) proves that the tools, the SOP's rules and the ground truth agree.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from mtrl_local.env import Environment, Episode, render_final_response, render_tool_call
from mtrl_local.env.patterns import stable_seed
from mtrl_local.errors import UserError
from mtrl_local.jsonl import read_jsonl, write_jsonl
from mtrl_local.scoring import strict_score

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
SPLIT_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


@dataclass(frozen=True)
class Case:
    """One task instance: inputs for the environment and the ground-truth output fields."""

    task: str
    case_id: str
    split: Split
    inputs: dict[str, Any]
    ground_truth: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Call:
    """An expert action: call ``name`` with ``arguments``."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Answer:
    """An expert action: the final answer (output fields)."""

    fields: dict[str, Any]


Action = Call | Answer
ExpertProgram = Generator[Action, "str | None", None]

#: Error kinds of the noisy expert: skipped step, misread value, wrong tag, early answer.
NOISE_KINDS = ("skip_step", "misread", "wrong_tag", "early_answer")
WRONG_TAGS = ("final_answer", "answer", "final")


class Noise:
    """Seeded error injection for the noisy expert; ``rate=0`` is the reference (no slips).

    An expert program asks ``noise.happens("skip_step")`` at each decision point where it could
    slip; each kind fires with probability ``rate``. What fired is kept in :attr:`events`.
    """

    def __init__(self, rate: float = 0.0, seed: int = 0) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError("noise rate must be in [0, 1]")
        self.rate = rate
        self.rng = random.Random(seed)
        self.events: list[str] = []

    def happens(self, kind: str, scale: float = 1.0) -> bool:
        """Whether the expert slips here (probability ``rate × scale``; records the event)."""
        if self.rate <= 0.0:
            return False
        if self.rng.random() < self.rate * scale:
            self.events.append(kind)
            return True
        return False

    def misread(self, value: Any) -> Any:
        """``value``, or with probability ``rate`` a plausible misreading of it."""
        if not self.happens("misread"):
            return value
        if isinstance(value, bool):
            return not value
        if isinstance(value, int):
            return value + self.rng.choice([-2, -1, 1, 2])
        if isinstance(value, float):
            return round(value * self.rng.choice([0.9, 0.95, 1.05, 1.1]), 1)
        if isinstance(value, str) and value:
            chars = list(value)
            i = self.rng.randrange(len(chars))
            chars[i] = self.rng.choice("0123456789") if chars[i].isdigit() else chars[i].swapcase()
            return "".join(chars)
        return value


def parse_json(text: str | None) -> Any:
    """A tool result as JSON, or ``None`` (skipped step, error string, not JSON)."""
    if text is None or text.startswith("error: "):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


@dataclass
class ExpertEpisode:
    """A finished scripted episode: the messages, counters, strict score and injected errors."""

    case: Case
    messages: list[dict[str, Any]]
    turns: int
    tool_calls: int
    tool_errors: int
    done_reason: str | None
    strict: float
    noise_events: list[str] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)

    def to_rollout(self) -> dict[str, Any]:
        """One line of a rollout file (see ``mtrl_local.rollout_files``)."""
        return {
            "task": self.case.task,
            "case_id": self.case.case_id,
            "split": self.case.split,
            "messages": self.messages,
            "ground_truth": self.case.ground_truth,
            "turns": self.turns,
            "tool_calls": self.tool_calls,
            "tool_errors": self.tool_errors,
            "done_reason": self.done_reason,
            "strict": self.strict,
            "source": "noisy_expert" if self.noise_events else "reference",
            "noise_events": self.noise_events,
            # The schemas the prompt offered: the line is also a demonstration for `mtrl sft`.
            "tools": self.tools,
        }


class Task:
    """Base class of an SOP task. Subclasses set the class attributes and the four hooks."""

    name: ClassVar[str]
    title: ClassVar[str]
    sop: ClassVar[str]
    output_fields: ClassVar[tuple[str, ...]]
    #: The output field that says how a case came out (a decision such as ``aircraft_ready``);
    #: evaluations report TSR per value of it, so that a model which learned to give the most
    #: common outcome is told apart from one that reads the case. ``None``: no such field.
    outcome_field: ClassVar[str | None] = None
    #: Turns of the longest reference walkthrough; ``max_turns = ceil(1.5 × reference_turns)``.
    reference_turns: ClassVar[int]
    n_cases: ClassVar[int] = 500
    #: Error rate of the noisy expert used for demonstrations and audit fixtures.
    default_noise_rate: ClassVar[float] = 0.08

    def __init__(self) -> None:
        self._cases: list[Case] | None = None

    # -- hooks -------------------------------------------------------------------------------
    def generate(
        self, index: int, rng: random.Random
    ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """Case ``index``: ``(case_id, inputs, ground_truth)`` drawn from ``rng`` only."""
        raise NotImplementedError

    def make_env(self) -> Environment:
        """A fresh environment for one episode."""
        raise NotImplementedError

    def expert(self, case: Case, noise: Noise) -> ExpertProgram:
        """The scripted expert; consult ``noise`` where it could slip."""
        raise NotImplementedError

    def check_inputs(self, inputs: dict[str, Any]) -> str | None:
        """Why ``inputs`` (from a cases file) are unusable, or ``None`` (override to check more)."""
        return None

    # -- derived -------------------------------------------------------------------------------
    @property
    def max_turns(self) -> int:
        """``ceil(1.5 × reference turns)`` (docs/design.md, "Budgets")."""
        return math.ceil(1.5 * self.reference_turns)

    def cases(self, split: str | None = None) -> list[Case]:
        """All cases (or one split's), generated once; identical on every run and machine."""
        if self._cases is None:
            self._cases = self._generate_all()
        if split is None:
            return list(self._cases)
        if split not in SPLITS:
            raise UserError(f"unknown split '{split}' (expected one of: {', '.join(SPLITS)})")
        return [c for c in self._cases if c.split == split]

    def case(self, case_id: str) -> Case:
        for c in self.cases():
            if c.case_id == case_id:
                return c
        raise UserError(f"task {self.name}: no case '{case_id}'")

    def _generate_all(self) -> list[Case]:
        # Split by hash order, not by index: a split is not a contiguous block of the generator.
        order = sorted(range(self.n_cases), key=lambda i: stable_seed(self.name, "split", i))
        n_train = round(self.n_cases * SPLIT_FRACTIONS["train"])
        n_val = round(self.n_cases * SPLIT_FRACTIONS["val"])
        split_of: dict[int, Split] = {}
        for rank, i in enumerate(order):
            split_of[i] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
        cases = []
        for i in range(self.n_cases):
            case_id, inputs, truth = self.generate(i, random.Random(stable_seed(self.name, i)))
            cases.append(Case(self.name, case_id, split_of[i], inputs, truth))
        return cases

    # -- running the expert ------------------------------------------------------------------------
    def run_expert(
        self, case: Case, seed: int = 0, noise_rate: float = 0.0, noise_seed: int | None = None
    ) -> ExpertEpisode:
        """Run the expert on ``case``: the reference (``noise_rate=0``) or the noisy expert."""
        nseed = seed if noise_seed is None else noise_seed
        noise = Noise(noise_rate, stable_seed(case.case_id, "noise", nseed))
        env = self.make_env()
        episode = Episode(env, case, seed=seed, max_turns=self.max_turns)
        with episode:
            episode.reset()
            tools = env.tool_schemas()
            program = self.expert(case, noise)
            result: str | None = None
            while not episode.done:
                try:
                    action = program.send(result)  # send(None) starts the generator
                except StopIteration:
                    break
                if isinstance(action, Call) and noise.happens("early_answer", scale=0.25):
                    # The expert stops here and answers with what it believes so far.
                    program.close()
                    action = Answer(self.guess_answer(case))
                text = self._render(action, noise)
                step = episode.step(text)
                result = step.messages[0]["content"] if step.messages else None
            if not episode.done:
                episode.abort("no_action")
        return ExpertEpisode(
            case=case,
            messages=episode.messages,
            turns=episode.stats.turns,
            tool_calls=episode.stats.tool_calls,
            tool_errors=episode.stats.tool_errors,
            done_reason=episode.stats.done_reason,
            strict=strict_score(episode.messages, case.ground_truth),
            noise_events=list(noise.events),
            tools=tools,
        )

    def guess_answer(self, case: Case) -> dict[str, Any]:
        """What an expert who stopped early would answer: the most common value of each field."""
        return dict(self._majority_answer())

    def _majority_answer(self) -> dict[str, Any]:
        counts: dict[str, dict[str, tuple[int, Any]]] = {}
        for c in self.cases("train"):
            for k, v in c.ground_truth.items():
                key = json.dumps(v)
                n, _ = counts.setdefault(k, {}).get(key, (0, v))
                counts[k][key] = (n + 1, v)
        return {k: max(vals.values(), key=lambda t: t[0])[1] for k, vals in counts.items()}

    @staticmethod
    def _render(action: Action, noise: Noise) -> str:
        if isinstance(action, Call):
            return render_tool_call(action.name, action.arguments)
        text = render_final_response(action.fields)
        if noise.happens("wrong_tag"):
            tag = noise.rng.choice(WRONG_TAGS)
            text = text.replace("final_response>", f"{tag}>")
        return text

    def reference_episodes(self, split: str | None = None, seed: int = 0) -> list[ExpertEpisode]:
        """The expert without noise on every case of ``split``."""
        return [self.run_expert(c, seed=seed) for c in self.cases(split)]

    def noisy_episodes(
        self, split: str = "train", rate: float | None = None, seed: int = 0
    ) -> list[ExpertEpisode]:
        """The noisy expert on every case of ``split`` (demonstrations, audit fixtures)."""
        r = self.default_noise_rate if rate is None else rate
        return [self.run_expert(c, seed=seed, noise_rate=r) for c in self.cases(split)]

    # -- checks -----------------------------------------------------------------------------------
    def validate(self) -> ValidationReport:
        """Split sizes and disjointness, output fields, reference TSR and turn budget."""
        problems: list[str] = []
        cases = self.cases()
        ids = [c.case_id for c in cases]
        if len(set(ids)) != len(ids):
            problems.append("case ids are not unique")
        sizes = {s: sum(c.split == s for c in cases) for s in SPLITS}
        for c in cases:
            if set(c.ground_truth) != set(self.output_fields):
                problems.append(f"case {c.case_id}: ground truth fields differ from output_fields")
                break
        episodes = [self.run_expert(c) for c in cases]
        tsr = sum(e.strict for e in episodes) / len(episodes)
        failed = [e.case.case_id for e in episodes if e.strict < 1.0]
        if failed:
            problems.append(f"reference fails on {len(failed)} cases, e.g. {failed[:3]}")
        longest = max(e.turns for e in episodes)
        if longest != self.reference_turns:
            problems.append(
                f"longest reference walkthrough is {longest} turns, reference_turns says "
                f"{self.reference_turns}"
            )
        if any(e.tool_errors for e in episodes):
            problems.append("the expert made tool errors")
        return ValidationReport(self.name, sizes, tsr, longest, self.max_turns, problems)

    # -- cases files ------------------------------------------------------------------------------
    def export_cases(self, path: str | Path, split: str | None = None) -> int:
        """Write cases as JSONL (one per line); returns how many."""
        return write_jsonl(path, (c.to_json() for c in self.cases(split)))

    def load_cases(self, path: str | Path) -> list[Case]:
        """Read a cases JSONL file; any problem is a :class:`UserError` naming file, line, field."""
        out: list[Case] = []
        for lineno, obj in read_jsonl(path):
            where = f"{path}:{lineno}"
            for key, kind in (
                ("case_id", str),
                ("split", str),
                ("inputs", dict),
                ("ground_truth", dict),
            ):
                if key not in obj:
                    raise UserError(f"{where}: field '{key}' is missing")
                if not isinstance(obj[key], kind):
                    raise UserError(f"{where}: field '{key}' must be {_KIND_NAMES[kind]}")
            if obj["split"] not in SPLITS:
                raise UserError(f"{where}: field 'split' must be one of {', '.join(SPLITS)}")
            if obj.get("task", self.name) != self.name:
                raise UserError(f"{where}: field 'task' is '{obj['task']}', expected '{self.name}'")
            missing = [k for k in self.output_fields if k not in obj["ground_truth"]]
            if missing:
                raise UserError(f"{where}: field 'ground_truth' is missing '{missing[0]}'")
            why = self.check_inputs(obj["inputs"])
            if why:
                raise UserError(f"{where}: field 'inputs': {why}")
            out.append(
                Case(self.name, obj["case_id"], obj["split"], obj["inputs"], obj["ground_truth"])
            )
        if not out:
            raise UserError(f"{path}: no cases in file")
        return out


_KIND_NAMES = {str: "a string", dict: "an object", list: "a list", int: "an integer"}


@dataclass
class ValidationReport:
    """Result of :meth:`Task.validate`."""

    task: str
    split_sizes: dict[Split, int]
    reference_tsr: float
    reference_turns: int
    max_turns: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems and self.reference_tsr == 1.0
