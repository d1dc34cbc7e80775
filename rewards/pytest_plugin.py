"""Pytest plugin for reward audits (the ``pytest11`` entry point ``mtrl_reward_audit``).

Adds the ``--audit-*`` options and the fixtures the built-in audit set (``rewards.audits``) and
user-written audits use: ``task``, ``reference_episodes``, ``rollouts``, ``reward_fn``,
``strict_scorer`` and ``audit_options``::

    pytest -p no:cacheprovider --pyargs rewards.audits --audit-task aircraft_inspection \\
        --audit-reward mypkg.rewards:my_reward --audit-rollouts baseline.jsonl

It is loaded into every pytest run of an environment where mtrl-local is installed, so it does
nothing until a collected test asks for one of its fixtures: then (after collection, before any
test runs) the options are checked, and a bad one stops the run with one ``ERROR: …`` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import pytest

from mtrl_local.errors import UserError
from mtrl_local.plugins import load_reward, load_task
from mtrl_local.rollout_files import read_rollout_file
from mtrl_local.scoring import RewardFn, Scorer, strict_score

if TYPE_CHECKING:
    # For annotations only: the plugin loads into every pytest run of the environment, and the
    # suite is imported only when a test asks for an audit fixture (through load_task).
    from sopbench.base import ExpertEpisode, Task

#: The fixtures that make a test an audit (and trigger option checks).
AUDIT_FIXTURES = frozenset(
    {"task", "reference_episodes", "rollouts", "reward_fn", "strict_scorer", "audit_options"}
)
_ROWS_KEY = pytest.StashKey[list[dict[str, Any]]]()


@dataclass(frozen=True)
class AuditOptions:
    """The ``--audit-*`` options as given."""

    task: str
    reward: str
    rollouts: str | None
    bound: float
    threshold: float
    cases: int

    @property
    def rollouts_label(self) -> str:
        return self.rollouts or f"noisy-expert rollouts of {self.task} val (generated)"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mtrl-reward-audit", "reward audit (mtrl-local)")
    group.addoption(
        "--audit-task", default="aircraft_inspection", help="task to audit the reward on"
    )
    group.addoption(
        "--audit-reward",
        default="rewards.dense:dense_reward",
        metavar="MODULE:FUNCTION",
        help="reward function under audit (default: rewards.dense:dense_reward)",
    )
    group.addoption(
        "--audit-rollouts",
        default=None,
        metavar="FILE",
        help="rollouts JSONL to score (default: noisy-expert rollouts of the task's val split)",
    )
    group.addoption(
        "--audit-bound",
        type=float,
        default=0.02,
        help="max share of rollouts rewarded as a success where strict is 0 (default 0.02)",
    )
    group.addoption(
        "--audit-threshold",
        type=float,
        default=1.0,
        help="reward at or above which an episode counts as a success (default 1.0)",
    )
    group.addoption(
        "--audit-cases",
        type=int,
        default=40,
        help="reference cases for the variant-based checks (default 40)",
    )


def _options(config: pytest.Config) -> AuditOptions:
    return AuditOptions(
        task=config.getoption("--audit-task"),
        reward=config.getoption("--audit-reward"),
        rollouts=config.getoption("--audit-rollouts"),
        bound=config.getoption("--audit-bound"),
        threshold=config.getoption("--audit-threshold"),
        cases=config.getoption("--audit-cases"),
    )


def _check_options(config: pytest.Config) -> None:
    """Fail fast with one line on a bad option; reads the rollouts file once and keeps it."""
    opts = _options(config)
    if opts.cases < 1:
        raise pytest.UsageError(f"--audit-cases must be >= 1, got {opts.cases}")
    if not 0.0 <= opts.bound <= 1.0:
        raise pytest.UsageError(f"--audit-bound must be in [0, 1], got {opts.bound}")
    try:
        load_task(opts.task)
        load_reward(opts.reward)
        if opts.rollouts is not None:
            config.stash[_ROWS_KEY] = read_rollout_file(opts.rollouts)
    except UserError as exc:
        raise pytest.UsageError(str(exc)) from None


def _uses_audit_fixtures(item: pytest.Item) -> bool:
    """Whether ``item`` requests one of *our* fixtures (a suite may define its own ``task``)."""
    info = getattr(item, "_fixtureinfo", None)
    name2defs = getattr(info, "name2fixturedefs", {})
    for name in AUDIT_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        defs = name2defs.get(name)
        if defs and getattr(defs[-1].func, "__module__", None) == __name__:
            return True
    return False


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    if any(_uses_audit_fixtures(item) for item in items):
        _check_options(config)


@pytest.fixture(scope="session")
def audit_options(pytestconfig: pytest.Config) -> AuditOptions:
    """The ``--audit-*`` options."""
    return _options(pytestconfig)


@pytest.fixture(scope="session")
def task(audit_options: AuditOptions) -> Task:
    """The task under ``--audit-task`` (a suite task: the audits run its expert)."""
    return cast("Task", load_task(audit_options.task))


@pytest.fixture(scope="session")
def reference_episodes(task: Task, audit_options: AuditOptions) -> list[ExpertEpisode]:
    """The reference policy on the first ``--audit-cases`` cases of the val split."""
    cases = task.cases("val")[: audit_options.cases]
    return [task.run_expert(c) for c in cases]


@pytest.fixture(scope="session")
def rollouts(
    pytestconfig: pytest.Config, task: Task, audit_options: AuditOptions
) -> list[dict[str, Any]]:
    """Rollout records from ``--audit-rollouts``, or the noisy expert on the task's val split.

    Each record has ``_line``: its line in the file (generated ones: their position, from 1).
    """
    if audit_options.rollouts is not None:
        rows = pytestconfig.stash.get(_ROWS_KEY, None)
        if rows is None:
            rows = read_rollout_file(audit_options.rollouts)
        return rows
    return [{**ep.to_rollout(), "_line": i} for i, ep in enumerate(task.noisy_episodes("val"), 1)]


@pytest.fixture(scope="session")
def reward_fn(audit_options: AuditOptions) -> RewardFn:
    """The reward function under ``--audit-reward``."""
    return load_reward(audit_options.reward)


@pytest.fixture(scope="session")
def strict_scorer() -> Scorer:
    """The strict scorer (the evaluation), :func:`mtrl_local.scoring.strict_score`."""
    return strict_score
