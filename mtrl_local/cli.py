"""The ``mtrl`` command line.

``mtrl tasks`` lists the suite, ``mtrl validate`` checks tasks (splits, reference TSR, turn budget),
``mtrl audit`` runs the pytest-driven reward audits, ``mtrl export`` writes cases or scripted
rollouts as JSONL, ``mtrl eval`` evaluates a model (beside its base) with the strict scorer and
``mtrl baseline`` puts the base model through that evaluation. A user mistake (unknown task,
malformed file, missing model) prints one line naming the file and field and exits with code 2 —
never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from mtrl_local.errors import UserError

if TYPE_CHECKING:
    from mtrl_local.evaluate import EvalConfig, EvalReport

logger = logging.getLogger("mtrl")


def _cmd_tasks(args: argparse.Namespace, console: Console) -> int:
    from sopbench import get_task, task_names

    table = Table(title="mtrl-local task suite")
    table.add_column("task", no_wrap=True)
    for col in ("title", "cases", "max turns"):
        table.add_column(col)
    table.add_column("output fields", overflow="fold")
    for name in task_names():
        task = get_task(name)
        table.add_row(
            name, task.title, str(task.n_cases), str(task.max_turns), ", ".join(task.output_fields)
        )
    console.print(table)
    return 0


def _cmd_validate(args: argparse.Namespace, console: Console) -> int:
    from sopbench import get_task, task_names
    from sopbench.base import SPLITS

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
        task = get_task(name)
        if args.cases:
            cases = task.load_cases(args.cases)
            episodes = [task.run_policy(c) for c in cases]
            sizes: dict[str, int] = {s: sum(c.split == s for c in cases) for s in SPLITS}
            tsr = sum(e.strict for e in episodes) / len(episodes)
            longest = max(e.turns for e in episodes)
            problems = [] if tsr == 1.0 else [f"reference TSR {tsr:.3f} on {args.cases}"]
        else:
            report = task.validate()
            sizes = {str(k): v for k, v in report.split_sizes.items()}
            tsr, longest = report.reference_tsr, report.reference_turns
            problems = report.problems
        ok = not problems and tsr == 1.0
        all_ok &= ok
        table.add_row(
            name,
            str(sizes["train"]),
            str(sizes["val"]),
            str(sizes["test"]),
            f"{tsr:.3f}",
            str(longest),
            str(task.max_turns),
            "yes" if ok else "NO",
        )
        for problem in problems:
            logger.error("%s: %s", name, problem)
    console.print(table)
    return 0 if all_ok else 1


def _cmd_export(args: argparse.Namespace, console: Console) -> int:
    from mtrl_local.rollouts import write_rollouts
    from sopbench import get_task

    task = get_task(args.task)
    if args.what == "cases":
        n = task.export_cases(args.out, args.split)
    else:
        rate = 0.0 if args.what == "reference" else args.noise_rate
        episodes = [
            task.run_policy(c, seed=args.seed, noise_rate=rate) for c in task.cases(args.split)
        ]
        n = write_rollouts(args.out, [e.to_rollout() for e in episodes])
    console.print(f"wrote {n} {args.what} records to {args.out}")
    return 0


def _cmd_audit(args: argparse.Namespace, console: Console) -> int:
    import pytest

    from mtrl_local.rollouts import read_rollouts
    from rewards.loading import load_reward
    from sopbench import get_task

    # Check the inputs here so a mistake is one line, before pytest starts.
    get_task(args.task)
    load_reward(args.reward)
    if args.rollouts:
        read_rollouts(args.rollouts)
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


def _eval_config(args: argparse.Namespace, **overrides: object) -> EvalConfig:
    """The :class:`EvalConfig` of ``mtrl eval`` / ``mtrl baseline`` arguments."""
    from mtrl_local.evaluate import EvalConfig

    values: dict[str, object] = {
        "task": args.task,
        "split": args.split,
        "n_samples": args.n,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "sampling_max_tokens": args.max_tokens,
        "max_turns": args.max_turns,
        "seed": args.seed,
        "reward": args.reward,
        "max_batch": args.max_batch,
        "max_cases": args.max_cases,
        "device": args.device,
    }
    values.update(overrides)
    return EvalConfig(**values)  # type: ignore[arg-type]


def _check_eval_inputs(args: argparse.Namespace, *models: str | None) -> None:
    """Fail in one line on a bad task, model path or reward, before any model is loaded."""
    from mtrl_local.evaluate import check_model_path
    from rewards.loading import load_reward
    from sopbench import get_task

    for model in models:
        if model is not None:
            check_model_path(model)
    get_task(args.task)
    load_reward(args.reward)


def _print_outputs(console: Console, reports: Sequence[EvalReport], out: Path) -> None:
    from mtrl_local.evaluate import REPORT_FILE

    for report in reports:
        for result in report.results:
            if result.rollouts:
                console.print(f"rollouts ({result.label}): {result.rollouts}")
    for path in sorted(out.rglob(REPORT_FILE)):
        console.print(f"report: {path}")


def _cmd_eval(args: argparse.Namespace, console: Console) -> int:
    from mtrl_local.evaluate import default_out_dir, evaluate, format_table

    _check_eval_inputs(args, args.model, args.base_model)
    config = _eval_config(args, base_model=args.base_model)
    out = Path(args.out) if args.out else default_out_dir(args.task)
    report = evaluate(args.model, config, out_dir=out, progress=True)
    console.print(format_table(report))
    _print_outputs(console, [report], out)
    return 0


def _cmd_baseline(args: argparse.Namespace, console: Console) -> int:
    from mtrl_local.evaluate import default_out_dir, evaluate, format_table, load_policy

    _check_eval_inputs(args, args.model)
    out = Path(args.out) if args.out else default_out_dir(args.task)
    greedy = _eval_config(args, n_samples=1, temperature=0.0)
    sampled = _eval_config(args, temperature=args.sample_temperature) if args.n > 1 else None
    policy = load_policy(args.model, greedy)  # loaded once for both passes
    reports = [evaluate(policy, greedy, out_dir=out, label="base greedy", progress=True)]
    if sampled is not None:
        label = f"base T={args.sample_temperature:g} n={args.n}"
        reports.append(
            evaluate(policy, sampled, out_dir=out / "sampled", label=label, progress=True)
        )
    console.print(format_table(reports, title=f"baseline: {args.task} ({args.split} split)"))
    _print_outputs(console, reports, out)
    best = max(
        max(r.summary["tsr"], r.summary["pass_at_1"]) for rep in reports for r in rep.results
    )
    best_n = max(r.summary.get(f"pass_at_{args.n}", 0.0) for rep in reports for r in rep.results)
    if best == 0.0 and best_n == 0.0:
        console.print(
            "[bold yellow]the base model scores zero: simplify the task or teach the format "
            "first; RL amplifies what the model can already do (DESIGN.md §1.4)[/]"
        )
    console.print(
        f"next: validate the reward on these outputs: mtrl audit --task {args.task} "
        f"--rollouts {out / 'rollouts.jsonl'}"
    )
    return 0


def _cmd_train(args: argparse.Namespace, console: Console) -> int:
    import json

    from mtrl_local.config import load_config, parse_overrides
    from mtrl_local.evaluate import EvalReport, format_table
    from mtrl_local.train.pipeline import run_pipeline

    overrides = parse_overrides(args.overrides)
    for key in ("task", "model", "max_steps", "run_name", "output_dir"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    run_dir = None
    recipe = args.recipe
    if args.resume:
        run_dir = Path(args.resume)
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise UserError(f"{args.resume}: not a run directory (no config.json)")
        # The run's own config, then whatever the command line changes (e.g. more max_steps).
        base = json.loads(saved.read_text())
        base.update(overrides)
        overrides, recipe = base, None
    cfg = load_config(recipe, overrides)
    if args.agent_cmd:
        # Bring-your-own agent: episodes come from the agent through the rollout server.
        from mtrl_local.server.train import run_agent_pipeline

        report = run_agent_pipeline(
            cfg,
            args.agent_cmd,
            run_dir=run_dir,
            resume=bool(args.resume),
            workers=args.agent_workers,
            idle_timeout_s=args.agent_timeout,
        )
        console.print(f"run directory: {report['run_dir']}")
        console.print(f"final model:   {report['final_model']}")
        return 0
    report = run_pipeline(
        cfg,
        run_dir=run_dir,
        resume=bool(args.resume),
        baseline=not args.no_baseline,
        final_eval=not args.no_final_eval,
    )
    if not report:  # not process 0 under accelerate launch: it reports
        return 0
    eval_file = Path(report["run_dir"]) / "eval_test.json"
    if eval_file.is_file():
        console.print(format_table(EvalReport.load(eval_file), title=f"{cfg.task}: test split"))
    console.print(f"run directory: {report['run_dir']}")
    console.print(f"final model:   {report['final_model']}")
    return 0


def _cmd_dash(args: argparse.Namespace, console: Console) -> int:
    from tui.data import resolve_run_dir

    # Checked here so a missing run or another schema version is one line, before the app starts.
    run_dir = resolve_run_dir(args.run, root=args.runs)
    from tui.app import Dashboard

    Dashboard(run_dir, poll_s=args.interval).run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the docs and tests)."""
    parser = argparse.ArgumentParser(prog="mtrl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("tasks", help="list the bundled tasks")

    p = sub.add_parser("validate", help="check a task: splits, reference TSR, turn budget")
    p.add_argument("task", nargs="?", help="task name")
    p.add_argument("--all", action="store_true", help="every registered task")
    p.add_argument("--cases", help="validate a cases JSONL file instead of the generated cases")

    p = sub.add_parser("export", help="write cases or scripted rollouts as JSONL")
    p.add_argument("what", choices=("cases", "reference", "noisy"))
    p.add_argument("task")
    p.add_argument("--split", choices=("train", "val", "test"), default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-rate", type=float, default=0.08)

    p = sub.add_parser("audit", help="run the pytest-driven reward audits")
    p.add_argument("--task", default="aircraft_inspection")
    p.add_argument("--reward", default="rewards.dense:dense_reward", help="module:function")
    p.add_argument("--rollouts", default=None, help="rollouts JSONL (default: noisy expert, val)")
    p.add_argument("--bound", type=float, default=0.02, help="max share of over-credited episodes")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")

    p = sub.add_parser("eval", help="evaluate a model on a split with the strict scorer")
    _add_eval_args(p, model_default=None)
    p.add_argument("--base-model", default=None, help="also evaluate this base (dir or 'default')")
    p.add_argument("--n", type=int, default=1, help="samples per case (pass@1 and pass@n)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")

    p = sub.add_parser(
        "baseline", help="the base model through the evaluation (greedy [+ sampled])"
    )
    _add_eval_args(p, model_default="default")
    p.add_argument("--n", type=int, default=1, help="> 1: a second, sampled pass with n per case")
    p.add_argument("--sample-temperature", type=float, default=1.0, help="of the sampled pass")
    p.set_defaults(temperature=0.0)

    p = sub.add_parser(
        "train",
        help="baseline on test → RL training → final test evaluation beside the base",
        description="Overrides are KEY=VALUE pairs of MultiTurnRLConfig fields "
        "(e.g. loss_type=cispo async_config.max_steps_off_policy=1); they win over the recipe.",
    )
    p.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    p.add_argument("--recipe", default=None, help="recipes/*.toml")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue this run directory")
    p.add_argument("--task", default=None)
    p.add_argument("--model", default=None, help="'default' or a local HF model directory")
    p.add_argument("--max-steps", dest="max_steps", default=None)
    p.add_argument("--run-name", dest="run_name", default=None)
    p.add_argument("--output-dir", dest="output_dir", default=None)
    p.add_argument("--no-baseline", action="store_true", help="skip the base model on test")
    p.add_argument("--no-final-eval", action="store_true", help="skip the final test evaluation")
    p.add_argument(
        "--agent-cmd",
        default=None,
        metavar="CMD",
        help="train your own agent: a command (e.g. 'python my_agent.py') or module:function, "
        "run once per episode against the rollout server (OPENAI_BASE_URL / OPENAI_API_KEY)",
    )
    p.add_argument(
        "--agent-workers", type=int, default=None, help="agents run at once (default: batch size)"
    )
    p.add_argument(
        "--agent-timeout",
        type=float,
        default=120.0,
        help="seconds an agent may stay silent before its episode fails",
    )

    p = sub.add_parser("dash", help="the terminal dashboard over a run store (live or finished)")
    p.add_argument("run", nargs="?", default=None, help="run directory (default: newest in --runs)")
    p.add_argument("--runs", default="runs", help="where to look for the newest run")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between reads")
    return parser


def _add_eval_args(p: argparse.ArgumentParser, model_default: str | None) -> None:
    """The options ``mtrl eval`` and ``mtrl baseline`` share."""
    p.add_argument("--task", required=True, help="task name (see mtrl tasks)")
    if model_default is None:
        p.add_argument("--model", required=True, help="model directory, or 'default'")
    else:
        p.add_argument("--model", default=model_default, help="model directory, or 'default'")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=512, help="per-turn token budget")
    p.add_argument("--max-turns", type=int, default=None, help="default: the task's")
    p.add_argument("--max-cases", type=int, default=None, help="only the first N cases")
    p.add_argument("--max-batch", type=int, default=64, help="episodes generated together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward", default="rewards.dense:dense_reward", help="module:function")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda…")
    p.add_argument("--out", default=None, help="output dir (default runs/eval-<task>-<time>)")


COMMANDS = {
    "train": _cmd_train,
    "tasks": _cmd_tasks,
    "validate": _cmd_validate,
    "export": _cmd_export,
    "audit": _cmd_audit,
    "eval": _cmd_eval,
    "baseline": _cmd_baseline,
    "dash": _cmd_dash,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mtrl``; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    console = Console()
    try:
        return COMMANDS[args.command](args, console)
    except UserError as exc:
        print(f"mtrl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mtrl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
