"""Customer service: an ISP support desk working a fault call through a stateful sandbox.

The agent verifies the account, authenticates with the customer's PIN, opens a ticket under the
session token it was given, then runs the billing, outage and diagnostic checks of the SOP and
possibly one remote fix and an escalation. Tools return raw observations (balances, incidents,
line measurements); the verdict follows only from the SOP's rules, so the agent has to apply them.

Why a sandbox (docs/design.md, "Environments": stateful tools): sessions, tickets, diagnostic runs
and escalations are created by the agent's own calls and must vanish at the end of the episode. The
session token is drawn from the episode's seeded rng (it changes with the seed and is not scored);
the ticket id is derived from the case alone, so the ground truth never depends on the seed.
"""

from __future__ import annotations

import copy
import random
from importlib import resources
from typing import Any, ClassVar, Literal

from mtrl_local.env import SandboxEnvironment, ToolError, tool
from sopbench.base import Answer, Call, Case, ExpertProgram, Noise, Task, parse_json
from sopbench.customer_service.cases import (
    INACTIVE_STATUSES,
    NO_TICKET,
    REGIONS,
    Service,
    billing_hold,
    check_case_inputs,
    fix_action,
    generate_case,
    line_healthy,
    outage_applies,
    ticket_id_for,
)

SOP = resources.files("sopbench.customer_service").joinpath("sop.md").read_text(encoding="utf-8")


# -- the environment -----------------------------------------------------------------------------
def _revoke(obj: dict[str, Any]) -> None:
    """Finalizer: a torn-down session/ticket/run is marked dead, so a stale reference shows it."""
    obj["live"] = False


