"""The inventory_reconciliation task: SQL truth vs Python, read-only SQL, isolation, files."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from mtrl_local.env import Episode, SQLiteEnvironment, render_tool_call
from mtrl_local.errors import UserError
from mtrl_local.plugins import load_task
from sopbench.base import Case
from sopbench.inventory_reconciliation import InventoryReconciliation
from sopbench.inventory_reconciliation.task import (
    AUTO_POST_MAX,
    FLAG_UNITS,
    FLAG_VALUE,
    SUPERVISOR_MAX,
    InventoryEnvironment,
)

#: sha256 of all cases (json.dumps, sort_keys): a change to the generator must be deliberate.
GOLDEN_DIGEST = "5baeeabc65cd3f7ba40581992ee7a3cbf7ed3f1f4edd9426065aee1ec0516fb1"

_COUNT_ROWS = (
    "SELECT (SELECT COUNT(*) FROM products), (SELECT COUNT(*) FROM ledger),"
    " (SELECT COUNT(*) FROM cycle_counts), (SELECT SUM(qty_change) FROM ledger)"
)


@pytest.fixture(scope="module")
def task() -> InventoryReconciliation:
    t = load_task("inventory_reconciliation")
    assert isinstance(t, InventoryReconciliation)
    return t


def reconcile_in_python(inputs: dict[str, Any]) -> dict[str, Any]:
    """The SOP written out in plain Python, independent of the task's SQL."""
    wh = inputs["warehouse"]
    cost = {p["sku"]: p["unit_cost"] for p in inputs["products"]}
    latest: dict[str, tuple[str, int]] = {}
    for c in inputs["cycle_counts"]:
        if c["warehouse"] != wh:
            continue
        if c["sku"] not in latest or c["count_date"] > latest[c["sku"]][0]:
            latest[c["sku"]] = (c["count_date"], c["counted_qty"])
    system: dict[str, int] = defaultdict(int)
    for e in inputs["ledger"]:
        if e["warehouse"] == wh and e["posted"] == 1:
            system[e["sku"]] += e["qty_change"]
    variance = {sku: counted - system[sku] for sku, (_, counted) in latest.items()}
    value = {sku: v * cost[sku] for sku, v in variance.items()}
    flagged = [s for s in variance if abs(value[s]) >= FLAG_VALUE or abs(variance[s]) >= FLAG_UNITS]
    net = sum(value.values())
    largest = min((s for s in value if variance[s] != 0), key=lambda s: (-abs(value[s]), s))
    level = (
        "auto_post"
        if abs(net) <= AUTO_POST_MAX
        else "supervisor"
        if abs(net) <= SUPERVISOR_MAX
        else "controller"
    )
    return {
        "flagged_sku_count": len(flagged),
        "largest_variance_sku": largest,
        "net_variance_value": net,
        "approval_level": level,
    }


def _open(task: InventoryReconciliation, case: Case, seed: int = 0) -> InventoryEnvironment:
    env = task.make_env()
    env.reset(case, seed)
    return env


def _sql(env: InventoryEnvironment, query: str) -> Any:
    result = env.call_tool("run_sql", {"query": query})
    assert not result.error, result.content
    return json.loads(result.content)["rows"]


def test_validate_passes_with_splits_and_reference_tsr(task: InventoryReconciliation) -> None:
    report = task.validate()
    assert report.ok, report.problems
    assert report.split_sizes == {"train": 300, "val": 100, "test": 100}
    assert report.reference_tsr == 1.0
    assert report.reference_turns == task.reference_turns == 4
    assert task.max_turns == 6


def test_sql_ground_truth_equals_python_on_every_case(task: InventoryReconciliation) -> None:
    for case in task.cases():
        assert case.ground_truth == reconcile_in_python(case.inputs), case.case_id


