"""The whole loop of DESIGN.md §1 in one call (what ``make train`` runs).

baseline evaluation of the base model on the held-out test split → training (with strict val
evaluations every ``eval_steps``) → final evaluation of the tuned model on test, beside the base
→ the table, the run directory, the exported model. Resuming a run skips what is already done
(the baseline is read back from the run store).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mtrl_local.config import MultiTurnRLConfig
from mtrl_local.trajectory import Trajectory

logger = logging.getLogger(__name__)

REPORT_FILE = "final_report.json"


def _write_rollouts(path: Path, trajectories: list[Trajectory]) -> None:
    from mtrl_local.rollouts import write_rollouts

    write_rollouts(path, [t.to_json() for t in trajectories if t.messages])


def run_pipeline(
    cfg: MultiTurnRLConfig,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    baseline: bool = True,
    final_eval: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Baseline → train → final evaluation; returns the final report (also written to disk).

    Under ``accelerate launch`` every process trains; only process 0 evaluates, writes and
    returns the report (the others return ``{}`` once it is done).
    """
    from mtrl_local.evaluate import EvalReport, ModelResult
    from mtrl_local.train import distributed as dd
    from mtrl_local.train.trainer import Trainer

    trainer = Trainer(cfg, run_dir, resume=resume, progress=progress)
    if not trainer.dist.main:
        try:
            dd.barrier(trainer.dist)  # process 0's baseline
            trainer.train()
            dd.barrier(trainer.dist)  # process 0's final evaluation and export
            return {}
        finally:
            trainer.close()
    try:
        store = trainer.store
        base_summary: dict[str, Any] | None = None
        stored = store.evaluations(split="test", label="base")
        if stored:
            base_summary = dict(stored[-1].report)
        elif baseline:
            logger.info("baseline: base model on the test split")
            summary = trainer.evaluate("test", label="base")
            trajectories = summary.pop("trajectories")
            _write_rollouts(trainer.run_dir / "rollouts-base-test.jsonl", trajectories)
            store.add_evaluation(0, "test", "base", summary)
            base_summary = summary
            if summary.get("tsr", 0.0) == 0.0:
                logger.warning(
                    "the base model scores 0 on test: RL amplifies what the model can already do "
                    "— simplify the task or warm-start the model first (DESIGN.md §1.4)"
                )
        dd.barrier(trainer.dist)
        state = trainer.train()
        report: dict[str, Any] = {
            "run_dir": str(trainer.run_dir),
            "task": cfg.task,
            "steps": state.step,
            "config": asdict(cfg),
        }
        if final_eval:
            logger.info("final evaluation: tuned model on the test split")
            tuned = trainer.evaluate("test", label="tuned")
            trajectories = tuned.pop("trajectories")
            _write_rollouts(trainer.run_dir / "rollouts-tuned-test.jsonl", trajectories)
            store.add_evaluation(state.step, "test", "tuned", tuned)
            results = []
            if base_summary is not None:
                results.append(ModelResult("base", cfg.model, base_summary))
            results.append(ModelResult("tuned", str(trainer.run_dir / "final_model"), tuned))
            eval_report = EvalReport(cfg.task, "test", asdict(cfg.val_sampling_params), results)
            eval_report.save(trainer.run_dir / "eval_test.json")
            report["test"] = {r.label: r.summary for r in results}
            trainer.tracker.log_artifact(trainer.run_dir / "eval_test.json")
        report["final_model"] = str(trainer.export())
        path = trainer.run_dir / REPORT_FILE
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        trainer.tracker.log_artifact(path)
        dd.barrier(trainer.dist)
        return report
    finally:
        trainer.close()
