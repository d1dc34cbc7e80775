"""The whole loop in one call (what ``make train`` runs), on objects it is handed.

baseline evaluation of the base model on the held-out test split → training (with strict val
evaluations every ``eval_steps``) → final evaluation of the tuned model on test, beside the base
→ the table, the run directory, the exported model. Resuming a run skips what is already done
(the baseline is read back from the run store).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mtrl_local.config import MultiTurnRLConfig
from mtrl_local.evaluate import EvalReport, ModelResult, write_trajectories
from mtrl_local.scoring import RewardFn, Scorer, strict_score
from mtrl_local.task import Task
from mtrl_local.train import distributed as dd
from mtrl_local.train.setup import machine_record
from mtrl_local.train.trainer import Trainer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInputs:
    """What a run is made of, as objects (the CLI resolves them from the config's names)."""

    task: Task
    reward_fn: RewardFn
    model_path: Path
    scorer: Scorer = strict_score

    def trainer(self, cfg: MultiTurnRLConfig, **kwargs: Any) -> Trainer:
        """A :class:`Trainer` of ``cfg`` on these objects (``kwargs``: its keyword options)."""
        return Trainer(
            cfg, self.task, self.reward_fn, self.model_path, scorer=self.scorer, **kwargs
        )


def run_pipeline(
    cfg: MultiTurnRLConfig,
    inputs: RunInputs,
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
    trainer = inputs.trainer(cfg, run_dir=run_dir, resume=resume, progress=progress)
    try:
        if not trainer.dist.main:
            dd.barrier(trainer.dist)  # process 0's baseline
            trainer.train()
            dd.barrier(trainer.dist)  # process 0's final evaluation and export
            return {}
        base = _baseline(trainer) if baseline else _stored_baseline(trainer)
        dd.barrier(trainer.dist)
        state = trainer.train()
        report: dict[str, Any] = {
            "run_dir": str(trainer.run_dir),
            "task": inputs.task.name,
            "steps": state.step,
            "config": cfg.to_dict(),
            "machine": machine_record(),
        }
        if final_eval:
            report["test"] = _final_evaluation(trainer, base, cfg.model)
        report["final_model"] = str(trainer.export())
        trainer.run.report.write_text(json.dumps(report, indent=2, default=str) + "\n")
        trainer.tracker.log_artifact(trainer.run.report)
        dd.barrier(trainer.dist)
        return report
    finally:
        trainer.close()


def _stored_baseline(trainer: Trainer) -> dict[str, Any] | None:
    stored = trainer.store.evaluations(split="test", label="base")
    return dict(stored[-1].report) if stored else None


def _baseline(trainer: Trainer) -> dict[str, Any]:
    """The base model on the test split (read back from the store when resuming)."""
    stored = _stored_baseline(trainer)
    if stored is not None:
        return stored
    logger.info("baseline: base model on the test split")
    summary, trajectories = trainer.evaluate("test")
    write_trajectories(trainer.run.test_rollouts("base"), trajectories)
    trainer.store.add_evaluation(0, "test", "base", summary)
    if summary.get("tsr", 0.0) == 0.0:
        logger.warning("%s", zero_base_hint(trainer.cfg.model, trainer.task.name))
    return summary


def zero_base_hint(model: str, task: str) -> str:
    """What to do about a base model whose strict TSR is 0 (``mtrl train`` logs it after the
    baseline, ``mtrl baseline`` prints it): RL has no success to reinforce."""
    return (
        "the base model scores zero: RL amplifies what the model can already do — simplify the "
        "task, or warm-start the model from demonstrations first: "
        f"mtrl sft --model {model} --task {task} --out DIR"
    )


def _final_evaluation(
    trainer: Trainer, base: Mapping[str, Any] | None, base_model: str
) -> dict[str, Any]:
    """The tuned model on the test split, beside the base: ``eval_test.json``."""
    logger.info("final evaluation: tuned model on the test split")
    tuned, trajectories = trainer.evaluate("test")
    write_trajectories(trainer.run.test_rollouts("tuned"), trajectories)
    trainer.store.add_evaluation(trainer.state.step, "test", "tuned", tuned)
    results = []
    if base is not None:
        results.append(ModelResult("base", base_model, dict(base)))
    results.append(ModelResult("tuned", str(trainer.run.final_model), tuned))
    config = {**asdict(trainer.eval_config("test")), "task": trainer.task.name}
    EvalReport(trainer.task.name, "test", config, results).save(trainer.run.test_report)
    trainer.tracker.log_artifact(trainer.run.test_report)
    return {r.label: r.summary for r in results}
