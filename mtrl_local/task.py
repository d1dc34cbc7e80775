"""What the library needs from a task, written as protocols.

The rollout engine, the trainer and the evaluation are handed a task object; they never look one
up by name (:mod:`mtrl_local.plugins` does that, for the CLI). A task is anything with these
members — the bundled suite's :class:`sopbench.base.Task` is one, and so is a user's own class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mtrl_local.env import Environment


class Case(Protocol):
    """One task instance: its id, its split and the answer the strict scorer expects."""

    @property
    def case_id(self) -> str: ...

    @property
    def split(self) -> str: ...

    @property
    def ground_truth(self) -> dict[str, Any]: ...


class Task(Protocol):
    """A task the engine can run, the trainer can train on and the evaluation can score."""

    @property
    def name(self) -> str: ...

    @property
    def output_fields(self) -> tuple[str, ...]:
        """The answer's fields, in the order evaluation tables list them."""
        ...

    @property
    def outcome_field(self) -> str | None:
        """The field that says how a case came out (evaluations report TSR per value of it)."""
        ...

    @property
    def max_turns(self) -> int:
        """The default turn limit of an episode."""
        ...

    def make_env(self) -> Environment:
        """A fresh environment for one episode."""
        ...

    def cases(self, split: str | None = None) -> list[Any]:
        """The task's cases (:class:`Case`), or one split's."""
        ...


class ExpertRun(Protocol):
    """A finished episode of a task's expert program."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]


@runtime_checkable
class ExpertTask(Task, Protocol):
    """A task with a scripted expert: lets the trainer measure real tool outputs before step 0."""

    def run_expert(
        self, case: Any, seed: int = 0, noise_rate: float = 0.0, noise_seed: int | None = None
    ) -> ExpertRun: ...


class SuiteEpisode(ExpertRun, Protocol):
    """An expert episode of a suite task, as ``mtrl validate`` and ``export`` read it."""

    strict: float
    turns: int

    def to_rollout(self) -> dict[str, Any]: ...


class SuiteTask(ExpertTask, Protocol):
    """A task of a suite: what ``mtrl tasks``, ``validate``, ``export`` and the audits use."""

    def run_expert(
        self, case: Any, seed: int = 0, noise_rate: float = 0.0, noise_seed: int | None = None
    ) -> SuiteEpisode: ...

    @property
    def title(self) -> str: ...

    @property
    def n_cases(self) -> int: ...

    def validate(self) -> Any: ...

    def export_cases(self, path: str | Path, split: str | None = None) -> int: ...

    def load_cases(self, path: str | Path) -> list[Any]: ...

    def reference_episodes(self, split: str | None = None, seed: int = 0) -> Sequence[Any]: ...

    def noisy_episodes(
        self, split: str = "train", rate: float | None = None, seed: int = 0
    ) -> Sequence[Any]: ...
