"""Pre-flight airworthiness inspection: the fixture environment, the task and its expert program.

Each case is one aircraft (:mod:`.cases` generates them). The tools replay its recorded
observations; they never say "pass" or "fail" — the agent must apply the SOP's rules
(:mod:`.rules`) to the numbers.
"""

from __future__ import annotations

import random
from importlib import resources
from typing import Any

from mtrl_local.env import FixtureEnvironment, Message, ToolError, tool
from sopbench.aircraft_inspection import rules
from sopbench.aircraft_inspection.cases import (
    CIRCUIT_RECORDED,
    DamageCondition,
    generate_inputs,
    recombined_inputs,
)
from sopbench.aircraft_inspection.rules import (
    AVIONICS_PASS,
    DAMAGE_CONDITIONS,
    MAX_CIRCUIT_READINGS,
    OUTPUT_FIELDS,
    continuity_passes,
    discrepancy_id,
    incident_id,
    tenths,
    voltage_ok,
    weight_within_tolerance,
)
from sopbench.base import Answer, Call, Case, ExpertProgram, Noise, Task, parse_json

SOP = resources.files(__package__).joinpath("sop.md").read_text(encoding="utf-8")


class AircraftInspectionEnv(FixtureEnvironment):
    """One aircraft on the ramp: read-only instruments replayed from the case's recorded data."""

    def setup(self, case: Case, seed: int) -> None:
        x = case.inputs
        aid = x["aircraft_id"]
        key = {"aircraft_id": aid}
        self.record(
            "lookup_aircraft",
            key,
            {
                "aircraft_id": aid,
                "tail_number": x["tail_number"],
                "model": x["model"],
                "component": x["component"],
                "registered_serial": x["registered_serial"],
                "spec_weight_kg": x["spec_weight_kg"],
                "min_battery_voltage_v": x["min_battery_voltage_v"],
            },
        )
        self.record(
            "inspect_component",
            key,
            {
                "component": x["component"],
                "serial_plate": x["serial_plate"],
                "measured_weight_kg": x["measured_weight_kg"],
                "condition": x["condition"],
            },
        )
        self.record("measure_battery", key, {"voltage_v": x["battery_voltage_v"]})
        readings = list(x["continuity"])
        readings += [readings[-1]] * (CIRCUIT_RECORDED - len(readings))
        self.record(
            "test_circuit",
            key,
            *({"reading": i, "continuity": r} for i, r in enumerate(readings, 1)),
        )
        self.record("check_avionics", key, {"self_test": x["avionics"]})
        self.record(
            "get_maintenance_log",
            key,
            {"logged_serial": x["logged_serial"], "open_write_ups": x["open_write_ups"]},
        )
        for condition in DAMAGE_CONDITIONS:
            self.record(
                "file_incident_report",
                {"aircraft_id": aid, "condition": condition},
                {"incident_id": incident_id(case.case_id, aid, condition)},
            )

    def initial_messages(self, case: Case) -> list[Message]:
        aid = case.inputs["aircraft_id"]
        request = (
            f"Inspect aircraft {aid} before its next flight, following the SOP. Finish with one "
            "JSON object inside <final_response></final_response> with these fields: "
            "tail_number (as in the registry), "
            'mechanical_inspection_result ("pass" or "fail"), '
            'electrical_inspection_result ("pass" or "fail"), '
            'component_incident_response (the incident id, or "none"), '
            'component_mismatch_response (the discrepancy id, or "none"), '
            'cross_check_reporting_response ("consistent" or "inconsistent"), '
            "aircraft_ready (true or false)."
        )
        return [{"role": "system", "content": SOP}, {"role": "user", "content": request}]

    @tool
    def lookup_aircraft(self, aircraft_id: str) -> dict[str, Any]:
        """Registry record of an aircraft: tail number, model, inspected component, its registered
        serial and spec weight, and the model's minimum battery voltage.

        Args:
            aircraft_id: The aircraft id, e.g. "AC-48213".
        """
        return self.replay("lookup_aircraft", aircraft_id=aircraft_id)

    @tool
    def inspect_component(self, aircraft_id: str) -> dict[str, Any]:
        """Physical inspection of the component: serial plate, measured weight and condition.

        Args:
            aircraft_id: The aircraft id.
        """
        return self.replay("inspect_component", aircraft_id=aircraft_id)

    @tool
    def measure_battery(self, aircraft_id: str) -> dict[str, Any]:
        """Battery voltage reading under the standard test load.

        Args:
            aircraft_id: The aircraft id.
        """
        return self.replay("measure_battery", aircraft_id=aircraft_id)

    @tool
    def test_circuit(self, aircraft_id: str) -> dict[str, Any]:
        """One continuity reading of the main circuit; each call takes a new reading.

        Args:
            aircraft_id: The aircraft id.
        """
        return self.replay("test_circuit", aircraft_id=aircraft_id)

    @tool
    def check_avionics(self, aircraft_id: str) -> dict[str, Any]:
        """Avionics self-test status: "PASS" or a fault code.

        Args:
            aircraft_id: The aircraft id.
        """
        return self.replay("check_avionics", aircraft_id=aircraft_id)

    @tool
    def get_maintenance_log(self, aircraft_id: str) -> dict[str, Any]:
        """Latest maintenance-log entry: the component serial logged and the open write-ups.

        Args:
            aircraft_id: The aircraft id.
        """
        return self.replay("get_maintenance_log", aircraft_id=aircraft_id)

    @tool
    def file_incident_report(self, aircraft_id: str, condition: DamageCondition) -> dict[str, Any]:
        """File an incident report for a damaged component; returns the incident id.

        Args:
            aircraft_id: The aircraft id.
            condition: The damage observed on the component.
        """
        return self.replay("file_incident_report", aircraft_id=aircraft_id, condition=condition)

    @tool
    def report_discrepancy(self, aircraft_id: str, observed_serial: str) -> dict[str, Any]:
        """Report a component whose serial plate differs from the registry; returns the
        discrepancy id.

        Args:
            aircraft_id: The aircraft id.
            observed_serial: The serial read on the component's plate.
        """
        # Any serial gets an id (an error here would tell the agent it chose wrong), but only
        # the one on the plate gives the id in the ground truth.
        if aircraft_id != self.case.inputs["aircraft_id"]:
            raise ToolError(
                f"no record found for report_discrepancy(aircraft_id={aircraft_id!r}, "
                f"observed_serial={observed_serial!r})"
            )
        if not observed_serial.strip():
            raise ToolError("observed_serial is empty")
        return {"discrepancy_id": discrepancy_id(self.case.case_id, aircraft_id, observed_serial)}