def test_sop_text_states_the_thresholds_the_sql_uses() -> None:
    sop = InventoryReconciliation.sop
    assert f"≥ {FLAG_VALUE}" in sop and f"≥ {FLAG_UNITS} units" in sop
    assert f"up to {AUTO_POST_MAX} →" in sop and f"above {SUPERVISOR_MAX} →" in sop
    for name in InventoryReconciliation.output_fields:
        assert f"`{name}`" in sop


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO products VALUES ('SKU-0001', 'free stock', 1)",
        "UPDATE ledger SET posted = 1",
        "DELETE FROM cycle_counts",
        "DROP TABLE ledger",
        "CREATE TEMP TABLE scratch (x)",
    ],
)
def test_writes_are_refused_and_the_database_is_unchanged(
    task: InventoryReconciliation, statement: str
) -> None:
    env = _open(task, task.cases("test")[0])
    try:
        before = _sql(env, _COUNT_ROWS)
        result = env.call_tool("run_sql", {"query": statement})
        assert result.error
        assert result.content == "error: SQL error: attempt to write a readonly database"
        assert _sql(env, _COUNT_ROWS) == before
    finally:
        env.close()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("SELEC sku FROM products", 'error: SQL error: near "SELEC": syntax error'),
        ("SELECT nope FROM products", "error: SQL error: no such column: nope"),
        ("SELECT 1; DROP TABLE ledger", "error: SQL error: You can only execute one statement"),
        ("ATTACH 'other.db' AS other", "error: SQL error: not authorized"),
        ("PRAGMA writable_schema = ON", "error: SQL error: not authorized"),
        ("", "error: query is empty"),
        (
            "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r)"
            " SELECT COUNT(*) FROM r",
            "error: SQL error: query stopped, it exceeded the work limit",
        ),
    ],
)
def test_agent_mistakes_are_counted_tool_errors(
    task: InventoryReconciliation, query: str, message: str
) -> None:
    case = task.cases("test")[1]
    episode = Episode(task.make_env(), case, max_turns=task.max_turns)
    with episode:
        episode.reset()
        step = episode.step(render_tool_call("run_sql", {"query": query}))
        assert step.results[0].error
        assert step.messages[0]["content"].startswith(message)
        assert episode.stats.tool_errors == 1
        # The database still answers after the mistake.
        ok = episode.step(render_tool_call("run_sql", {"query": "SELECT COUNT(*) FROM products"}))
        assert json.loads(ok.messages[0]["content"])["rows"] == [[len(case.inputs["products"])]]
        assert episode.stats.tool_errors == 1


def test_describe_table_and_list_tables(task: InventoryReconciliation) -> None:
    case = task.cases("test")[2]
    env = _open(task, case)
    try:
        tables = json.loads(env.call_tool("list_tables", {}).content)["tables"]
        assert tables == [
            {"table": "cycle_counts", "rows": len(case.inputs["cycle_counts"])},
            {"table": "ledger", "rows": len(case.inputs["ledger"])},
            {"table": "products", "rows": len(case.inputs["products"])},
        ]
        ledger = json.loads(env.call_tool("describe_table", {"table": "ledger"}).content)
        assert [c["name"] for c in ledger["columns"]] == list(case.inputs["ledger"][0])
        wrong = env.call_tool("describe_table", {"table": "stock"})
        assert wrong.error
        assert (
            wrong.content == "error: unknown table 'stock' (tables: cycle_counts, ledger, products)"
        )
    finally:
        env.close()


def test_each_episode_has_its_own_database(task: InventoryReconciliation) -> None:
    first, second = task.cases("test")[:2]
    assert first.inputs["products"] != second.inputs["products"]
    env_a, env_b = _open(task, first), _open(task, second)
    try:
        skus_a = [r[0] for r in _sql(env_a, "SELECT sku FROM products ORDER BY sku")]
        skus_b = [r[0] for r in _sql(env_b, "SELECT sku FROM products ORDER BY sku")]
        assert skus_a == [p["sku"] for p in first.inputs["products"]]
        assert skus_b == [p["sku"] for p in second.inputs["products"]]
        assert SQLiteEnvironment.open_databases() >= 2
    finally:
        env_a.close()
        env_b.close()
    # Reusing one environment object for the next case gives a fresh database too.
    env = _open(task, first)
    try:
        env.reset(second)
        assert [r[0] for r in _sql(env, "SELECT sku FROM products ORDER BY sku")] == skus_b
    finally:
        env.close()


