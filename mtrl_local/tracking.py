"""MLflow tracking: params, metrics, artifacts and one trace per trajectory, offline by default.

The run store (:mod:`mtrl_local.store`) is the toolkit's own record and what the dashboard reads;
MLflow is the second copy, for people who compare runs in the MLflow UI. So tracking is optional
and must never cost a run: every call is guarded (a failure logs a warning and training goes on),
and ``enabled=False`` makes the tracker a no-op that does not even import mlflow.

Where it writes: by default a SQLite tracking store inside the run directory
(``sqlite:///<run_dir>/mlflow.db``, artifacts under ``<run_dir>/mlartifacts``), so nothing needs a
server or the network; ``tracking_uri`` points it anywhere else (``http://…``, another database).

Traces (MLflow ≥ 3 tracing): one trace per trajectory, root span ``trajectory`` (type ``AGENT``,
inputs = the opening messages, outputs = reward/strict/done reason), one child span per model
turn (``turn_<k>``, type ``CHAT_MODEL``, outputs = the model's text and parsed tool calls), and
under each turn one ``TOOL`` span per tool result (inputs = the call's arguments, outputs = the
result). The root is started with ``mlflow.start_span(run_id=…, trace_destination=…)`` so the
trace lands in this run's experiment and carries the ``mlflow.sourceRun`` metadata that
``MlflowClient.search_traces(run_id=…)`` filters on.

Process-wide side effects, because MLflow's trace exporter only follows the global URI:
``mlflow.set_tracking_uri`` is called with this tracker's URI (MLflow also exports it as
``MLFLOW_TRACKING_URI`` to child processes), and MLflow telemetry is turned off
(``MLFLOW_DISABLE_TELEMETRY``) unless the user set it, so an offline machine makes no calls out.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mtrl_local.metrics import trajectory_reward
from mtrl_local.trajectory import Trajectory, TurnSpan

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: MLflow's own limits (mlflow.utils.validation): values are truncated, batches split.
_MAX_PARAM_VALUE = 6000
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
#: Warnings after which further tracking errors are only logged at debug level.
_MAX_WARNINGS = 10
RUN_ID_FILE = "mlflow_run_id"
TOOL_ERROR_PREFIX = "error: "  # mtrl_local.env.base.ERROR_PREFIX


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` → ``{"a.b": "1"}``: MLflow params are flat strings."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{name}."))
        elif isinstance(value, str):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _guarded(method: Callable[..., T]) -> Callable[..., T | None]:
    """Run ``method`` only when enabled; turn any exception into a warning (never crash a run)."""

    @functools.wraps(method)
    def wrapper(self: MlflowTracker, *args: Any, **kwargs: Any) -> T | None:
        if not self.enabled:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            self._warn(f"mlflow {method.__name__} failed: {exc!r}")
            return None

    return wrapper


class MlflowTracker:
    """One MLflow run for one training run. Cheap to disable; never raises after construction
    fails or succeeds (a failed construction logs a warning and disables the tracker).

    Args:
        run_dir: the run directory (the default tracking store lives there).
        tracking_uri: any MLflow tracking URI; ``None`` = ``sqlite:///<run_dir>/mlflow.db``.
        experiment: experiment name, created if missing.
        run_name: MLflow run name (default: the run directory's name).
        resume: continue the MLflow run whose id this tracker saved in ``<run_dir>/mlflow_run_id``
            (a new run is started when there is none).
        enabled: ``False`` turns every method into a no-op.
    """

    def __init__(
        self,
        run_dir: str | Path,
        tracking_uri: str | None = None,
        experiment: str = "mtrl-local",
        *,
        run_name: str | None = None,
        resume: bool = False,
        enabled: bool = True,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.enabled = enabled
        #: No URI given: the store is ours, inside the run directory (artifacts beside it).
        self.local = tracking_uri is None
        self.tracking_uri = tracking_uri or f"sqlite:///{self.run_dir / 'mlflow.db'}"
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self._warnings = 0
        self._traces = 0  # traces handed to MLflow's export queue by this tracker
        self._client: Any = None
        if not enabled:
            return
        try:
            self._start(experiment, run_name or self.run_dir.name, resume, dict(tags or {}))
        except Exception as exc:
            self._warn(
                f"mlflow tracking disabled: could not start a run at {self.tracking_uri}: {exc!r}"
            )
            self.enabled = False

    def _warn(self, message: str) -> None:
        self._warnings += 1
        if self._warnings <= _MAX_WARNINGS:
            logger.warning(message)
            if self._warnings == _MAX_WARNINGS:
                logger.warning("further mlflow tracking errors are logged at debug level")
        else:
            logger.debug(message)

    def _start(self, experiment: str, run_name: str, resume: bool, tags: dict[str, str]) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow
        from mlflow.tracking import MlflowClient

        self.run_dir.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.tracking_uri)
        client = MlflowClient(self.tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            self.experiment_id = exp.experiment_id
        else:
            artifacts = (self.run_dir / "mlartifacts").as_uri() if self.local else None
            self.experiment_id = client.create_experiment(experiment, artifact_location=artifacts)
        saved = self.run_dir / RUN_ID_FILE
        if resume and saved.is_file():
            self.run_id = saved.read_text().strip()
            client.update_run(self.run_id, status="RUNNING")
            logger.info("mlflow: resuming run %s", self.run_id)
        else:
            run = client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            saved.write_text(self.run_id + "\n")
        self._client = client
        logger.info("mlflow: run %s at %s", self.run_id, self.tracking_uri)

    # -- params, metrics, artifacts --------------------------------------------------------------
    @_guarded
    def log_params(self, config: Mapping[str, Any]) -> None:
        """Log a config (nested mappings flattened to ``a.b``; values over 6000 chars cut)."""
        from mlflow.entities import Param

        params = [Param(k, v[:_MAX_PARAM_VALUE]) for k, v in flatten_params(config).items()]
        for chunk in _chunks(params, _MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=list(chunk), synchronous=True)

    @_guarded
    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log ``{name: value}`` at ``step``; names with ``/`` (``rollout/reward/mean``) are
        valid MLflow keys and keep their grouping in the UI. ``None`` values are skipped."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [
            Metric(name, float(value), now, int(step))
            for name, value in metrics.items()
            if value is not None
        ]
        for chunk in _chunks(rows, _MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=list(chunk), synchronous=True)

    @_guarded
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or directory (a checkpoint's config, an eval report) into the run."""
        if Path(path).is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    # -- traces ------------------------------------------------------------------------------------
    @_guarded
    def log_trajectory_trace(self, trajectory: Trajectory, step: int | None = None) -> str | None:
        """Log one trajectory as an MLflow trace attached to this run; returns the trace id.

        Export is asynchronous (MLflow's queue): call :meth:`flush` before reading traces back.
        Tracing every rollout of every step is costly; log a sample (e.g. one group per step).
        """
        import mlflow
        from mlflow.entities import SpanType
        from mlflow.entities.trace_location import MlflowExperimentLocation

        opening, turns = split_turns(trajectory.messages)
        self._traces += 1
        tags = {
            "mtrl.case_id": trajectory.case_id,
            "mtrl.split": trajectory.split,
            "mtrl.group_id": trajectory.group_id,
        }
        if step is not None:
            tags["mtrl.step"] = str(step)
        with mlflow.start_span(
            "trajectory",
            span_type=SpanType.AGENT,
            run_id=self.run_id,
            trace_destination=MlflowExperimentLocation(experiment_id=str(self.experiment_id)),
            attributes=_trace_attributes(trajectory, step),
        ) as root:
            mlflow.update_current_trace(tags=tags)
            root.set_inputs({"messages": opening, "ground_truth": trajectory.ground_truth})
            for k, (assistant, results) in enumerate(turns):
                span = trajectory.turns[k] if k < len(trajectory.turns) else None
                _trace_turn(k, assistant, results, span)
            root.set_outputs(_trace_outputs(trajectory))
        return str(root.trace_id)

    # -- lifecycle ---------------------------------------------------------------------------------
    @_guarded
    def flush(self) -> None:
        """Wait until every trace handed to MLflow's async export queue is written.

        Costs about a second (MLflow stops and restarts its export threads): call it before
        reading traces back or at the end, not every step.
        """
        import mlflow

        if self._traces:
            mlflow.flush_trace_async_logging()

    @_guarded
    def close(self, status: str = "FINISHED") -> None:
        """Flush traces and end the MLflow run (``FINISHED``, ``FAILED`` or ``KILLED``)."""
        self.flush()
        self._client.set_terminated(self.run_id, status=status)


def split_turns(
    messages: Sequence[Mapping[str, Any]],
) -> tuple[list[Mapping[str, Any]], list[tuple[Mapping[str, Any], list[Mapping[str, Any]]]]]:
    """Opening messages (before the first assistant turn), then each assistant message with the
    tool messages that answered it (the layout ``mtrl_local.env.base.Episode`` writes)."""
    opening: list[Mapping[str, Any]] = []
    turns: list[tuple[Mapping[str, Any], list[Mapping[str, Any]]]] = []
    for m in messages:
        if m.get("role") == "assistant":
            turns.append((m, []))
        elif turns:
            turns[-1][1].append(m)
        else:
            opening.append(m)
    return opening, turns


def pair_tool_results(
    assistant: Mapping[str, Any], results: Sequence[Mapping[str, Any]]
) -> Iterator[tuple[str, dict[str, Any], Mapping[str, Any]]]:
    """``(tool name, arguments, result message)`` per tool result of one turn.

    The assistant message lists only the calls that parsed; a malformed call still gets an error
    result (named ``?``), so results are matched to calls in order by name, and a result with no
    matching call gets empty arguments.
    """
    calls = list(assistant.get("tool_calls") or [])
    i = 0
    for result in results:
        name = str(result.get("name", "?"))
        arguments: dict[str, Any] = {}
        if i < len(calls) and calls[i].get("name") == name:
            arguments = dict(calls[i].get("arguments") or {})
            i += 1
        yield name, arguments, result


def _trace_attributes(trajectory: Trajectory, step: int | None) -> dict[str, Any]:
    return {
        "task": trajectory.task,
        "case_id": trajectory.case_id,
        "split": trajectory.split,
        "group_id": trajectory.group_id,
        "sample_index": trajectory.sample_index,
        "seed": trajectory.seed,
        "policy_version": trajectory.policy_version,
        "step": -1 if step is None else step,
        "n_turns": trajectory.n_turns,
        "failed": trajectory.failed,
    }


def _trace_outputs(trajectory: Trajectory) -> dict[str, Any]:
    reward = trajectory.reward
    return {
        "reward": trajectory_reward(trajectory),
        "per_turn_rewards": reward if isinstance(reward, list) else None,
        "strict": trajectory.strict,
        "done_reason": trajectory.done_reason,
        "tool_calls": trajectory.tool_calls,
        "tool_errors": trajectory.tool_errors,
        "metrics": trajectory.metrics,
    }


def _trace_turn(
    k: int,
    assistant: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    span: TurnSpan | None,
) -> None:
    """Turn ``k`` as a chat span, with one tool span per call it made (inside an open trace)."""
    import mlflow
    from mlflow.entities import SpanType

    with mlflow.start_span(f"turn_{k}", span_type=SpanType.CHAT_MODEL) as turn:
        turn.set_outputs(
            {"content": assistant.get("content", ""), "tool_calls": assistant.get("tool_calls", [])}
        )
        if span is not None:
            turn.set_attributes({"finish_reason": span.finish_reason, "n_tokens": span.n_tokens})
        for name, arguments, result in pair_tool_results(assistant, results):
            with mlflow.start_span(f"tool:{name}", span_type=SpanType.TOOL) as tool:
                tool.set_inputs(arguments)
                content = result.get("content", "")
                tool.set_outputs(content)
                if str(content).startswith(TOOL_ERROR_PREFIX):
                    tool.set_status("ERROR")
