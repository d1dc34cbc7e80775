"""Suite-wide properties: registry, splits, determinism across processes, no leaked state."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mtrl_local.env import SandboxEnvironment, SQLiteEnvironment
from mtrl_local.errors import UserError
from mtrl_local.plugins import load_task, task_names

TASKS = ("aircraft_inspection", "customer_service", "inventory_reconciliation")


def test_registry_lists_the_bundled_tasks() -> None:
    assert task_names() == sorted(TASKS)
    with pytest.raises(UserError, match=r"unknown task 'x'.*aircraft_inspection"):
        load_task("x")


@pytest.mark.parametrize("name", TASKS)
def test_splits_are_disjoint_and_sized(name: str) -> None:
    task = load_task(name)
    splits = {s: {c.case_id for c in task.cases(s)} for s in ("train", "val", "test")}
    assert [len(v) for v in splits.values()] == [300, 100, 100]
    assert not (splits["train"] & splits["val"])
    assert not (splits["train"] & splits["test"])
    assert not (splits["val"] & splits["test"])
    assert task.max_turns == -(-3 * task.reference_turns // 2)  # ceil(1.5 × reference turns)


_TRANSCRIPT = """
import json, sys
from mtrl_local.plugins import load_task
task = load_task(sys.argv[1])
out = []
for case in task.cases("test")[:15]:
    for seed, rate in ((0, 0.0), (3, 0.3)):
        ep = task.run_expert(case, seed=seed, noise_rate=rate)
        out.append([ep.messages, ep.strict, ep.noise_events])
print(json.dumps(out))
"""


@pytest.mark.parametrize("name", TASKS)
def test_same_calls_same_seed_same_results_across_processes(name: str) -> None:
    """Two fresh interpreters with different hash seeds produce byte-identical transcripts."""
    outputs = []
    for hash_seed in ("0", "12345"):
        proc = subprocess.run(
            [sys.executable, "-c", _TRANSCRIPT, name],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": hash_seed, "PATH": "/usr/bin:/bin"},
        )
        outputs.append(proc.stdout)
    assert outputs[0] == outputs[1]
    transcripts = json.loads(outputs[0])
    assert len(transcripts) == 30
    assert all(strict == 1.0 for _, strict, events in transcripts if not events)


def test_a_thousand_mixed_episodes_leave_nothing_alive() -> None:
    sandbox_before = SandboxEnvironment.live_resources()
    dbs_before = SQLiteEnvironment.open_databases()
    tasks = [load_task(n) for n in TASKS]
    ran = 0
    for i in range(1000):
        task = tasks[i % 3]
        cases = task.cases("train")
        episode = task.run_expert(cases[i % len(cases)], seed=i, noise_rate=0.2 if i % 2 else 0.0)
        ran += episode.turns > 0
    assert ran == 1000
    assert SandboxEnvironment.live_resources() == sandbox_before
    assert SQLiteEnvironment.open_databases() == dbs_before
