"""Inventory cycle-count reconciliation: the verifiable task on the SQLite pattern (docs/design.md,
"Environments").

Each case is one warehouse's cycle count with a small inventory database (products, a ledger of
signed stock movements, cycle counts across two or three warehouses). The agent answers by querying
a private in-memory SQLite database with SQL; the ground truth is computed the same way — by
building the case's database and running canonical SQL against it — so the answer is checked
against the database state, not against a second implementation that could drift from it.

Two SOP rules are there to be missed: pending ledger rows (``posted = 0``) do not count, and a SKU
counted twice keeps only its latest count. The noisy expert's ``skip_step`` slips are exactly
these omissions, which makes its failures look like a real agent's.
"""

from __future__ import annotations

import logging
import random
import sqlite3
from importlib import resources
from typing import Any

from mtrl_local.env import SQLiteEnvironment, ToolError, tool
from sopbench.base import Answer, Call, Case, ExpertProgram, Noise, Task, parse_json
from sopbench.inventory_reconciliation.cases import COLUMNS, generate_inputs, input_problem

logger = logging.getLogger(__name__)

SOP_TEXT = (
    resources.files("sopbench.inventory_reconciliation").joinpath("sop.md").read_text("utf-8")
)

#: SOP thresholds (kept in one place: the SQL, the SOP text and the tests must agree).
FLAG_VALUE = 250
FLAG_UNITS = 10
AUTO_POST_MAX = 150
SUPERVISOR_MAX = 600

_SCHEMA = (
    "CREATE TABLE products (sku TEXT PRIMARY KEY, description TEXT NOT NULL,"
    " unit_cost INTEGER NOT NULL)",
    "CREATE TABLE ledger (entry_id INTEGER PRIMARY KEY, sku TEXT NOT NULL,"
    " warehouse TEXT NOT NULL, qty_change INTEGER NOT NULL, kind TEXT NOT NULL,"
    " posted INTEGER NOT NULL)",
    "CREATE TABLE cycle_counts (sku TEXT NOT NULL, warehouse TEXT NOT NULL,"
    " counted_qty INTEGER NOT NULL, count_date TEXT NOT NULL)",
)


# -- SQL: the canonical reconciliation ------------------------------------------------------------
def _quote(value: str) -> str:
    """A SQL string literal (the tool takes one SQL text, so the warehouse is inlined)."""
    return "'" + value.replace("'", "''") + "'"


def reconciliation_sql(
    warehouse: str, *, posted_only: bool = True, latest_count_only: bool = True
) -> str:
    """Per-SKU worksheet: counted, system, variance, value and flag, largest |value| first.

    The keyword switches exist for the noisy expert: turning one off is skipping that SOP step.
    """
    wh = _quote(warehouse)
    if latest_count_only:
        counted = (
            "SELECT c.sku, c.counted_qty FROM cycle_counts AS c"
            f" WHERE c.warehouse = {wh} AND c.count_date = (SELECT MAX(c2.count_date)"
            " FROM cycle_counts AS c2 WHERE c2.sku = c.sku AND c2.warehouse = c.warehouse)"
        )
    else:
        counted = (
            "SELECT sku, SUM(counted_qty) AS counted_qty FROM cycle_counts"
            f" WHERE warehouse = {wh} GROUP BY sku"
        )
    posted = " AND posted = 1" if posted_only else ""
    return (
        f"WITH counted AS ({counted}),"
        " book AS (SELECT sku, SUM(qty_change) AS system_qty FROM ledger"
        f" WHERE warehouse = {wh}{posted} GROUP BY sku),"
        " recon AS (SELECT k.sku, k.counted_qty, COALESCE(b.system_qty, 0) AS system_qty,"
        " k.counted_qty - COALESCE(b.system_qty, 0) AS variance, p.unit_cost"
        " FROM counted AS k JOIN products AS p ON p.sku = k.sku"
        " LEFT JOIN book AS b ON b.sku = k.sku)"
        " SELECT sku, counted_qty, system_qty, variance, unit_cost,"
        " variance * unit_cost AS variance_value,"
        f" CASE WHEN ABS(variance * unit_cost) >= {FLAG_VALUE} OR ABS(variance) >= {FLAG_UNITS}"
        " THEN 1 ELSE 0 END AS flagged"
        " FROM recon ORDER BY ABS(variance_value) DESC, sku"
    )


def summary_sql(warehouse: str, *, posted_only: bool = True, latest_count_only: bool = True) -> str:
    """One row with every output field, computed over the :func:`reconciliation_sql` worksheet."""
    detail = reconciliation_sql(
        warehouse, posted_only=posted_only, latest_count_only=latest_count_only
    )
    return (
        f"WITH detail AS ({detail})"
        " SELECT SUM(flagged) AS flagged_sku_count,"
        " (SELECT sku FROM detail WHERE variance <> 0"
        " ORDER BY ABS(variance_value) DESC, sku LIMIT 1) AS largest_variance_sku,"
        " SUM(variance_value) AS net_variance_value,"
        f" CASE WHEN ABS(SUM(variance_value)) <= {AUTO_POST_MAX} THEN 'auto_post'"
        f" WHEN ABS(SUM(variance_value)) <= {SUPERVISOR_MAX} THEN 'supervisor'"
        " ELSE 'controller' END AS approval_level"
        " FROM detail"
    )


