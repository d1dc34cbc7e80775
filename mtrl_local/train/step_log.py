"""One call per step fans its results out: the run store, MLflow, the diagnostics, the progress bar.

Process 0 of a run owns a :class:`StepLogger`; the trainer hands it each step's metrics and
trajectories and never talks to the store, MLflow or the diagnostics itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from mtrl_local import metrics as M
from mtrl_local.diagnostics import diagnose
from mtrl_local.eval_metrics import val_metrics
from mtrl_local.store import RunStore
from mtrl_local.tracking import MlflowTracker
from mtrl_local.trajectory import Trajectory

logger = logging.getLogger(__name__)


class StepLogger:
    """Writes what a step produced to every sink, in one place."""

    def __init__(
        self,
        store: RunStore,
        tracker: MlflowTracker,
        *,
        total_steps: int,
        first_step: int,
        desc: str,
        progress: bool,
    ) -> None:
        self.store = store
        self.tracker = tracker
        self.bar = tqdm(total=total_steps, initial=first_step, desc=desc) if progress else None

    def step(
        self, step: int, metrics: Mapping[str, float], trajectories: Sequence[Trajectory]
    ) -> None:
        """A training step: its episodes, its metrics, a sample as traces, the diagnostics."""
        self.store.add_trajectories(step, trajectories)
        self.metrics(step, metrics)
        self._trace_one_group(step, trajectories)
        self._diagnose(step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                reward=f"{metrics.get(M.REWARD_MEAN, float('nan')):.3f}",
                step_s=f"{metrics.get(M.PERF_STEP_S, float('nan')):.1f}",
            )

    def metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Metrics alone (the validation before step 1)."""
        self.store.log_metrics(step, metrics)
        self.tracker.log_metrics(step, metrics)

    def evaluation(
        self,
        step: int,
        split: str,
        label: str,
        summary: Mapping[str, Any],
        trajectories: Sequence[Trajectory],
    ) -> dict[str, float]:
        """An evaluation (its report and episodes); returns its ``val/*`` metrics."""
        self.store.add_evaluation(step, split, label, summary)
        self.store.add_trajectories(step, trajectories, label=split)
        return val_metrics(summary)

    def _trace_one_group(self, step: int, trajectories: Sequence[Trajectory]) -> None:
        """One group per step as MLflow traces (all of them would slow MLflow to a crawl)."""
        if not trajectories:
            return
        group = trajectories[0].group_id
        for t in trajectories:
            if t.group_id == group:
                self.tracker.log_trajectory_trace(t, step=step)

    def _diagnose(self, step: int) -> None:
        new = [f for f in diagnose(self.store.history()) if f.step == step]
        self.store.add_findings(new)
        for f in new:
            logger.warning("diagnostic [%s] %s → %s", f.code, f.message, f.first_change)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
