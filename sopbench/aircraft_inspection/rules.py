"""The SOP's rules as pure functions: the one place where ground truth is decided.

The generator computes every case's ground truth with :func:`ground_truth`, and the reference
policy applies the same predicates to the values it read from the tools — so a reference TSR of
1.0 shows that the tools expose everything the rules need. Weights and voltages are compared in
integer tenths (the tools show one decimal), so no float rounding can flip a verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mtrl_local.env import stable_id

ACCEPTABLE_CONDITIONS = ("no visible damage", "minor wear")
DAMAGE_CONDITIONS = ("corrosion", "crack", "impact damage")
CONDITIONS = ACCEPTABLE_CONDITIONS + DAMAGE_CONDITIONS
CONTINUITY_READINGS = ("closed", "open", "intermittent")
#: SOP step 3b: readings taken in total before an intermittent circuit fails.
MAX_CIRCUIT_READINGS = 3
AVIONICS_PASS = "PASS"

OUTPUT_FIELDS = (
    "tail_number",
    "mechanical_inspection_result",
    "electrical_inspection_result",
    "component_incident_response",
    "component_mismatch_response",
    "cross_check_reporting_response",
    "aircraft_ready",
)


def tenths(value: float) -> int:
    """A one-decimal display value (kg, V) as an exact integer number of tenths."""
    return round(value * 10)


def weight_within_tolerance(measured_t: int, spec_t: int) -> bool:
    """SOP 2b: ``|measured − spec| ≤ 2 % of spec``, on tenths (``× 50`` keeps it integer)."""
    return abs(measured_t - spec_t) * 50 <= spec_t


def voltage_ok(reading_t: int, minimum_t: int) -> bool:
    """SOP 3a: at least the model's minimum; a reading equal to the minimum passes."""
    return reading_t >= minimum_t


def continuity_passes(readings: Sequence[str]) -> bool:
    """SOP 3b: the first non-intermittent reading decides, within the first three readings."""
    for reading in readings[:MAX_CIRCUIT_READINGS]:
        if reading != "intermittent":
            return reading == "closed"
    return False


def incident_id(case_id: str, aircraft_id: str, condition: str) -> str:
    """The id ``file_incident_report`` returns: only the observed condition gives the truth."""
    return stable_id("INC", case_id, aircraft_id, condition)


def discrepancy_id(case_id: str, aircraft_id: str, observed_serial: str) -> str:
    """The id ``report_discrepancy`` returns: only the observed serial gives the truth."""
    return stable_id("DR", case_id, aircraft_id, observed_serial.strip())


def ground_truth(case_id: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The output fields that follow from a case's recorded data under SOP steps 1–6."""
    mismatch = inputs["serial_plate"] != inputs["registered_serial"]
    damaged = inputs["condition"] in DAMAGE_CONDITIONS
    mechanical = (
        not mismatch
        and weight_within_tolerance(
            tenths(inputs["measured_weight_kg"]), tenths(inputs["spec_weight_kg"])
        )
        and inputs["condition"] in ACCEPTABLE_CONDITIONS
    )
    electrical = (
        voltage_ok(tenths(inputs["battery_voltage_v"]), tenths(inputs["min_battery_voltage_v"]))
        and continuity_passes(inputs["continuity"])
        and inputs["avionics"] == AVIONICS_PASS
    )
    consistent = inputs["logged_serial"] == inputs["serial_plate"] and inputs["open_write_ups"] == 0
    aid = inputs["aircraft_id"]
    return {
        "tail_number": inputs["tail_number"],
        "mechanical_inspection_result": "pass" if mechanical else "fail",
        "electrical_inspection_result": "pass" if electrical else "fail",
        "component_incident_response": (
            incident_id(case_id, aid, inputs["condition"]) if damaged else "none"
        ),
        "component_mismatch_response": (
            discrepancy_id(case_id, aid, inputs["serial_plate"]) if mismatch else "none"
        ),
        "cross_check_reporting_response": "consistent" if consistent else "inconsistent",
        "aircraft_ready": mechanical and electrical and consistent,
    }


#: Keys of a case's ``inputs`` and the JSON types they must have (cases files).
INPUT_TYPES: dict[str, tuple[type, ...]] = {
    "aircraft_id": (str,),
    "tail_number": (str,),
    "model": (str,),
    "component": (str,),
    "registered_serial": (str,),
    "spec_weight_kg": (int, float),
    "min_battery_voltage_v": (int, float),
    "serial_plate": (str,),
    "measured_weight_kg": (int, float),
    "condition": (str,),
    "battery_voltage_v": (int, float),
    "continuity": (list,),
    "avionics": (str,),
    "logged_serial": (str,),
    "open_write_ups": (int,),
}


_KIND_NAMES = {
    (str,): "a string",
    (int,): "an integer",
    (int, float): "a number",
    (list,): "a list",
}


def check_inputs(inputs: Mapping[str, Any]) -> str | None:
    """Why ``inputs`` cannot drive an episode (first problem found), or ``None``."""
    for key, kinds in INPUT_TYPES.items():
        if key not in inputs:
            return f"missing key '{key}'"
        value = inputs[key]
        if isinstance(value, bool) or not isinstance(value, kinds):
            return f"'{key}' must be {_KIND_NAMES[kinds]}, got {type(value).__name__}"
    for key in ("spec_weight_kg", "min_battery_voltage_v", "measured_weight_kg"):
        if inputs[key] <= 0:
            return f"'{key}' must be positive"
    if inputs["condition"] not in CONDITIONS:
        return f"'condition' must be one of {', '.join(CONDITIONS)}"
    readings = inputs["continuity"]
    if not readings or any(r not in CONTINUITY_READINGS for r in readings):
        return f"'continuity' must be a non-empty list of {', '.join(CONTINUITY_READINGS)}"
    if inputs["open_write_ups"] < 0:
        return "'open_write_ups' must be >= 0"
    return None
