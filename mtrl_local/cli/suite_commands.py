"""``mtrl tasks``, ``validate``, ``export`` and ``audit``: commands over tasks, no model loaded.

They resolve task and reward names through :mod:`mtrl_local.plugins` and call the task's own
suite methods (:class:`mtrl_local.task.SuiteTask`): listing, validation (splits, reference TSR,
turn budget), exporting cases or expert episodes, and running the reward audits with pytest.
"""

from __future__ import annotations

import argparse
import logging
from typing import cast

import pytest
from rich.console import Console
from rich.table import Table

from mtrl_local.errors import UserError
from mtrl_local.plugins import load_reward, load_task, task_names
from mtrl_local.rollout_files import read_rollout_file, write_rollout_file
from mtrl_local.task import SuiteTask

logger = logging.getLogger("mtrl")

SPLITS = ("train", "val", "test")


def suite_task(name: str) -> SuiteTask:
    """The task ``name``, as a suite task (its expert, validation and cases files)."""
    task = load_task(name)
    missing = [
        m for m in ("validate", "run_expert", "export_cases", "load_cases") if not hasattr(task, m)
    ]
    if missing:
        raise UserError(
            f"task '{name}' is not a suite task (no {', '.join(missing)}): this command needs "
            "one (see mtrl_local.task.SuiteTask)"
        )
    return cast(SuiteTask, task)


def run_tasks(args: argparse.Namespace, console: Console) -> int:
    table = Table(title="mtrl-local tasks")
    table.add_column("task", no_wrap=True)
    for col in ("title", "cases", "max turns"):
        table.add_column(col)
    table.add_column("output fields", overflow="fold")
    for name in task_names():
        task = load_task(name)
        fields = ", ".join(task.output_fields)
        title = str(getattr(task, "title", ""))
        table.add_row(name, title, str(len(task.cases())), str(task.max_turns), fields)
    console.print(table)
    return 0


def _validate_cases_file(
    task: SuiteTask, path: str
) -> tuple[dict[str, int], float, int, list[str]]:
    cases = task.load_cases(path)
    episodes = [task.run_expert(c) for c in cases]
    sizes = {s: sum(c.split == s for c in cases) for s in SPLITS}
    tsr = sum(e.strict for e in episodes) / len(episodes)
    longest = max(e.turns for e in episodes)
    problems = [] if tsr == 1.0 else [f"reference TSR {tsr:.3f} on {path}"]
    return sizes, tsr, longest, problems


def run_validate(args: argparse.Namespace, console: Console) -> int:
    if args.all:
        names = task_names()
    elif args.task:
        names = [args.task]
    else:
        raise UserError("validate: name a task or pass --all")
    if args.cases and len(names) != 1:
        raise UserError("validate: --cases needs exactly one task")
    table = Table(title="task validation (reference policy, strict scorer)")
    table.add_column("task", no_wrap=True)
    for col in ("train", "val", "test", "ref TSR", "ref turns", "max turns"):
        table.add_column(col, justify="right")
    table.add_column("ok")
    all_ok = True
    for name in names:
        task = suite_task(name)
        if args.cases:
            sizes, tsr, longest, problems = _validate_cases_file(task, args.cases)
        else:
            report = task.validate()
            sizes = {str(k): v for k, v in report.split_sizes.items()}
            tsr, longest, problems = report.reference_tsr, report.reference_turns, report.problems
        ok = not problems and tsr == 1.0
        all_ok &= ok
        cells = [str(sizes[s]) for s in SPLITS]
        cells += [f"{tsr:.3f}", str(longest), str(task.max_turns), "yes" if ok else "NO"]
        table.add_row(name, *cells)
        for problem in problems:
            logger.error("%s: %s", name, problem)
    console.print(table)
    return 0 if all_ok else 1


def run_export(args: argparse.Namespace, console: Console) -> int:
    task = suite_task(args.task)
    if args.what == "cases":
        n = task.export_cases(args.out, args.split)
    else:
        rate = 0.0 if args.what == "reference" else args.noise_rate
        episodes = [
            task.run_expert(c, seed=args.seed, noise_rate=rate) for c in task.cases(args.split)
        ]
        n = write_rollout_file(args.out, [e.to_rollout() for e in episodes])
    console.print(f"wrote {n} {args.what} records to {args.out}")
    return 0


def run_audit(args: argparse.Namespace, console: Console) -> int:
    # Check the inputs here so a mistake is one line, before pytest starts.
    load_task(args.task)
    load_reward(args.reward)
    if args.rollouts:
        read_rollout_file(args.rollouts)
    pytest_args = [
        "--pyargs",
        "rewards.audits",
        "-p",
        "no:cacheprovider",
        "-q",
        # The CLI imported these packages to check its inputs; pytest cannot rewrite them now.
        "-W",
        "ignore::pytest.PytestAssertRewriteWarning",
        f"--audit-task={args.task}",
        f"--audit-reward={args.reward}",
        f"--audit-bound={args.bound}",
    ]
    if args.rollouts:
        pytest_args.append(f"--audit-rollouts={args.rollouts}")
    return int(pytest.main(pytest_args + list(args.pytest_args)))


COMMANDS = {"tasks": run_tasks, "validate": run_validate, "export": run_export, "audit": run_audit}
