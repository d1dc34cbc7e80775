"""``mtrl train --agent-cmd …``: RL on an external agent's episodes, start to exported model.

The built-in pipeline (:mod:`mtrl_local.train.pipeline`) evaluates the base and tuned models on
the test split through the task's own environment and prompt. An external agent has its own
prompt and loop, so that evaluation would measure something else; this pipeline trains and
exports, and the agent's own metrics (its reported ``completion``, ``field_acc``, ``strict``…)
are what the store, MLflow and the dashboard show. Val evaluations every ``eval_steps`` still
use the built-in environment; set ``eval_steps=0`` when the agent's prompt differs from it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mtrl_local.config import MultiTurnRLConfig
from mtrl_local.server.source import AgentBatchSource, AgentFunction, agent_source_factory
from mtrl_local.train.pipeline import RunInputs

logger = logging.getLogger(__name__)


def run_agent_pipeline(
    cfg: MultiTurnRLConfig,
    inputs: RunInputs,
    agent: list[str] | AgentFunction,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    workers: int | None = None,
    idle_timeout_s: float = 120.0,
    episode_timeout_s: float = 900.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``agent`` (a command line or a function) with ``cfg``; returns the report."""
    factory = agent_source_factory(
        agent, workers=workers, idle_timeout_s=idle_timeout_s, episode_timeout_s=episode_timeout_s
    )
    trainer = inputs.trainer(
        cfg, run_dir=run_dir, resume=resume, progress=progress, source_factory=factory
    )
    try:
        state = trainer.train()
        source = trainer.source
        totals = dict(source.totals) if isinstance(source, AgentBatchSource) else {}
        report: dict[str, Any] = {
            "run_dir": str(trainer.run_dir),
            "task": inputs.task.name,
            "agent": " ".join(agent) if isinstance(agent, list) else agent.__name__,
            "steps": state.step,
            "agent_totals": totals,
            "config": cfg.to_dict(),
        }
        report["final_model"] = str(trainer.export())
        trainer.run.report.write_text(json.dumps(report, indent=2, default=str) + "\n")
        trainer.tracker.log_artifact(trainer.run.report)
        return report
    finally:
        trainer.close()


__all__ = ["run_agent_pipeline"]