def test_no_database_leaks_over_many_episodes(task: InventoryReconciliation) -> None:
    episodes = task.reference_episodes("val") + task.noisy_episodes("val", rate=0.5)
    assert len(episodes) == 200
    # An episode that dies on an exception still releases its database.
    with pytest.raises(RuntimeError), Episode(task.make_env(), task.cases("val")[0]) as ep:
        ep.reset()
        raise RuntimeError("model server went away")
    assert SQLiteEnvironment.open_databases() == 0


def test_same_query_same_case_same_text(task: InventoryReconciliation) -> None:
    case = task.cases("test")[3]
    queries = [
        "SELECT * FROM ledger",
        "SELECT sku, SUM(qty_change) FROM ledger GROUP BY sku",
        "SELECT random(), hex(randomblob(8))",
    ]
    texts = []
    for _ in range(2):
        env = _open(task, case, seed=7)
        try:
            texts.append([env.call_tool("run_sql", {"query": q}).content for q in queries])
        finally:
            env.close()
    assert texts[0] == texts[1]


def test_noisy_expert_produces_some_strict_failures(task: InventoryReconciliation) -> None:
    episodes = task.noisy_episodes("test", rate=0.3)
    scores = [e.strict for e in episodes]
    assert 0 < sum(scores) < len(scores)
    assert any("skip_step" in e.noise_events for e in episodes)
    assert all(e.tool_errors == 0 for e in episodes)


def test_value_balance(task: InventoryReconciliation) -> None:
    for split in ("train", "test"):
        cases = task.cases(split)
        flagged = Counter(c.ground_truth["flagged_sku_count"] for c in cases)
        assert len(flagged) >= 4, flagged
        assert max(flagged.values()) / len(cases) <= 0.45, flagged
        levels = Counter(c.ground_truth["approval_level"] for c in cases)
        assert set(levels) == {"auto_post", "supervisor", "controller"}
        assert all(0.2 <= n / len(cases) <= 0.45 for n in levels.values()), levels
        largest = Counter(c.ground_truth["largest_variance_sku"] for c in cases)
        assert max(largest.values()) <= 3
        nets = [c.ground_truth["net_variance_value"] for c in cases]
        assert min(nets) < 0 < max(nets)


def test_every_generated_case_passes_check_inputs(task: InventoryReconciliation) -> None:
    for case in task.cases():
        assert task.check_inputs(case.inputs) is None, case.case_id
        assert 20 <= len(case.inputs["ledger"]) <= 50
        assert 6 <= len(case.inputs["products"]) <= 12


def test_golden_digest_of_all_cases(task: InventoryReconciliation) -> None:
    blob = json.dumps([c.to_json() for c in task.cases()], sort_keys=True)
    assert hashlib.sha256(blob.encode()).hexdigest() == GOLDEN_DIGEST
    assert InventoryReconciliation().cases() == task.cases()  # regenerated from scratch: identical


def test_load_cases_round_trip_and_bad_line(task: InventoryReconciliation, tmp_path: Path) -> None:
    path = tmp_path / "cases.jsonl"
    assert task.export_cases(path, "test") == 100
    assert task.load_cases(path) == task.cases("test")
    lines = path.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["inputs"]["ledger"][4]["qty_change"] = "12"
    lines[2] = json.dumps(bad)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as err:
        task.load_cases(path)
    message = str(err.value)
    assert f"{path}:3" in message
    assert "inputs" in message and "ledger[4].qty_change" in message
