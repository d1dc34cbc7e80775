"""The aircraft_inspection task: rules at their thresholds, tools, policies, data and files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from mtrl_local.env import Episode, render_tool_call
from mtrl_local.errors import UserError
from mtrl_local.plugins import load_task
from sopbench.aircraft_inspection import AircraftInspection, rules
from sopbench.aircraft_inspection.task import AircraftInspectionEnv
from sopbench.base import NOISE_KINDS, Case

#: sha256 of every generated case (json.dumps, sort_keys): generation must not drift across
#: runs, machines or refactors. Change it only on purpose, together with the data it pins.
GOLDEN_DIGEST = "0f9911664cfe91649e87693c2a957d16d0bf2dd3a09f5b05e024e833b2619bf7"


@pytest.fixture(scope="module")
def task() -> AircraftInspection:
    t = load_task("aircraft_inspection")
    assert isinstance(t, AircraftInspection)
    return t


def _inputs(**overrides: Any) -> dict[str, Any]:
    """A hand-made airworthy aircraft (spec 100.0 kg, minimum 24.0 V), with ``overrides``."""
    base: dict[str, Any] = {
        "aircraft_id": "AC-12345",
        "tail_number": "N123AB",
        "model": "Corvan C-210",
        "component": "main gear actuator",
        "registered_serial": "SN-11111",
        "spec_weight_kg": 100.0,
        "min_battery_voltage_v": 24.0,
        "serial_plate": "SN-11111",
        "measured_weight_kg": 100.0,
        "condition": "no visible damage",
        "battery_voltage_v": 25.0,
        "continuity": ["closed"],
        "avionics": "PASS",
        "logged_serial": "SN-11111",
        "open_write_ups": 0,
    }
    base.update(overrides)
    return base


def _case(**overrides: Any) -> Case:
    inputs = _inputs(**overrides)
    return Case(
        "aircraft_inspection", "hand-1", "test", inputs, rules.ground_truth("hand-1", inputs)
    )


# -- the SOP rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("measured", "mechanical"),
    [(101.9, "pass"), (98.1, "pass"), (102.0, "pass"), (102.1, "fail"), (97.9, "fail")],
)
def test_weight_rule_at_two_percent(measured: float, mechanical: str) -> None:
    truth = rules.ground_truth("c", _inputs(measured_weight_kg=measured))
    assert truth["mechanical_inspection_result"] == mechanical
    assert truth["aircraft_ready"] is (mechanical == "pass")


def test_weight_rule_is_exact_on_one_decimal_values() -> None:
    # 0.1 × 10 style float noise must not flip a verdict: 48.3 kg spec, 2 % = 0.966 kg.
    assert rules.weight_within_tolerance(rules.tenths(49.2), rules.tenths(48.3))
    assert not rules.weight_within_tolerance(rules.tenths(49.3), rules.tenths(48.3))


@pytest.mark.parametrize(
    ("voltage", "electrical"), [(24.0, "pass"), (24.1, "pass"), (23.9, "fail")]
)
def test_voltage_threshold_equal_passes(voltage: float, electrical: str) -> None:
    truth = rules.ground_truth("c", _inputs(battery_voltage_v=voltage))
    assert truth["electrical_inspection_result"] == electrical


@pytest.mark.parametrize(
    ("readings", "passes"),
    [
        (["closed"], True),
        (["open"], False),
        (["intermittent", "closed"], True),
        (["intermittent", "intermittent", "closed"], True),
        (["intermittent", "intermittent", "intermittent"], False),
        (["intermittent", "intermittent", "intermittent", "closed"], False),
        (["intermittent", "open", "closed"], False),
    ],
)
def test_continuity_allows_three_readings(readings: list[str], passes: bool) -> None:
    assert rules.continuity_passes(readings) is passes
    truth = rules.ground_truth("c", _inputs(continuity=readings))
    assert truth["electrical_inspection_result"] == ("pass" if passes else "fail")


def test_damage_mismatch_and_cross_check_fields() -> None:
    truth = rules.ground_truth(
        "c", _inputs(condition="crack", serial_plate="SN-11171", logged_serial="SN-11171")
    )
    assert truth["component_incident_response"] == rules.incident_id("c", "AC-12345", "crack")
    assert truth["component_mismatch_response"] == rules.discrepancy_id("c", "AC-12345", "SN-11171")
    # The swap was logged, so the log agrees with the plate.
    assert truth["cross_check_reporting_response"] == "consistent"
    assert truth["mechanical_inspection_result"] == "fail"
    assert truth["aircraft_ready"] is False
    assert rules.ground_truth("c", _inputs(condition="minor wear"))["aircraft_ready"] is True
    for bad in ({"open_write_ups": 1}, {"logged_serial": "SN-11112"}, {"avionics": "ADC-114"}):
        assert rules.ground_truth("c", _inputs(**bad))["aircraft_ready"] is False


# -- environment and tools --------------------------------------------------------------------


def test_opening_messages_carry_sop_and_request(task: AircraftInspection) -> None:
    env = AircraftInspectionEnv()
    messages = env.reset(_case(), seed=0)
    env.close()
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == task.sop
    assert "|measured − spec| × 50 ≤ spec" in task.sop
    assert "AC-12345" in messages[1]["content"]
    for name in task.output_fields:
        assert name in messages[1]["content"]
    assert len(env.tools) <= 8


def test_wrong_aircraft_id_is_a_deterministic_tool_error(task: AircraftInspection) -> None:
    contents = []
    for _ in range(2):
        with Episode(AircraftInspectionEnv(), _case(), max_turns=task.max_turns) as ep:
            ep.reset()
            step = ep.step(render_tool_call("lookup_aircraft", {"aircraft_id": "AC-99999"}))
            step2 = ep.step(
                render_tool_call(
                    "report_discrepancy", {"aircraft_id": "AC-99999", "observed_serial": "SN-1"}
                )
            )
            contents.append((step.messages[0]["content"], step2.messages[0]["content"]))
            assert ep.stats.tool_errors == 2
            assert not ep.done
    assert contents[0] == contents[1]
    assert contents[0][0] == "error: no record found for lookup_aircraft(aircraft_id='AC-99999')"
    assert contents[0][1].startswith("error: no record found for report_discrepancy(")


def test_circuit_retests_replay_successive_readings() -> None:
    readings = ["intermittent", "intermittent", "intermittent", "closed"]
    env = AircraftInspectionEnv()
    env.reset(_case(continuity=readings), seed=0)
    got = [
        json.loads(env.call_tool("test_circuit", {"aircraft_id": "AC-12345"}).content)
        for _ in range(5)
    ]
    env.close()
    assert [g["continuity"] for g in got] == [*readings, "closed"]
    assert [g["reading"] for g in got] == [1, 2, 3, 4, 5]


def test_report_ids_depend_on_the_observed_values() -> None:
    case = _case(condition="corrosion", serial_plate="SN-22222", logged_serial="SN-22222")
    env = AircraftInspectionEnv()
    env.reset(case, seed=0)

    def call(name: str, **args: Any) -> str:
        return env.call_tool(name, {"aircraft_id": "AC-12345", **args}).content

    right = json.loads(call("file_incident_report", condition="corrosion"))["incident_id"]
    wrong = json.loads(call("file_incident_report", condition="crack"))["incident_id"]
    dr = json.loads(call("report_discrepancy", observed_serial="SN-22222"))["discrepancy_id"]
    dr_wrong = json.loads(call("report_discrepancy", observed_serial="SN-11111"))["discrepancy_id"]
    bad_condition = call("file_incident_report", condition="minor wear")
    env.close()
    assert right == case.ground_truth["component_incident_response"] != wrong
    assert dr == case.ground_truth["component_mismatch_response"] != dr_wrong
    assert right.startswith("INC-") and dr.startswith("DR-")
    assert bad_condition.startswith("error: argument 'condition'")


def test_tools_return_observations_not_verdicts(task: AircraftInspection) -> None:
    for episode in task.reference_episodes("test"):
        for m in episode.messages:
            if m["role"] == "tool":
                text = m["content"].lower()
                assert not any(w in text for w in ("fail", "consistent", "ready", "mismatch"))


# -- policies and validation ------------------------------------------------------------------


def test_validate_reference_scores_one_on_every_case(task: AircraftInspection) -> None:
    report = task.validate()
    assert report.ok, report.problems
    assert report.split_sizes == {"train": 300, "val": 100, "test": 100}
    assert report.reference_tsr == 1.0
    assert report.reference_turns == task.reference_turns
    assert task.max_turns == 15


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"measured_weight_kg": 102.1, "continuity": ["intermittent"] * 3},
        {"condition": "impact damage", "serial_plate": "SN-11112", "open_write_ups": 2},
        {"battery_voltage_v": 24.0, "continuity": ["intermittent", "intermittent", "closed"]},
    ],
)
def test_reference_policy_derives_answers_from_tools(
    task: AircraftInspection, overrides: dict[str, Any]
) -> None:
    episode = task.run_expert(_case(**overrides))
    assert episode.strict == 1.0
    assert episode.tool_errors == 0


def test_noisy_expert_fails_sometimes_with_every_kind(task: AircraftInspection) -> None:
    episodes = task.noisy_episodes("val", rate=0.3)
    strict = [e.strict for e in episodes]
    assert 0 < sum(strict) < len(strict)
    kinds = {k for e in episodes for k in e.noise_events}
    assert kinds == set(NOISE_KINDS)
    assert all(e.noise_events for e in episodes if e.strict == 0.0)


def test_early_answers_follow_sop_step_6_and_name_this_aircraft(task: AircraftInspection) -> None:
    """The expert who stops early still answers consistently: ready = all three checks pass."""
    import re

    early = [e for e in task.noisy_episodes("train", rate=0.3) if "early_answer" in e.noise_events]
    assert len(early) > 20
    ready_seen = set()
    for e in early:
        text = e.messages[-1]["content"]
        body = re.search(r"<(\w+)>(.*)</\1>", text, re.S)
        assert body is not None
        answer = json.loads(body.group(2))
        verdicts_pass = (
            answer["mechanical_inspection_result"] == "pass"
            and answer["electrical_inspection_result"] == "pass"
            and answer["cross_check_reporting_response"] == "consistent"
        )
        assert answer["aircraft_ready"] == verdicts_pass
        ready_seen.add(answer["aircraft_ready"])
        assert answer["tail_number"] == e.case.inputs["tail_number"]
    assert True in ready_seen


# -- data ----------------------------------------------------------------------------------------


def test_generation_is_pinned(task: AircraftInspection) -> None:
    blob = json.dumps([c.to_json() for c in task.cases()], sort_keys=True)
    assert hashlib.sha256(blob.encode()).hexdigest() == GOLDEN_DIGEST


def test_ids_unique_and_no_weight_ties(task: AircraftInspection) -> None:
    cases = task.cases()
    assert len({c.inputs["aircraft_id"] for c in cases}) == len(cases)
    for c in cases:
        spec = rules.tenths(c.inputs["spec_weight_kg"])
        assert abs(rules.tenths(c.inputs["measured_weight_kg"]) - spec) * 50 != spec
        assert task.check_inputs(c.inputs) is None
        assert c.ground_truth == rules.ground_truth(c.case_id, c.inputs)


def test_class_balance(task: AircraftInspection) -> None:
    cases = task.cases()
    n = len(cases)

    def share(field: str, value: Any) -> float:
        return sum(c.ground_truth[field] == value for c in cases) / n

    assert 0.35 <= share("aircraft_ready", True) <= 0.45
    # Every failure mode: targets 10–30 %, with a little slack for the draw.
    for field, ok in (
        ("mechanical_inspection_result", "pass"),
        ("electrical_inspection_result", "pass"),
        ("cross_check_reporting_response", "consistent"),
        ("component_incident_response", "none"),
        ("component_mismatch_response", "none"),
    ):
        assert 0.08 <= 1 - share(field, ok) <= 0.32, field
    failing = [
        sum(
            (
                c.ground_truth["mechanical_inspection_result"] == "fail",
                c.ground_truth["electrical_inspection_result"] == "fail",
                c.ground_truth["cross_check_reporting_response"] == "inconsistent",
            )
        )
        for c in cases
    ]
    assert sum(f >= 2 for f in failing) / n >= 0.05
    for split in ("train", "val", "test"):
        values = {json.dumps(c.ground_truth["aircraft_ready"]) for c in task.cases(split)}
        assert values == {"true", "false"}


# -- cases files ---------------------------------------------------------------------------------


def test_cases_file_round_trip(task: AircraftInspection, tmp_path: Path) -> None:
    path = tmp_path / "cases.jsonl"
    assert task.export_cases(path, "val") == 100
    assert task.load_cases(path) == task.cases("val")


@pytest.mark.parametrize(
    ("breakage", "field"),
    [
        (lambda x: x.pop("battery_voltage_v"), "battery_voltage_v"),
        (lambda x: x.update(open_write_ups="2"), "open_write_ups"),
        (lambda x: x.update(continuity=["shorted"]), "continuity"),
    ],
)
def test_load_cases_bad_line_names_file_line_field(
    task: AircraftInspection, tmp_path: Path, breakage: Any, field: str
) -> None:
    good, bad = (c.to_json() for c in task.cases("test")[:2])
    breakage(bad["inputs"])
    path = tmp_path / "cases.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"cases\.jsonl:2: field 'inputs': .*'{field}'"):
        task.load_cases(path)
