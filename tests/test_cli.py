"""The ``mtrl`` CLI, run as a real subprocess: tables, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

MTRL = [sys.executable, "-m", "mtrl_local.cli"]
TASKS = ("aircraft_inspection", "customer_service", "inventory_reconciliation")


def mtrl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MTRL, *args], capture_output=True, text=True, cwd=cwd, timeout=600, check=False
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mtrl: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_tasks_lists_the_suite() -> None:
    proc = mtrl("tasks")
    assert proc.returncode == 0, proc.stderr
    for name in TASKS:
        assert name in proc.stdout


def test_validate_all_shows_sizes_and_reference_tsr() -> None:
    proc = mtrl("validate", "--all")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in TASKS:
        row = next(line for line in proc.stdout.splitlines() if name in line)
        cells = [c.strip() for c in row.split("│") if c.strip()]
        assert cells[1:5] == ["300", "100", "100", "1.000"], row
        assert cells[-1] == "yes"


def test_unknown_task_is_one_line_exit_2() -> None:
    assert_one_line_error(mtrl("validate", "no_such_task"), "unknown task 'no_such_task'")
    assert_one_line_error(mtrl("audit", "--task", "nope"), "unknown task 'nope'")


def test_malformed_cases_file_names_file_line_and_field(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    assert (
        mtrl(
            "export", "cases", "aircraft_inspection", "--split", "val", "--out", str(good)
        ).returncode
        == 0
    )
    lines = good.read_text().splitlines()
    assert len(lines) == 100
    proc = mtrl("validate", "aircraft_inspection", "--cases", str(good))
    assert proc.returncode == 0, proc.stderr

    broken = json.loads(lines[3])
    del broken["ground_truth"]["aircraft_ready"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*lines[:3], json.dumps(broken), *lines[4:]]) + "\n")
    assert_one_line_error(
        mtrl("validate", "aircraft_inspection", "--cases", str(bad)),
        f"{bad}:4",
        "ground_truth",
        "aircraft_ready",
    )
    notjson = tmp_path / "notjson.jsonl"
    notjson.write_text(lines[0] + "\n{oops\n")
    assert_one_line_error(
        mtrl("validate", "aircraft_inspection", "--cases", str(notjson)), f"{notjson}:2", "JSON"
    )


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"messages": [], "ground_truth": {"a": 1}}\n', "field 'messages'"),
        ('{"messages": [{"role": "bot", "content": "x"}], "ground_truth": {"a": 1}}\n', "role"),
        ('{"messages": [{"role": "user", "content": "x"}]}\n', "field 'ground_truth'"),
        ("[1, 2]\n", "expected a JSON object"),
        ("", "no rollouts"),
    ],
)
def test_malformed_rollouts_file_is_one_line_exit_2(
    tmp_path: Path, content: str, fragment: str
) -> None:
    path = tmp_path / "rollouts.jsonl"
    path.write_text(content)
    proc = mtrl("audit", "--task", "aircraft_inspection", "--rollouts", str(path))
    assert_one_line_error(proc, str(path), fragment)


def test_bad_reward_spec_is_one_line_exit_2() -> None:
    assert_one_line_error(mtrl("audit", "--reward", "rewards.dense"), "module:function")
    assert_one_line_error(mtrl("audit", "--reward", "no_such_mod:f"), "cannot import")
    assert_one_line_error(mtrl("audit", "--reward", "rewards.dense:nope"), "no function 'nope'")


def test_export_noisy_rollouts_round_trip(tmp_path: Path) -> None:
    from mtrl_local.rollout_files import read_rollout_file

    out = tmp_path / "noisy.jsonl"
    proc = mtrl("export", "noisy", "customer_service", "--split", "val", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = read_rollout_file(out)
    assert len(rows) == 100
    assert {r["task"] for r in rows} == {"customer_service"}
    assert 0 < sum(r["strict"] for r in rows) < 100  # noisy: some fail, most succeed


def test_audit_passes_dense_and_fails_lenient_on_a_rollouts_file(tmp_path: Path) -> None:
    """What `make audit` runs: the shipped reward passes, the lenient example fails loudly."""
    rollouts = tmp_path / "val.jsonl"
    proc = mtrl("export", "noisy", "aircraft_inspection", "--split", "val", "--out", str(rollouts))
    assert proc.returncode == 0, proc.stderr
    dense = mtrl("audit", "--task", "aircraft_inspection", "--rollouts", str(rollouts))
    assert dense.returncode == 0, dense.stdout[-3000:]
    assert "12 passed" in dense.stdout
    lenient = mtrl(
        "audit",
        "--task",
        "aircraft_inspection",
        "--reward",
        "rewards.examples:lenient_reward",
        "--rollouts",
        str(rollouts),
    )
    assert lenient.returncode == 1
    assert "test_rollouts_rarely_rewarded_where_strict_is_zero" in lenient.stdout
    offending = [line for line in lenient.stdout.splitlines() if "strict 0" in line]
    assert len(offending) >= 3
    assert all("aircraft_inspection-" in line for line in offending)
