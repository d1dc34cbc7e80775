"""The customer_service task: rules, token flow, teardown, noise, balance and the cases file."""

from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mtrl_local.env import Episode, SandboxEnvironment, render_tool_call
from mtrl_local.errors import UserError
from mtrl_local.plugins import load_task
from sopbench.base import Case
from sopbench.customer_service import CustomerService
from sopbench.customer_service.cases import STATUSES, ground_truth, resolution_status

#: sha256 of all cases (json.dumps, sort_keys): a change to the generator must be deliberate.
GOLDEN_DIGEST = "fb943b917383784a04416ef0f8b92dec69c48bc33758a502abc4e760430a556e"


@pytest.fixture(scope="module")
def task() -> CustomerService:
    t = load_task("customer_service")
    assert isinstance(t, CustomerService)
    return t


def _case_with_ticket(task: CustomerService) -> Case:
    """The first case whose walkthrough goes past authentication (so a session and ticket exist)."""
    return next(c for c in task.cases("test") if c.ground_truth["ticket_id"] != "none")


def _login(case: Case) -> str:
    """The authenticate call the customer's message allows (the right PIN or the wrong one)."""
    request = case.inputs["request"]
    return render_tool_call(
        "authenticate", {"account_id": request["account_id"], "pin": request["pin"]}
    )


def _tool_content(messages: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return json.loads(next(m["content"] for m in messages if m.get("name") == name))


def _hand_made() -> dict[str, Any]:
    """A case's inputs whose line is faulty but fixable: the status should be resolved_remotely."""
    return {
        "request": {
            "customer_name": "Test Person",
            "account_id": "ACC-12345",
            "pin": "0420",
            "service": "internet",
            "complaint": "slow",
        },
        "records": {
            "account": {
                "account_id": "ACC-12345",
                "holder": "Test Person",
                "status": "active",
                "pin": "0420",
                "region": "EAST-1",
                "plan": "Fibre 500",
                "services": ["internet"],
            },
            "billing": {"past_due_amount": 0.0, "past_due_days": 0, "autopay": False},
            "outages": [],
            "diagnostics": {
                "modem_online": True,
                "downstream_dbmv": 2.0,
                "packet_loss_pct": 2.0,
                "line_fault": None,
            },
            "after_fix": {"modem_online": True, "downstream_dbmv": -8.0, "packet_loss_pct": 1.9},
        },
    }


def test_validate_passes_with_splits_and_reference_tsr(task: CustomerService) -> None:
    report = task.validate()
    assert report.ok, report.problems
    assert report.split_sizes == {"train": 300, "val": 100, "test": 100}
    assert report.reference_tsr == 1.0
    assert report.reference_turns == task.reference_turns == 9
    assert task.max_turns == 14
    assert len(task.make_env().tools) <= 8


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({}, "resolved_remotely"),
        ({"account.status": "ported_out"}, "account_inactive"),
        ({"account.status": "closed", "request.pin": "9999"}, "account_inactive"),
        ({"request.pin": "4020"}, "authentication_failed"),
        ({"billing.past_due_amount": 12.5, "billing.past_due_days": 31}, "escalated_billing"),
        ({"billing.past_due_amount": 12.5, "billing.past_due_days": 30}, "resolved_remotely"),
        ({"billing.past_due_amount": 0.0, "billing.past_due_days": 45}, "resolved_remotely"),
        ({"outages": [{"services": ["tv", "internet"], "state": "active"}]}, "known_outage"),
        ({"outages": [{"services": ["internet"], "state": "resolved"}]}, "resolved_remotely"),
        ({"outages": [{"services": ["phone"], "state": "active"}]}, "resolved_remotely"),
        ({"diagnostics.line_fault": "water_ingress"}, "escalated_field_technician"),
        ({"diagnostics.packet_loss_pct": 1.9}, "no_fault_found"),
        (
            {"diagnostics.downstream_dbmv": 8.1, "diagnostics.packet_loss_pct": 0.0},
            "resolved_remotely",
        ),
        ({"after_fix.downstream_dbmv": -8.1}, "escalated_field_technician"),
        ({"after_fix.modem_online": False}, "escalated_field_technician"),
        # Step order: a billing hold wins over an outage on the same service.
        (
            {
                "billing.past_due_amount": 99.0,
                "billing.past_due_days": 60,
                "outages": [{"services": ["internet"], "state": "active"}],
            },
            "escalated_billing",
        ),
    ],
)
def test_status_rule_on_hand_made_examples(edit: dict[str, Any], expected: str) -> None:
    inputs = _hand_made()
    for path, value in edit.items():
        # Paths are relative to the back-end records unless they start with "request.".
        *parents, leaf = path.split(".")
        node = inputs if parents[:1] == ["request"] else inputs["records"]
        for key in parents:
            node = node[key]
        node[leaf] = value
    assert resolution_status(inputs) == expected
    truth = ground_truth("cs-hand", inputs)
    no_ticket = expected in ("account_inactive", "authentication_failed")
    assert (truth["ticket_id"] == "none") == no_ticket


