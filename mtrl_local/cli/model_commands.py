"""``mtrl eval``, ``baseline`` and ``train``: the commands that load a model.

Their names were checked and resolved before this module loaded (:mod:`mtrl_local.cli.inputs`);
here registered models are located and the library is handed the objects.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from mtrl_local.cli.inputs import EvalInputs, TrainInputs
from mtrl_local.cli.tables import format_table
from mtrl_local.evaluate import (
    REPORT_FILE,
    ROLLOUTS_FILE,
    EvalConfig,
    EvalReport,
    ModelSpec,
    default_out_dir,
    evaluate,
    load_eval_model,
)
from mtrl_local.plugins import resolve_model
from mtrl_local.run_dir import RunDir
from mtrl_local.server.train import run_agent_pipeline
from mtrl_local.train.pipeline import RunInputs, run_pipeline, zero_base_hint


# -- eval and baseline ---------------------------------------------------------------------------
def _eval_config(args: argparse.Namespace, **overrides: Any) -> EvalConfig:
    """The :class:`EvalConfig` of ``mtrl eval`` / ``mtrl baseline`` arguments."""
    values: dict[str, Any] = {
        "split": args.split,
        "n_samples": args.n,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "sampling_max_tokens": args.max_tokens,
        "max_turns": args.max_turns,
        "seed": args.seed,
        "max_batch": args.max_batch,
        "max_cases": args.max_cases,
        "device": args.device,
        "chat_format": args.chat_format,
    }
    values.update(overrides)
    return EvalConfig(**values)


def _print_outputs(console: Console, reports: Sequence[EvalReport], out: Path) -> None:
    for report in reports:
        for result in report.results:
            if result.rollouts:
                console.print(f"rollouts ({result.label}): {result.rollouts}")
    for path in sorted(out.rglob(REPORT_FILE)):
        console.print(f"report: {path}")


def run_eval(args: argparse.Namespace, inputs: EvalInputs, console: Console) -> int:
    task, config = inputs.task, _eval_config(args)
    out = Path(args.out) if args.out else default_out_dir(task.name)
    labelled: list[tuple[str, ModelSpec]] = [("model", resolve_model(inputs.model))]
    if inputs.base_model is not None:
        labelled = [("base", resolve_model(inputs.base_model)), ("tuned", labelled[0][1])]
    report = evaluate(
        labelled, task, config, reward_fn=inputs.reward_fn, out_dir=out, progress=True
    )
    console.print(format_table(report))
    _print_outputs(console, [report], out)
    return 0


def run_baseline(args: argparse.Namespace, inputs: EvalInputs, console: Console) -> int:
    task, reward_fn = inputs.task, inputs.reward_fn
    out = Path(args.out) if args.out else default_out_dir(task.name)
    greedy = _eval_config(args, n_samples=1, temperature=0.0)
    model = load_eval_model(resolve_model(inputs.model), greedy)  # loaded once for both passes
    passes = [("base greedy", greedy, out)]
    if args.n > 1:
        sampled = _eval_config(args, temperature=args.sample_temperature)
        label = f"base T={args.sample_temperature:g} n={args.n}"
        passes.append((label, sampled, out / "sampled"))
    reports = [
        evaluate([(label, model)], task, config, reward_fn=reward_fn, out_dir=where, progress=True)
        for label, config, where in passes
    ]
    console.print(format_table(reports, title=f"baseline: {task.name} ({args.split} split)"))
    _print_outputs(console, reports, out)
    results = [r for rep in reports for r in rep.results]
    best = max(max(r.summary["tsr"], r.summary["pass_at_1"]) for r in results)
    best_n = max(r.summary.get(f"pass_at_{args.n}", 0.0) for r in results)
    if best == 0.0 and best_n == 0.0:
        console.print(f"[bold yellow]{escape(zero_base_hint(inputs.model, task.name))}[/]")
    console.print(
        "next: validate the reward on these outputs: "
        f"mtrl audit --task {task.name} --rollouts {out / ROLLOUTS_FILE}"
    )
    return 0


# -- train -----------------------------------------------------------------------------------------
def run_train(args: argparse.Namespace, inputs: TrainInputs, console: Console) -> int:
    cfg = inputs.cfg
    run = RunInputs(inputs.task, inputs.reward_fn, resolve_model(cfg.model))
    resume = bool(args.resume)
    if inputs.agent is not None:
        # Bring-your-own agent: episodes come from the agent through the rollout server.
        report = run_agent_pipeline(
            cfg,
            run,
            inputs.agent,
            run_dir=inputs.run_dir,
            resume=resume,
            workers=args.agent_workers,
            idle_timeout_s=args.agent_timeout,
        )
    else:
        report = run_pipeline(
            cfg,
            run,
            run_dir=inputs.run_dir,
            resume=resume,
            baseline=not args.no_baseline,
            final_eval=not args.no_final_eval,
        )
        if not report:  # not process 0 under accelerate launch: it reports
            return 0
        test_report = RunDir(Path(report["run_dir"])).test_report
        if test_report.is_file():
            title = f"{inputs.task.name}: test split"
            console.print(format_table(EvalReport.load(test_report), title=title))
    console.print(f"run directory: {report['run_dir']}")
    console.print(f"final model:   {report['final_model']}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Any, Console], int]] = {
    "eval": run_eval,
    "baseline": run_baseline,
    "train": run_train,
}