def _weight_ok(measured: Any, spec: Any) -> bool:
    if not isinstance(measured, (int, float)) or not isinstance(spec, (int, float)):
        return True  # nothing read: assume the usual outcome
    return weight_within_tolerance(tenths(measured), tenths(spec))


def _voltage_ok(reading: Any, minimum: Any) -> bool:
    if not isinstance(reading, (int, float)) or not isinstance(minimum, (int, float)):
        return True
    return voltage_ok(tenths(reading), tenths(minimum))


class AircraftInspection(Task):
    """Pre-flight airworthiness: identification, mechanical and electrical checks, reports."""

    name = "aircraft_inspection"
    title = "Pre-flight airworthiness inspection"
    sop = SOP
    output_fields = OUTPUT_FIELDS
    outcome_field = "aircraft_ready"
    reference_turns = 10
    n_cases = 500

    def generate(
        self, index: int, rng: random.Random
    ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        case_id = f"{self.name}-{index:03d}"
        inputs = generate_inputs(index, rng)
        return case_id, inputs, rules.ground_truth(case_id, inputs)

    def make_env(self) -> AircraftInspectionEnv:
        return AircraftInspectionEnv()

    def check_inputs(self, inputs: dict[str, Any]) -> str | None:
        return rules.check_inputs(inputs)

    def guess_answer(self, case: Case) -> dict[str, Any]:
        """The early-stopping expert's answer: the usual verdicts, never self-contradictory.

        The generic guess (each field's most common value) says "pass, pass, consistent" with
        ``aircraft_ready: false`` (each field's majority alone), which contradicts SOP step 6: ready
        means all three pass, and a model trained on such answers learns to contradict itself
        (docs/results.md). Here ``aircraft_ready`` follows the guessed verdicts, and the tail number
        is that of the aircraft the expert is inspecting (the generic guess wrote one fixed tail
        number into each early answer, which teaches reciting instead of copying).
        """
        guess = dict(self._majority_answer())
        guess["tail_number"] = case.inputs["tail_number"]
        guess["aircraft_ready"] = (
            guess["mechanical_inspection_result"] == "pass"
            and guess["electrical_inspection_result"] == "pass"
            and guess["cross_check_reporting_response"] == "consistent"
        )
        return guess

    def recombined_case(self, cases: list[Case], rng: random.Random, index: int) -> Case:
        """A case recombined from three of ``cases`` (:func:`recombined_inputs`), with its
        ground truth from the rules; ``index`` names it (``{task}-mix-{index}``)."""
        a, b, c = (rng.choice(cases) for _ in range(3))
        inputs = recombined_inputs(a.inputs, b.inputs, c.inputs, rng)
        case_id = f"{self.name}-mix-{index}"
        return Case(self.name, case_id, a.split, inputs, rules.ground_truth(case_id, inputs))

    def expert(self, case: Case, noise: Noise) -> ExpertProgram:
        """Walk the SOP reading only tool results; with noise, skip checks and misread values."""
        arg = {"aircraft_id": case.inputs["aircraft_id"]}
        reg = parse_json((yield Call("lookup_aircraft", arg))) or {}
        comp = parse_json((yield Call("inspect_component", arg))) or {}
        observed = noise.misread(comp.get("serial_plate"))
        mismatch = observed is not None and observed != reg.get("registered_serial")
        condition = comp.get("condition")
        damaged = condition in DAMAGE_CONDITIONS
        weight_ok = _weight_ok(
            noise.misread(comp.get("measured_weight_kg")), noise.misread(reg.get("spec_weight_kg"))
        )
        mechanical = not mismatch and weight_ok and not damaged

        battery_ok = True  # a skipped measurement is guessed fine: batteries usually are
        if not noise.happens("skip_step", scale=0.5):
            battery = parse_json((yield Call("measure_battery", arg))) or {}
            battery_ok = _voltage_ok(
                noise.misread(battery.get("voltage_v")), reg.get("min_battery_voltage_v")
            )
        readings: list[str] = []
        assumed_closed = False
        while True:
            reading = parse_json((yield Call("test_circuit", arg))) or {}
            readings.append(reading.get("continuity", "closed"))
            if readings[-1] != "intermittent" or len(readings) >= MAX_CIRCUIT_READINGS:
                break
            if noise.happens("skip_step"):
                assumed_closed = True  # the sloppy expert takes intermittent as good enough
                break
        circuit_ok = assumed_closed or continuity_passes(readings)
        avionics_ok = True
        if not noise.happens("skip_step"):
            avionics = parse_json((yield Call("check_avionics", arg))) or {}
            avionics_ok = avionics.get("self_test", AVIONICS_PASS) == AVIONICS_PASS
        electrical = battery_ok and circuit_ok and avionics_ok

        consistent = True
        if not noise.happens("skip_step"):
            log = parse_json((yield Call("get_maintenance_log", arg))) or {}
            consistent = (
                log.get("logged_serial", observed) == observed
                and noise.misread(log.get("open_write_ups", 0)) == 0
            )

        incident = "none"
        if damaged:
            args = {**arg, "condition": condition}
            filed = parse_json((yield Call("file_incident_report", args))) or {}
            incident = filed.get("incident_id", "none")
        discrepancy = "none"
        if mismatch:
            args = {**arg, "observed_serial": observed}
            reported = parse_json((yield Call("report_discrepancy", args))) or {}
            discrepancy = reported.get("discrepancy_id", "none")

        yield Answer(
            {
                "tail_number": noise.misread(reg.get("tail_number", "")),
                "mechanical_inspection_result": "pass" if mechanical else "fail",
                "electrical_inspection_result": "pass" if electrical else "fail",
                "component_incident_response": incident,
                "component_mismatch_response": discrepancy,
                "cross_check_reporting_response": "consistent" if consistent else "inconsistent",
                "aircraft_ready": mechanical and electrical and consistent,
            }
        )