def test_made_up_session_token_is_a_counted_tool_error(task: CustomerService) -> None:
    case = _case_with_ticket(task)
    request = case.inputs["request"]
    with Episode(task.make_env(), case, seed=0, max_turns=task.max_turns) as ep:
        ep.reset()
        ep.step(_login(case))
        step = ep.step(
            render_tool_call(
                "open_ticket", {"session_token": "S-00000000", "service": request["service"]}
            )
        )
        assert step.results[0].error
        assert step.messages[0]["content"] == "error: unknown session 'S-00000000'"
        step = ep.step(render_tool_call("run_diagnostics", {"service": request["service"]}))
        assert (
            step.messages[0]["content"]
            == "error: missing argument 'session_token' for run_diagnostics"
        )
        assert ep.stats.tool_errors == 2
        assert ep.stats.tool_calls == 3


def test_session_token_varies_with_seed_but_truth_and_ticket_do_not(task: CustomerService) -> None:
    case = _case_with_ticket(task)
    tokens, tickets = set(), set()
    for seed in (0, 1, 2):
        episode = task.run_expert(case, seed=seed)
        assert episode.strict == 1.0
        tokens.add(_tool_content(episode.messages, "authenticate")["session_token"])
        tickets.add(_tool_content(episode.messages, "open_ticket")["ticket_id"])
    assert len(tokens) == 3
    assert tickets == {case.ground_truth["ticket_id"]}
    assert task.run_expert(case, seed=0).messages == task.run_expert(case, seed=0).messages


def test_tool_results_never_state_the_verdict(task: CustomerService) -> None:
    for episode in task.reference_episodes("val"):
        for m in episode.messages:
            if m["role"] == "tool":
                assert not any(status in m["content"] for status in STATUSES), m["content"]


def test_no_state_leaks_over_a_thousand_episodes(task: CustomerService) -> None:
    cases = task.cases()
    strict = []
    for i, case in enumerate(cases):
        strict.append(task.run_expert(case, seed=i).strict)
        task.run_expert(case, seed=i, noise_rate=0.3)
    assert strict == [1.0] * len(cases)
    env = task.make_env()  # one instance reused, as a rollout worker would
    aborted = [c for c in cases if c.ground_truth["ticket_id"] != "none"][:200]
    assert len(aborted) == 200
    for i, case in enumerate(aborted):
        with pytest.raises(RuntimeError), Episode(env, case, seed=i) as ep:
            ep.reset()
            ep.step(_login(case))
            assert SandboxEnvironment.live_resources() > 0
            raise RuntimeError("the model server went away")  # aborted mid-episode
        assert ep.stats.done_reason == "error"
    assert SandboxEnvironment.live_resources() == 0


def test_second_episode_on_same_env_cannot_see_first_sessions(task: CustomerService) -> None:
    case = _case_with_ticket(task)
    request = case.inputs["request"]
    env = task.make_env()
    login = _login(case)
    with Episode(env, case, seed=0) as first:
        first.reset()
        token = json.loads(first.step(login).messages[0]["content"])["session_token"]
        first.step(
            render_tool_call("open_ticket", {"session_token": token, "service": request["service"]})
        )
    with Episode(env, case, seed=0) as second:
        second.reset()
        stale = render_tool_call(
            "open_ticket", {"session_token": token, "service": request["service"]}
        )
        assert second.step(stale).messages[0]["content"] == f"error: unknown session '{token}'"
        # The same seed re-creates the same token, and the ticket can be opened again: fresh state.
        assert json.loads(second.step(login).messages[0]["content"])["session_token"] == token
        assert not second.step(stale).results[0].error
    assert SandboxEnvironment.live_resources() == 0


def test_noisy_expert_produces_some_strict_failures(task: CustomerService) -> None:
    episodes = [task.run_expert(c, seed=0, noise_rate=0.3) for c in task.cases("train")[:60]]
    scores = [e.strict for e in episodes]
    assert 0.0 in scores and 1.0 in scores
    assert any(e.noise_events for e in episodes)
    assert any(e.tool_errors for e in episodes)  # e.g. a misread session token


def test_class_balance(task: CustomerService) -> None:
    for split in ("train", "val", "test"):
        cases = task.cases(split)
        counts = Counter(c.ground_truth["final_resolution_status"] for c in cases)
        assert set(counts) == set(STATUSES), split
        for status, n in counts.items():
            assert 0.05 <= n / len(cases) <= 0.40, (split, status, n)


def test_golden_digest_of_all_cases(task: CustomerService) -> None:
    blob = json.dumps([c.to_json() for c in task.cases()], sort_keys=True)
    assert hashlib.sha256(blob.encode()).hexdigest() == GOLDEN_DIGEST
    assert CustomerService().cases() == task.cases()  # regenerated from scratch: identical


def test_load_cases_round_trip_and_bad_line(task: CustomerService, tmp_path: Path) -> None:
    path = tmp_path / "cases.jsonl"
    assert task.export_cases(path, "test") == 100
    assert task.load_cases(path) == task.cases("test")
    lines = path.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["inputs"] = copy.deepcopy(bad["inputs"])
    bad["inputs"]["request"]["pin"] = "12a4"
    lines[2] = json.dumps(bad)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as err:
        task.load_cases(path)
    message = str(err.value)
    assert f"{path}:3" in message
    assert "inputs" in message and "request.pin" in message
