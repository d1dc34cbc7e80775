"""MLflow tracking against a real local store in tmp_path: params, metrics, artifacts, traces."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtrl_local.tracking import MlflowTracker, flatten_params, pair_tool_results, split_turns
from mtrl_local.trajectory import Trajectory, TurnSpan

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _restore_tracking_uri() -> Iterator[None]:
    # The tracker sets MLflow's global URI (and MLFLOW_TRACKING_URI): keep it out of other tests.
    # Module scope: each change of the URI restarts MLflow's trace exporter, which takes seconds.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(before)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="module")
def shared_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One default (in-run-dir) store for the module: creating an MLflow database takes seconds,
    so the other tests open runs in this one through an explicit ``tracking_uri``."""
    tracker = MlflowTracker(tmp_path_factory.mktemp("shared"))
    tracker.close()
    return tracker.tracking_uri


def two_turn_trajectory() -> Trajectory:
    messages = [
        {"role": "system", "content": "You inspect aircraft."},
        {"role": "user", "content": "Inspect N123."},
        {
            "role": "assistant",
            "content": '<tool_call>{"name": "lookup", "arguments": {"tail": "N123"}}</tool_call>'
            "<tool_call>broken",
            "tool_calls": [{"name": "lookup", "arguments": {"tail": "N123"}}],
        },
        {"role": "tool", "name": "lookup", "content": "model=A320"},
        {"role": "tool", "name": "?", "content": "error: malformed tool call"},
        {
            "role": "assistant",
            "content": '<final_response>{"aircraft_ready": true}</final_response>',
        },
    ]
    return Trajectory(
        task="aircraft_inspection",
        case_id="case-7",
        split="train",
        ground_truth={"aircraft_ready": True},
        turns=[TurnSpan(10, 30, "stop", tool_calls=2, tool_errors=1), TurnSpan(40, 52, "stop")],
        messages=messages,
        done_reason="final_answer",
        tool_calls=2,
        tool_errors=1,
        reward=[0.25, 0.75],
        strict=1.0,
        group_id="g3",
        sample_index=1,
    )


def test_params_metrics_artifacts_and_trace(tmp_path: Path, shared_uri: str) -> None:
    tracker = MlflowTracker(tmp_path, shared_uri, run_name="demo")
    assert tracker.enabled and tracker.run_id
    tracker.log_params({"learning_rate": 1e-5, "async_config": {"max_steps_off_policy": 0}})
    tracker.log_metrics(0, {"rollout/reward/mean": 0.25, "analysis/zero_adv_groups": 0.5})
    tracker.log_metrics(1, {"rollout/reward/mean": 0.5, "train/loss": None})  # type: ignore[dict-item]
    report = tmp_path / "report.json"
    report.write_text("{}")
    tracker.log_artifact(report)
    trace_id = tracker.log_trajectory_trace(two_turn_trajectory(), step=1)
    tracker.close()
    assert trace_id

    client = MlflowClient(shared_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "demo"
    assert run.data.params == {
        "learning_rate": "1e-05",
        "async_config.max_steps_off_policy": "0",
    }
    history = client.get_metric_history(tracker.run_id, "rollout/reward/mean")
    assert [(m.step, m.value) for m in history] == [(0, 0.25), (1, 0.5)]
    assert "train/loss" not in run.data.metrics
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["report.json"]
    # the experiment was created with a default (local) store: artifacts stay in that run dir
    shared_dir = Path(shared_uri.removeprefix("sqlite:///")).parent
    assert (shared_dir / "mlartifacts").is_dir() and (shared_dir / "mlflow_run_id").is_file()

    traces = client.search_traces(locations=[tracker.experiment_id], run_id=tracker.run_id)
    assert len(traces) == 1
    trace = traces[0]
    assert trace.info.trace_metadata["mlflow.sourceRun"] == tracker.run_id
    assert trace.info.tags["mtrl.step"] == "1" and trace.info.tags["mtrl.case_id"] == "case-7"
    spans = {s.name: s for s in trace.data.spans}
    turns = sorted(n for n in spans if n.startswith("turn_"))
    assert turns == ["turn_0", "turn_1"]  # one span per turn
    root = spans["trajectory"]
    assert root.outputs["reward"] == 1.0 and root.outputs["per_turn_rewards"] == [0.25, 0.75]
    assert [m["role"] for m in root.inputs["messages"]] == ["system", "user"]
    assert spans["turn_0"].parent_id == root.span_id
    assert spans["turn_0"].attributes["finish_reason"] == "stop"
    assert spans["turn_0"].outputs["tool_calls"][0]["arguments"] == {"tail": "N123"}
    lookup, bad = spans["tool:lookup"], spans["tool:?"]
    assert lookup.parent_id == spans["turn_0"].span_id
    assert lookup.inputs == {"tail": "N123"} and lookup.outputs == "model=A320"
    assert bad.status.status_code == "ERROR"
    assert not [s for s in trace.data.spans if s.parent_id == spans["turn_1"].span_id]


def test_resume_continues_the_same_run(tmp_path: Path, shared_uri: str) -> None:
    first = MlflowTracker(tmp_path, shared_uri)
    first.log_metrics(0, {"rollout/reward/mean": 0.1})
    first.close(status="KILLED")
    second = MlflowTracker(tmp_path, shared_uri, resume=True)
    assert second.run_id == first.run_id
    second.log_metrics(1, {"rollout/reward/mean": 0.2})
    second.close()
    client = MlflowClient(second.tracking_uri)
    assert len(client.get_metric_history(first.run_id, "rollout/reward/mean")) == 2


def test_disabled_is_a_no_op(tmp_path: Path) -> None:
    tracker = MlflowTracker(tmp_path / "run", enabled=False)
    tracker.log_params({"a": 1})
    tracker.log_metrics(0, {"x": 1.0})
    assert tracker.log_trajectory_trace(two_turn_trajectory()) is None
    tracker.close()
    assert not (tmp_path / "run").exists()


def test_errors_warn_and_never_raise(
    tmp_path: Path, shared_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mtrl_local.tracking")
    broken = MlflowTracker(tmp_path, tracking_uri="nosuchscheme://nowhere")
    assert not broken.enabled
    broken.log_metrics(0, {"x": 1.0})  # disabled: nothing happens
    assert "mlflow tracking disabled" in caplog.text

    tracker = MlflowTracker(tmp_path / "ok", shared_uri)

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("store is down")

    tracker._client.log_batch = boom
    tracker.log_metrics(0, {"x": 1.0})
    assert "log_metrics failed" in caplog.text and "store is down" in caplog.text
    tracker.close()


def test_helpers() -> None:
    assert flatten_params({"a": {"b": [1, 2]}, "c": "s", "d": None}) == {
        "a.b": "[1, 2]",
        "c": "s",
        "d": "null",
    }
    opening, turns = split_turns(two_turn_trajectory().messages)
    assert len(opening) == 2 and len(turns) == 2 and len(turns[0][1]) == 2
    paired = list(pair_tool_results(*turns[0]))
    assert [(n, a) for n, a, _ in paired] == [("lookup", {"tail": "N123"}), ("?", {})]
