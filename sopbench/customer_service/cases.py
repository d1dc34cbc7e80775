"""Customer service cases: the SOP's rules as pure functions, the seeded generator, input checks.

The ground truth is computed from a case's data by :func:`resolution_status` — the same rules the
SOP states and the reference policy applies to tool results — never from the scenario the
generator aimed for. The generator only picks scenarios with weights that keep every outcome
between roughly 8 % and 22 % of the cases, and adds near-threshold distractors (30 days past due,
packet loss 1.9 %, resolved outages on the reported service) so the rules must be read exactly.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any, Literal

from mtrl_local.env import stable_id

Service = Literal["internet", "tv", "phone"]
SERVICES: tuple[str, ...] = ("internet", "tv", "phone")
INACTIVE_STATUSES = ("closed", "ported_out")
ACCOUNT_STATUSES = ("active", *INACTIVE_STATUSES)
REGIONS = ("NORTH-1", "NORTH-2", "EAST-1", "EAST-2", "SOUTH-1", "WEST-1", "WEST-2", "CENTRAL-1")
LINE_FAULTS = ("drop_cable_damage", "tap_signal_loss", "water_ingress", "splitter_failure")
PLANS = ("Fibre 150", "Fibre 500", "Fibre 1000", "Cable 300", "TV Plus bundle", "Home Phone")

#: The SOP's outcomes. Each gets a share of the cases so guessing one value cannot win.
STATUSES = (
    "account_inactive",
    "authentication_failed",
    "escalated_billing",
    "known_outage",
    "no_fault_found",
    "resolved_remotely",
    "escalated_field_technician",
)
NO_TICKET = "none"
#: Billing hold: strictly more than this many days past due (SOP step 4).
BILLING_DAYS = 30
#: Healthy line (SOP step 6): downstream power within ±POWER_LIMIT dBmV, loss below LOSS_LIMIT %.
POWER_LIMIT = 8.0
LOSS_LIMIT = 2.0

#: Scenario weights for the generator (the truth is then recomputed from the data by the rules).
_SCENARIOS: tuple[tuple[str, float], ...] = (
    ("account_inactive", 0.10),
    ("authentication_failed", 0.12),
    ("escalated_billing", 0.14),
    ("known_outage", 0.16),
    ("no_fault_found", 0.12),
    ("resolved_remotely", 0.18),
    ("field_line_fault", 0.08),
    ("field_fix_failed", 0.10),
)

_FIRST = ("Maya", "Tomas", "Aisha", "Liam", "Noor", "Kenji", "Elena", "Ravi", "Grace", "Owen")
_LAST = ("Okafor", "Lindqvist", "Haddad", "Moreau", "Tanaka", "Novak", "Reyes", "Byrne", "Sato")
_COMPLAINTS: dict[str, tuple[str, ...]] = {
    "internet": (
        "My internet keeps dropping every few minutes.",
        "The broadband has been down since this morning.",
        "Web pages crawl and video calls freeze.",
    ),
    "tv": (
        "The TV box says 'no signal' on every channel.",
        "TV picture keeps freezing and pixelating.",
        "Half of my channels are missing since yesterday.",
    ),
    "phone": (
        "There is no dial tone on my home phone.",
        "Calls on the landline drop after a few seconds.",
        "My home phone line crackles so much I cannot hear anyone.",
    ),
}


# -- the SOP's rules as pure functions -------------------------------------------------------------
def line_healthy(m: dict[str, Any]) -> bool:
    """SOP step 6: modem online, downstream power within ±8.0 dBmV inclusive, loss below 2.0 %."""
    power = m.get("downstream_dbmv")
    return (
        m.get("modem_online") is True
        and isinstance(power, (int, float))
        and -POWER_LIMIT <= power <= POWER_LIMIT
        and isinstance(m.get("packet_loss_pct"), (int, float))
        and m["packet_loss_pct"] < LOSS_LIMIT
    )


def fix_action(diagnostics: dict[str, Any]) -> str:
    """SOP step 7: reboot an offline gateway, otherwise reset the line profile."""
    return "reboot_gateway" if diagnostics.get("modem_online") is False else "reset_line_profile"


def billing_hold(billing: dict[str, Any]) -> bool:
    """SOP step 4: a positive balance more than 30 days past due."""
    return billing["past_due_amount"] > 0 and billing["past_due_days"] > BILLING_DAYS


def outage_applies(outages: list[dict[str, Any]], service: str) -> bool:
    """SOP step 5: an active incident whose services include the reported one."""
    return any(o["state"] == "active" and service in o["services"] for o in outages)


def resolution_status(inputs: dict[str, Any]) -> str:
    """The final_resolution_status the SOP prescribes for a case's data."""
    request, records = inputs["request"], inputs["records"]
    if records["account"]["status"] in INACTIVE_STATUSES:
        return "account_inactive"
    if request["pin"] != records["account"]["pin"]:
        return "authentication_failed"
    if billing_hold(records["billing"]):
        return "escalated_billing"
    if outage_applies(records["outages"], request["service"]):
        return "known_outage"
    diagnostics = records["diagnostics"]
    if diagnostics["line_fault"] is not None:
        return "escalated_field_technician"
    if line_healthy(diagnostics):
        return "no_fault_found"
    return (
        "resolved_remotely" if line_healthy(records["after_fix"]) else "escalated_field_technician"
    )


