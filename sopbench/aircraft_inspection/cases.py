"""Aircraft cases: the seeded generator of aircraft and their recorded observations.

Each case is one aircraft: a registry record, a component inspection, battery, circuit and avionics
readings, and a maintenance-log entry. Generation is shaped for RL on a small model: about 40 % of
aircraft are airworthy, the rest carry one to three faults drawn uniformly from eight, and
passing values are often placed just inside a threshold (weight 1.5–1.9 % off spec, voltage at or
just above the minimum, a circuit that closes on its third reading) while failing ones often sit
just outside it (2.1–2.6 %), so a rule applied loosely shows up in the score.
"""

from __future__ import annotations

import random
from typing import Any, Literal

from sopbench.aircraft_inspection.rules import (
    ACCEPTABLE_CONDITIONS,
    AVIONICS_PASS,
    DAMAGE_CONDITIONS,
    MAX_CIRCUIT_READINGS,
    weight_within_tolerance,
)

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
