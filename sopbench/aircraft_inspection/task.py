"""Pre-flight airworthiness inspection: generator, fixture environment and reference policy.

Each case is one aircraft: a registry record, a component inspection, battery, circuit and avionics
readings, and a maintenance-log entry. The tools replay those recorded observations; they never
say "pass" or "fail" — the agent must apply the SOP's rules (:mod:`.rules`) to the numbers.

Generation is shaped for RL on a small model: about 40 % of aircraft are airworthy, the rest carry
one to three faults drawn uniformly from eight, and passing values are often placed just inside a
threshold (weight 1.5–1.9 % off spec, voltage at or just above the minimum, a circuit that closes
on its third reading) while failing ones often sit just outside it (2.1–2.6 %), so a rule applied
loosely shows up in the score.
"""

from __future__ import annotations

import random
from importlib import resources
from typing import Any, Literal

from mtrl_local.env import FixtureEnvironment, Message, ToolError, tool
from sopbench.aircraft_inspection import rules
from sopbench.aircraft_inspection.rules import (
    ACCEPTABLE_CONDITIONS,
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

DamageCondition = Literal["corrosion", "crack", "impact damage"]

#: Aircraft models and their minimum battery voltage in tenths of a volt (our own, fictional).
MODELS = (
    ("Corvan C-210", 240),
    ("Meridian M-40", 235),
    ("Kestrel K-90", 245),
    ("Talon T-6X", 250),
    ("Brisa B-12", 118),
    ("Skiff S-3", 121),
)
#: Inspected components and the range of their spec weight in tenths of a kg. The lower bound
#: of 15 kg keeps 2 % of spec at three tenths or more, so near-threshold weights stay distinct.
COMPONENTS = (
    ("main gear actuator", 200, 600),
    ("nose gear strut", 300, 900),
    ("starter generator", 150, 300),
    ("engine mount assembly", 250, 550),
    ("flap drive gearbox", 150, 400),
    ("auxiliary power unit", 400, 1500),
)
FAULTS = (
    "serial_mismatch",
    "weight",
    "damage",
    "low_voltage",
    "continuity",
    "avionics",
    "log_serial",
    "write_ups",
)
#: Share of cases generated without any fault (aircraft_ready true).
READY_SHARE = 0.40
#: How many faults a faulty aircraft has, and how often.
FAULT_COUNTS = ((1, 2, 3), (65, 28, 7))
AVIONICS_UNITS = ("ADC", "AHRS", "GPS", "XPDR", "COM", "FMS")
TAIL_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I or O, as on real registrations
#: Readings recorded for ``test_circuit``: more than the SOP allows, so extra retests answer too.
CIRCUIT_RECORDED = MAX_CIRCUIT_READINGS + 3


def _aircraft_id(index: int) -> str:
    # An affine permutation of 0..89999 (36761 is coprime to 90000): unique ids, not sequential.
    return f"AC-{10000 + (index * 36761 + 52) % 90000}"


def _serial(rng: random.Random) -> str:
    return f"SN-{rng.randint(10000, 99999)}"


def _near_serial(rng: random.Random, serial: str) -> str:
    """``serial`` with one digit changed: the mismatch a careless reader misses."""
    prefix, digits = serial[:3], list(serial[3:])
    i = rng.randrange(len(digits))
    digits[i] = rng.choice([d for d in "0123456789" if d != digits[i]])
    return prefix + "".join(digits)


def _tail_number(rng: random.Random) -> str:
    return f"N{rng.randint(100, 999)}{rng.choice(TAIL_LETTERS)}{rng.choice(TAIL_LETTERS)}"


def _measured_weight(rng: random.Random, spec_t: int, ok: bool) -> int:
    """A measured weight (tenths) on the intended side of the 2 % rule, never on the boundary."""
    if ok:
        pct_h = rng.randint(150, 190) if rng.random() < 0.4 else rng.randint(0, 140)
    else:
        pct_h = rng.randint(210, 260) if rng.random() < 0.5 else rng.randint(300, 800)
    diff = (spec_t * pct_h + 5000) // 10000  # hundredths of a percent → tenths, rounded
    # Rounding to tenths can land on or across the boundary for light components: step back.
    while diff * 50 == spec_t or weight_within_tolerance(spec_t + diff, spec_t) != ok:
        diff += -1 if ok else 1
    return spec_t + diff if rng.random() < 0.5 else spec_t - diff


def _voltage(rng: random.Random, minimum_t: int, ok: bool) -> int:
    if ok:
        return minimum_t + (0 if rng.random() < 0.08 else rng.randint(1, 30))
    return minimum_t - (rng.randint(1, 4) if rng.random() < 0.5 else rng.randint(5, 30))


def _continuity(rng: random.Random, ok: bool) -> list[str]:
    if ok:
        passing = (["closed"], ["intermittent", "closed"], ["intermittent"] * 2 + ["closed"])
        return list(rng.choices(passing, weights=(60, 25, 15))[0])
    failing = (
        ["open"],
        ["intermittent", "open"],
        ["intermittent"] * 2 + ["open"],
        ["intermittent"] * 3 + ["closed"],  # closes only on a fourth reading: too late
        ["intermittent"] * 3,
    )
    return list(rng.choices(failing, weights=(35, 20, 10, 20, 15))[0])


def generate_inputs(index: int, rng: random.Random) -> dict[str, Any]:
    """The recorded data of case ``index`` (what the tools will show), from ``rng`` only."""
    model, min_voltage_t = rng.choice(MODELS)
    component, lo, hi = rng.choice(COMPONENTS)
    spec_t = rng.randint(lo, hi)
    registered = _serial(rng)
    faults: set[str] = set()
    if rng.random() >= READY_SHARE:
        faults = set(rng.sample(FAULTS, rng.choices(*FAULT_COUNTS)[0]))
    serial_plate = registered
    if "serial_mismatch" in faults:
        while serial_plate == registered:
            serial_plate = _near_serial(rng, registered) if rng.random() < 0.5 else _serial(rng)
    if "damage" in faults:
        condition = rng.choice(DAMAGE_CONDITIONS)
    else:
        condition = rng.choices(ACCEPTABLE_CONDITIONS, weights=(65, 35))[0]
    logged = serial_plate
    if "log_serial" in faults:
        # A swapped part nobody logged, or a typo in the log.
        logged = registered if serial_plate != registered else _near_serial(rng, serial_plate)
    avionics = AVIONICS_PASS
    if "avionics" in faults:
        avionics = f"{rng.choice(AVIONICS_UNITS)}-{rng.randint(100, 999)}"
    return {
        "aircraft_id": _aircraft_id(index),
        "tail_number": _tail_number(rng),
        "model": model,
        "component": component,
        "registered_serial": registered,
        "spec_weight_kg": spec_t / 10,
        "min_battery_voltage_v": min_voltage_t / 10,
        "serial_plate": serial_plate,
        "measured_weight_kg": _measured_weight(rng, spec_t, "weight" not in faults) / 10,
        "condition": condition,
        "battery_voltage_v": _voltage(rng, min_voltage_t, "low_voltage" not in faults) / 10,
        "continuity": _continuity(rng, "continuity" not in faults),
        "avionics": avionics,
        "logged_serial": logged,
        "open_write_ups": rng.randint(1, 3) if "write_ups" in faults else 0,
    }


#: The recorded fields that travel with an aircraft's identity in :func:`recombined_inputs`.
_IDENTITY_GROUP = (
    "aircraft_id",
    "tail_number",
    "component",
    "registered_serial",
    "spec_weight_kg",
    "serial_plate",
    "measured_weight_kg",
    "condition",
)


def recombined_inputs(
    identity: dict[str, Any], electrical: dict[str, Any], log: dict[str, Any], rng: random.Random
) -> dict[str, Any]:
    """A new aircraft's recorded data from three recorded ones (a build-time augmentation).

    ``identity`` gives the aircraft, its component and the mechanical evidence (serial plate,
    weight, condition); ``electrical`` the model with its minimum voltage and the battery,
    circuit and avionics readings; ``log`` the write-ups and whether the logged serial matches
    the plate (re-derived against the new plate, as the generator does). Each group keeps its
    own pairing (a measured weight with its spec, a voltage with its model's minimum), so the
    verdicts of the result are those of the three sources, in combinations no single recorded
    case shows: a model that must tell them apart has to read each group's evidence.
    """
    plate = identity["serial_plate"]
    logged = plate
    if log["logged_serial"] != log["serial_plate"]:
        registered = identity["registered_serial"]
        logged = registered if plate != registered else _near_serial(rng, plate)
    return {
        **{k: identity[k] for k in _IDENTITY_GROUP},
        **{k: electrical[k] for k in ("model", "min_battery_voltage_v", "battery_voltage_v")},
        "continuity": list(electrical["continuity"]),
        "avionics": electrical["avionics"],
        "logged_serial": logged,
        "open_write_ups": log["open_write_ups"],
    }


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