class SupportDesk(SandboxEnvironment):
    """The support desk's back end for one call: accounts, sessions, tickets, line tests."""

    max_failed_logins: ClassVar[int] = 3

    def setup(self, case: Any, seed: int) -> None:
        records = case.inputs["records"]
        # Deep copies: the agent's actions (a fix changing the line) must never touch the case.
        self.account: dict[str, Any] = copy.deepcopy(records["account"])
        self.billing: dict[str, Any] = copy.deepcopy(records["billing"])
        self.outages: list[dict[str, Any]] = copy.deepcopy(records["outages"])
        self.line: dict[str, Any] = copy.deepcopy(records["diagnostics"])
        self.after_fix: dict[str, Any] = copy.deepcopy(records["after_fix"])
        self.failed_logins = 0

    def teardown(self) -> None:
        super().teardown()
        self.failed_logins = 0

    def initial_messages(self, case: Any) -> list[dict[str, Any]]:
        request = case.inputs["request"]
        user = (
            f"Hi, this is {request['customer_name']}. My account number is "
            f"{request['account_id']} and my PIN is {request['pin']}. Problem with my "
            f"{request['service']}: {request['complaint']}"
        )
        system = (
            "You are a support agent at Larkspur Communications. Follow this standard operating "
            "procedure exactly, calling one tool per turn.\n\n" + SOP
        )
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    # -- helpers ---------------------------------------------------------------------------
    def _account(self, account_id: str) -> dict[str, Any]:
        if account_id != self.account["account_id"]:
            raise ToolError(f"unknown account '{account_id}'")
        return self.account

    def _session(self, session_token: str) -> dict[str, Any]:
        session: dict[str, Any] = self.lookup("session", session_token)
        return session

    def _measure(self, run_id: str) -> dict[str, Any]:
        return {
            "run_id": run_id,
            "modem_online": self.line["modem_online"],
            "downstream_dbmv": self.line["downstream_dbmv"],
            "packet_loss_pct": self.line["packet_loss_pct"],
        }

    # -- tools -----------------------------------------------------------------------------
    @tool
    def lookup_account(self, account_id: str) -> dict[str, Any]:
        """Look up a customer account: status, service region, plan and subscribed services.

        Args:
            account_id: the account number, e.g. "ACC-50931".
        """
        account = self._account(account_id)
        return {
            k: account[k] for k in ("account_id", "holder", "status", "region", "plan", "services")
        }

    @tool
    def authenticate(self, account_id: str, pin: str) -> dict[str, Any]:
        """Check the customer's PIN; on success returns the session token every later call needs.

        Args:
            account_id: the account number.
            pin: the 4-digit PIN exactly as the customer gave it.
        """
        account = self._account(account_id)
        if account["status"] in INACTIVE_STATUSES:
            raise ToolError(f"account {account_id} is {account['status']}; it cannot sign in")
        if self.failed_logins >= self.max_failed_logins:
            return {"authenticated": False, "locked": True}
        if pin != account["pin"]:
            self.failed_logins += 1
            return {"authenticated": False, "failed_attempts": self.failed_logins}
        token = f"S-{self.rng.getrandbits(32):08x}"
        self.register("session", token, {"account_id": account_id, "live": True}, _revoke)
        return {"authenticated": True, "session_token": token}

    @tool
    def open_ticket(
        self, session_token: str, service: Service, summary: str = ""
    ) -> dict[str, Any]:
        """Open the support ticket for this call (one per call).

        Args:
            session_token: the token from authenticate.
            service: the service the customer reports.
            summary: a short description of the problem.
        """
        self._session(session_token)
        ticket_id = ticket_id_for(self.case.case_id)
        if ticket_id in self.resources.get("ticket", {}):
            raise ToolError(f"ticket {ticket_id} is already open for this call")
        ticket = {
            "ticket_id": ticket_id,
            "service": service,
            "summary": summary,
            "live": True,
            "queue": None,
        }
        self.register("ticket", ticket_id, ticket, _revoke)
        return {"ticket_id": ticket_id, "state": "open", "service": service}

    @tool
    def get_service_status(self, session_token: str, service: Service) -> dict[str, Any]:
        """Provisioning and billing status of one of the account's services.

        Args:
            session_token: the token from authenticate.
            service: the service to check.
        """
        self._session(session_token)
        if service not in self.account["services"]:
            raise ToolError(f"account {self.account['account_id']} has no {service} service")
        return {
            "service": service,
            "plan": self.account["plan"],
            "provisioned": True,
            **self.billing,
        }

    @tool
    def check_regional_outage(self, session_token: str, region: str) -> dict[str, Any]:
        """Network incidents currently logged for a service region.

        Args:
            session_token: the token from authenticate.
            region: the region code, e.g. "EAST-2".
        """
        self._session(session_token)
        if region not in REGIONS:
            raise ToolError(f"unknown region '{region}'")
        incidents = self.outages if region == self.account["region"] else []
        return {"region": region, "incidents": copy.deepcopy(incidents)}

    @tool
    def run_diagnostics(self, session_token: str, service: Service) -> dict[str, Any]:
        """Run a remote line test on the customer's gateway; returns the measurements and a run id.

        Args:
            session_token: the token from authenticate.
            service: the service being tested.
        """
        self._session(session_token)
        run_id = f"DR-{self.rng.randrange(10**6):06d}"
        self.register(
            "diagnostic run", run_id, {"service": service, "fixed": False, "live": True}, _revoke
        )
        return {**self._measure(run_id), "line_fault": self.line["line_fault"]}

    @tool
    def apply_remote_fix(
        self,
        session_token: str,
        run_id: str,
        action: Literal["reboot_gateway", "reset_line_profile"],
    ) -> dict[str, Any]:
        """Apply one remote fix to the line tested in a diagnostic run, then re-measure it.

        Args:
            session_token: the token from authenticate.
            run_id: the run id returned by run_diagnostics.
            action: the fix to apply.
        """
        self._session(session_token)
        run = self.lookup("diagnostic run", run_id)
        if run["fixed"]:
            raise ToolError(f"a remote fix was already applied to run {run_id}")
        run["fixed"] = True
        # Only the fix that matches the fault changes anything; a physical fault never clears.
        if self.line["line_fault"] is None and action == fix_action(self.line):
            self.line = {**self.after_fix, "line_fault": None}
        return {**self._measure(run_id), "action": action}

    @tool
    def escalate_ticket(
        self, session_token: str, ticket_id: str, queue: Literal["billing", "field_technician"]
    ) -> dict[str, Any]:
        """Hand the ticket to a specialist queue.

        Args:
            session_token: the token from authenticate.
            ticket_id: the ticket id returned by open_ticket.
            queue: the queue that takes the ticket over.
        """
        self._session(session_token)
        ticket = self.lookup("ticket", ticket_id)
        if ticket["queue"] is not None:
            raise ToolError(f"ticket {ticket_id} is already escalated to {ticket['queue']}")
        ticket["queue"] = queue
        escalation_id = f"ESC-{self.rng.randrange(10**5):05d}"
        self.register("escalation", escalation_id, {"ticket_id": ticket_id, "live": True}, _revoke)
        return {"ticket_id": ticket_id, "queue": queue, "escalation_id": escalation_id}