def ticket_id_for(case_id: str) -> str:
    """The id ``open_ticket`` gives this case's ticket: from the case only, never the seed."""
    return stable_id("TCK", "customer_service", case_id, digits=6)


def ground_truth(case_id: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """Both output fields; no ticket may be opened before authentication succeeds."""
    status = resolution_status(inputs)
    opened = status not in ("account_inactive", "authentication_failed")
    return {
        "final_resolution_status": status,
        "ticket_id": ticket_id_for(case_id) if opened else NO_TICKET,
    }


# -- the generator -------------------------------------------------------------------------------
def _healthy_metrics(rng: random.Random, edge: bool) -> dict[str, Any]:
    # ``edge``: values on the healthy side of a threshold, so the rule must be read exactly.
    power = rng.choice([-8.0, 8.0, -7.9, 7.9]) if edge else round(rng.uniform(-6.0, 6.0), 1)
    loss = rng.choice([1.9, 1.8, 1.5]) if edge else round(rng.uniform(0.0, 1.2), 1)
    return {"modem_online": True, "downstream_dbmv": power, "packet_loss_pct": loss}


def _faulty_metrics(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["offline", "power", "loss"])
    if kind == "offline":
        return {"modem_online": False, "downstream_dbmv": None, "packet_loss_pct": 100.0}
    metrics = _healthy_metrics(rng, edge=False)
    if kind == "power":
        sign = rng.choice([-1, 1])
        metrics["downstream_dbmv"] = sign * rng.choice(
            [8.1, 8.5, 9.7, round(rng.uniform(8.1, 14), 1)]
        )
    else:
        metrics["packet_loss_pct"] = rng.choice([2.0, 2.1, round(rng.uniform(2.0, 18.0), 1)])
    return metrics


def _wrong_pin(rng: random.Random, pin: str) -> str:
    digits = list(pin)
    if rng.random() < 0.5 and digits[0] != digits[1]:
        digits[0], digits[1] = digits[1], digits[0]  # transposed digits
    else:
        i = rng.randrange(4)
        digits[i] = rng.choice([d for d in "0123456789" if d != digits[i]])
    return "".join(digits)


def _outages(rng: random.Random, service: str, applies: bool) -> list[dict[str, Any]]:
    others = [s for s in SERVICES if s != service]
    # Distractors: active incidents elsewhere, or resolved ones on this very service.
    incidents: list[dict[str, Any]] = []
    for _ in range(rng.choice([0, 1, 1, 2])):
        if rng.random() < 0.5:
            incidents.append(
                {"services": rng.sample(others, rng.choice([1, 2])), "state": "active"}
            )
        else:
            incidents.append(
                {"services": [service], "state": rng.choice(["resolved", "monitoring"])}
            )
    if applies:
        extra = rng.sample(others, rng.choice([0, 1]))
        incidents.insert(
            rng.randrange(len(incidents) + 1),
            {"services": sorted([service, *extra]), "state": "active"},
        )
    for inc in incidents:
        inc["incident_id"] = f"OUT-{rng.randrange(10**4):04d}"
        inc["opened_hours_ago"] = rng.randrange(1, 72)
    return incidents


def generate_case(index: int, rng: random.Random) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """One case drawn from ``rng`` only: the customer's request and the back-end records."""
    scenario = rng.choices([s for s, _ in _SCENARIOS], weights=[w for _, w in _SCENARIOS])[0]
    service = rng.choice(SERVICES)
    pin = f"{rng.randrange(10**4):04d}"
    account_id = f"ACC-{rng.randrange(10**4, 10**5)}"
    holder = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    status = rng.choice(INACTIVE_STATUSES) if scenario == "account_inactive" else "active"
    given_pin = _wrong_pin(rng, pin) if scenario == "authentication_failed" else pin

    if scenario == "escalated_billing":
        billing = {
            "past_due_amount": round(rng.uniform(15, 320), 2),
            "past_due_days": rng.choice([31, 32, rng.randrange(31, 90)]),
        }
    elif rng.random() < 0.5:
        billing = {"past_due_amount": 0.0, "past_due_days": 0}
    else:  # a balance that is due but not yet a hold, often right at the threshold
        billing = {
            "past_due_amount": round(rng.uniform(15, 320), 2),
            "past_due_days": rng.choice([30, 29, rng.randrange(1, 31)]),
        }
    billing["autopay"] = rng.random() < 0.4

    # An outage on the billing path tests that step 4 comes before step 5.
    applies = scenario == "known_outage" or (scenario == "escalated_billing" and rng.random() < 0.3)
    outages = _outages(rng, service, applies)

    line_fault: str | None = None
    if scenario == "no_fault_found":
        diagnostics = _healthy_metrics(rng, edge=rng.random() < 0.5)
    elif scenario == "field_line_fault":
        diagnostics = rng.choice([_faulty_metrics(rng), _healthy_metrics(rng, edge=False)])
        line_fault = rng.choice(LINE_FAULTS)
    elif scenario in ("resolved_remotely", "field_fix_failed"):
        diagnostics = _faulty_metrics(rng)
    else:
        diagnostics = rng.choice([_faulty_metrics(rng), _healthy_metrics(rng, edge=False)])
    diagnostics["line_fault"] = line_fault
    if scenario == "field_fix_failed":
        after_fix = _faulty_metrics(rng)
    else:
        after_fix = _healthy_metrics(rng, edge=rng.random() < 0.3)

    services = sorted({service, *rng.sample(SERVICES, rng.randrange(0, 3))})
    inputs = {
        "request": {
            "customer_name": holder,
            "account_id": account_id,
            "pin": given_pin,
            "service": service,
            "complaint": rng.choice(_COMPLAINTS[service]),
        },
        "records": {
            "account": {
                "account_id": account_id,
                "holder": holder,
                "status": status,
                "pin": pin,
                "region": rng.choice(REGIONS),
                "plan": rng.choice(PLANS),
                "services": services,
            },
            "billing": billing,
            "outages": outages,
            "diagnostics": diagnostics,
            "after_fix": after_fix,
        },
    }
    case_id = f"cs-{index:04d}"
    return case_id, inputs, ground_truth(case_id, inputs)


def _fullmatch(pattern: re.Pattern[str]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and pattern.fullmatch(v) is not None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: What the environment reads from a case's inputs, by dotted path, and the check on each value.
_INPUT_CHECKS: tuple[tuple[str, Callable[[Any], bool]], ...] = (
    ("request.account_id", _fullmatch(re.compile(r"ACC-\d{5}"))),
    ("request.pin", _fullmatch(re.compile(r"\d{4}"))),
    ("request.service", lambda v: v in SERVICES),
    ("request.customer_name", lambda v: isinstance(v, str)),
    ("request.complaint", lambda v: isinstance(v, str)),
    ("records.account.account_id", _fullmatch(re.compile(r"ACC-\d{5}"))),
    ("records.account.status", lambda v: v in ACCOUNT_STATUSES),
    ("records.account.pin", _fullmatch(re.compile(r"\d{4}"))),
    ("records.account.region", lambda v: v in REGIONS),
    ("records.account.services", lambda v: isinstance(v, list)),
    ("records.billing.past_due_amount", _is_number),
    ("records.billing.past_due_days", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    ("records.outages", lambda v: isinstance(v, list)),
    ("records.diagnostics.modem_online", lambda v: isinstance(v, bool)),
    ("records.diagnostics.packet_loss_pct", _is_number),
    ("records.after_fix.modem_online", lambda v: isinstance(v, bool)),
    ("records.after_fix.packet_loss_pct", _is_number),
)
_MISSING = object()


def _at(obj: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return _MISSING
        obj = obj[key]
    return obj


def check_case_inputs(inputs: dict[str, Any]) -> str | None:
    """Why a cases-file ``inputs`` object cannot drive the environment (names the field)."""
    for path, ok in _INPUT_CHECKS:
        value = _at(inputs, path)
        if value is _MISSING:
            return f"'{path}' is missing"
        if not ok(value):
            return f"'{path}' has an unusable value {value!r}"
    if inputs["records"]["account"]["account_id"] != inputs["request"]["account_id"]:
        return "'records.account.account_id' differs from 'request.account_id'"
    for i, incident in enumerate(inputs["records"]["outages"]):
        if not (isinstance(incident, dict) and isinstance(incident.get("services"), list)):
            return f"'records.outages[{i}]' needs 'services' (a list)"
        if "state" not in incident:
            return f"'records.outages[{i}].state' is missing"
    return None
