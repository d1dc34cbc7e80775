"""The layout of a run directory: every file the toolkit writes for one training run.

::

    runs/<name>/
      config.json            the resolved config (what ``--resume`` reads back)
      run.sqlite             the run store (mtrl_local.store): metrics, trajectories, evaluations
      run.lock               while a run writes here: its pid, host and start time
                             (mtrl_local.train.run_lock; readers ignore it)
      mlflow.db, mlartifacts/, mlflow_run_id   the local MLflow store (mtrl_local.tracking)
      checkpoints/step-NNNNNN/                 checked checkpoints (mtrl_local.train.checkpoint)
      rollouts-base-test.jsonl, rollouts-tuned-test.jsonl   test-split episodes (rollout files)
      eval_test.json         base vs tuned on the test split (an EvalReport)
      final_report.json      what ``mtrl train`` returns
      final_model/           the exported model (LoRA merged), loadable by ``mtrl eval``
      agents/step-NNNNN/     each agent process's output (``mtrl train --agent-cmd``)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

#: The run store's file (its format: :mod:`mtrl_local.store_schema`).
STORE_FILENAME = "run.sqlite"
#: Held by the one process writing the run (:mod:`mtrl_local.train.run_lock`).
LOCK_FILENAME = "run.lock"


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory (nothing is created until a writer needs it)."""

    path: Path

    @classmethod
    def new(cls, output_dir: str | Path, name: str | None, task_name: str) -> RunDir:
        """``output_dir/name``, or ``output_dir/<task>-<timestamp>`` without a name."""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return cls(Path(output_dir) / (name or f"{task_name}-{stamp}"))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def store(self) -> Path:
        return self.path / STORE_FILENAME

    @property
    def lock(self) -> Path:
        return self.path / LOCK_FILENAME

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final_model(self) -> Path:
        return self.path / "final_model"

    @property
    def report(self) -> Path:
        return self.path / "final_report.json"

    @property
    def test_report(self) -> Path:
        return self.path / "eval_test.json"

    @property
    def agent_logs(self) -> Path:
        return self.path / "agents"

    def test_rollouts(self, label: str) -> Path:
        """The rollout file of the ``base`` or ``tuned`` model on the test split."""
        return self.path / f"rollouts-{label}-test.jsonl"

    def has_run(self) -> bool:
        """Whether a run was started here (its store exists)."""
        return self.store.is_file()