def load_rows(db: sqlite3.Connection, inputs: dict[str, Any]) -> None:
    """Create the schema and insert a case's rows (shared by the environment and the truth)."""
    for statement in _SCHEMA:
        db.execute(statement)
    for table, columns in COLUMNS.items():
        marks = ", ".join("?" for _ in columns)
        db.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
            [tuple(row[c] for c in columns) for row in inputs[table]],
        )
    db.commit()


def ground_truth_by_sql(inputs: dict[str, Any]) -> dict[str, Any]:
    """The output fields, by building the case's database and running :func:`summary_sql`."""
    db = sqlite3.connect(":memory:")
    try:
        load_rows(db, inputs)
        cur = db.execute(summary_sql(inputs["warehouse"]))
        row = cur.fetchone()
        names = [d[0] for d in cur.description]
    finally:
        db.close()
    truth = dict(zip(names, row, strict=True))
    if truth["largest_variance_sku"] is None:
        raise ValueError("a case needs at least one non-zero variance")
    return truth


# -- the environment ------------------------------------------------------------------------------
class InventoryEnvironment(SQLiteEnvironment):
    """One episode's warehouse database, queried read-only through three SQL tools.

    The SQL sandbox (read-only, no ATTACH, introspection pragmas only, work / time / memory /
    value-size limits, seeded ``random()``) is the base class's: :class:`SQLiteEnvironment`.
    """

    def populate(self, db: sqlite3.Connection, case: Any, seed: int) -> None:
        load_rows(db, case.inputs)

    def _table_names(self) -> list[str]:
        rows = self.query("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        return [r[0] for r in rows["rows"]]

    def initial_messages(self, case: Any) -> list[dict[str, Any]]:
        fields = ", ".join(InventoryReconciliation.output_fields)
        system = (
            f'{SOP_TEXT}\n\nCall a tool with <tool_call>{{"name": ..., "arguments": {{...}}}}'
            "</tool_call>. When done, answer with <final_response>{...}</final_response>."
        )
        user = (
            f"The cycle count of warehouse {case.inputs['warehouse']} is finished. Reconcile it "
            f"following the SOP and report {fields}."
        )
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    @tool
    def list_tables(self) -> dict[str, Any]:
        """List the tables of the inventory database with their row counts."""
        tables = []
        for name in self._table_names():
            count = self.query(f'SELECT COUNT(*) FROM "{name}"')["rows"][0][0]
            tables.append({"table": name, "rows": count})
        return {"tables": tables}

    @tool
    def describe_table(self, table: str) -> dict[str, Any]:
        """Show the columns and SQL types of one table of the inventory database.

        Args:
            table: Table name, as listed by list_tables (e.g. "ledger").
        """
        names = self._table_names()
        if table not in names:
            raise ToolError(f"unknown table '{table}' (tables: {', '.join(names)})")
        info = self.query(f"SELECT name, type FROM pragma_table_info({_quote(table)})")
        return {"table": table, "columns": [{"name": n, "type": t} for n, t in info["rows"]]}

    @tool
    def run_sql(self, query: str) -> dict[str, Any]:
        """Run one read-only SQL statement (SQLite dialect) and return its columns and rows.

        At most 50 rows are returned. Writes, several statements at once and ATTACH are refused.

        Args:
            query: A single SELECT (or WITH ... SELECT) statement.
        """
        if not query.strip():
            raise ToolError("query is empty")
        return self.query(query)


# -- the task -------------------------------------------------------------------------------------
class InventoryReconciliation(Task):
    """Reconcile one warehouse's cycle count against its stock ledger, by SQL."""

    name = "inventory_reconciliation"
    title = "Inventory cycle-count reconciliation"
    sop = SOP_TEXT
    output_fields = (
        "flagged_sku_count",
        "largest_variance_sku",
        "net_variance_value",
        "approval_level",
    )
    outcome_field = "approval_level"
    reference_turns = 4
    n_cases = 500

    def generate(
        self, index: int, rng: random.Random
    ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        inputs = generate_inputs(rng)
        return f"IR-{index:04d}", inputs, ground_truth_by_sql(inputs)

    def make_env(self) -> InventoryEnvironment:
        return InventoryEnvironment()

    def check_inputs(self, inputs: dict[str, Any]) -> str | None:
        return input_problem(inputs)

    def expert(self, case: Case, noise: Noise) -> ExpertProgram:
        """List the tables, read the per-SKU worksheet, then the one-row summary; answer from them.

        A ``skip_step`` slip drops one SOP rule from the SQL the expert writes (pending rows
        counted, or recounts summed), consistently in both queries, as a hurried analyst would.
        """
        wh = case.inputs["warehouse"]
        if not noise.happens("skip_step"):
            yield Call("list_tables", {})
        rules = {
            "posted_only": not noise.happens("skip_step"),
            "latest_count_only": not noise.happens("skip_step"),
        }
        worksheet = parse_json((yield Call("run_sql", {"query": reconciliation_sql(wh, **rules)})))
        summary = parse_json((yield Call("run_sql", {"query": summary_sql(wh, **rules)})))
        if not worksheet or not summary or not worksheet["rows"] or not summary["rows"]:
            yield Answer(self.guess_answer(case))
            return
        row = dict(zip(summary["columns"], summary["rows"][0], strict=True))
        yield Answer(
            {
                "flagged_sku_count": noise.misread(row["flagged_sku_count"]),
                # The worksheet is sorted by |variance value|, then sku: its first row is the SOP's.
                "largest_variance_sku": noise.misread(worksheet["rows"][0][0]),
                "net_variance_value": noise.misread(row["net_variance_value"]),
                "approval_level": noise.misread(row["approval_level"]),
            }
        )