# -- the task ------------------------------------------------------------------------------------
class CustomerService(Task):
    """ISP support desk: account checks, authentication, a ticket and the fault-finding SOP."""

    name = "customer_service"
    title = "Customer service (ISP support desk)"
    sop = SOP
    output_fields = ("final_resolution_status", "ticket_id")
    outcome_field = "final_resolution_status"
    reference_turns = 9
    n_cases = 500

    def generate(
        self, index: int, rng: random.Random
    ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        return generate_case(index, rng)

    def make_env(self) -> SupportDesk:
        return SupportDesk()

    def check_inputs(self, inputs: dict[str, Any]) -> str | None:
        return check_case_inputs(inputs)

    def expert(self, case: Case, noise: Noise) -> ExpertProgram:
        """The scripted agent: what it knows comes from the customer's message and tool results."""
        request = case.inputs["request"]  # exactly what the user turn shows
        account_id, service = request["account_id"], request["service"]

        def answer(status: str, ticket: str = NO_TICKET) -> Answer:
            return Answer({"final_resolution_status": status, "ticket_id": ticket})

        # 1. Account. A skipped lookup leaves the expert assuming an active account, no region.
        account = None
        if not noise.happens("skip_step"):
            reply = yield Call("lookup_account", {"account_id": account_id})
            account = parse_json(reply)
        if account is not None and account.get("status") in INACTIVE_STATUSES:
            yield answer("account_inactive")
            return
        # 2. Authentication (a misread PIN fails here, as it would for a person).
        pin = noise.misread(request["pin"])
        auth = parse_json((yield Call("authenticate", {"account_id": account_id, "pin": pin})))
        if not auth or auth.get("authenticated") is not True:
            yield answer("authentication_failed")
            return
        token = noise.misread(auth["session_token"])

        def call(name: str, **arguments: Any) -> Call:
            return Call(name, {"session_token": token, **arguments})

        # 3. Ticket. Without a readable ticket id the expert can only answer "none".
        ticket_id = NO_TICKET
        if not noise.happens("skip_step"):
            reply = yield call("open_ticket", service=service, summary=request["complaint"])
            opened = parse_json(reply)
            if opened is not None:
                ticket_id = noise.misread(opened["ticket_id"])
        # 4. Billing.
        if not noise.happens("skip_step"):
            status = parse_json((yield call("get_service_status", service=service)))
            if status is not None:
                days = noise.misread(status["past_due_days"])
                if billing_hold(
                    {"past_due_amount": status["past_due_amount"], "past_due_days": days}
                ):
                    yield call("escalate_ticket", ticket_id=ticket_id, queue="billing")
                    yield answer("escalated_billing", ticket_id)
                    return
        # 5. Outage (needs the region, which only the account lookup gives).
        if account is not None and not noise.happens("skip_step"):
            outage = parse_json((yield call("check_regional_outage", region=account["region"])))
            if outage is not None and outage_applies(outage["incidents"], service):
                yield answer("known_outage", ticket_id)
                return
        # 6. Diagnostics. A failed test leaves a guess: the most cautious outcome.
        diag = parse_json((yield call("run_diagnostics", service=service)))
        if diag is None:
            yield answer("escalated_field_technician", ticket_id)
            return
        diag["packet_loss_pct"] = noise.misread(diag["packet_loss_pct"])
        diag["downstream_dbmv"] = noise.misread(diag["downstream_dbmv"])
        if diag["line_fault"] is not None:
            yield call("escalate_ticket", ticket_id=ticket_id, queue="field_technician")
            yield answer("escalated_field_technician", ticket_id)
            return
        if line_healthy(diag):
            yield answer("no_fault_found", ticket_id)
            return
        # 7. One remote fix; an unreadable re-measurement counts as not fixed.
        reply = yield call("apply_remote_fix", run_id=diag["run_id"], action=fix_action(diag))
        fixed = parse_json(reply)
        if fixed is not None and line_healthy(fixed):
            yield answer("resolved_remotely", ticket_id)
            return
        if not noise.happens("skip_step"):  # a forgotten hand-off is not scored, but happens
            yield call("escalate_ticket", ticket_id=ticket_id, queue="field_technician")
        yield answer("escalated_field_technician", ticket_id)
