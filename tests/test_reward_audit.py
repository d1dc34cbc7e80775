"""The reward audit: its checks on hand-made episodes, and the built-in audit set end to end.

The end-to-end tests run ``pytest --pyargs rewards.audits`` in a subprocess on aircraft_inspection,
as a user would: the dense reward passes, the lenient example reward fails and names the offending
episodes, and a malformed rollouts file is one line of error, not a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mtrl_local.rollout_files import write_rollout_file
from mtrl_local.scoring import RewardResult
from rewards import audit, variants
from rewards.dense import dense_reward, dense_reward_per_turn
from rewards.examples import (
    harvest_tool_results,
    key_insensitive_matches,
    lenient_parse,
    lenient_reward,
    substring_match,
)

ROOT = Path(__file__).resolve().parents[1]
TRUTH = {"result": "pass", "electrical": "fail", "ready": False, "code": "C-12"}


def toy_reference(case_id: str = "toy-1", truth: dict[str, Any] = TRUTH) -> variants.Reference:
    """A hand-made reference episode: one tool call, then the exact answer."""
    call = '<tool_call>{"name": "read_panel", "arguments": {"id": "AC-1"}}</tool_call>'
    messages = [
        {"role": "system", "content": "Follow the SOP."},
        {"role": "user", "content": "Inspect AC-1."},
        {"role": "assistant", "content": call},
        {"role": "tool", "name": "read_panel", "content": '{"voltage": 11.2, "code": "C-12"}'},
        {"role": "assistant", "content": f"<final_response>{json.dumps(truth)}</final_response>"},
    ]
    return variants.Reference(case_id, messages, dict(truth))


REFS = [
    toy_reference(),
    toy_reference("toy-2", {"result": "fail", "electrical": "fail", "ready": True, "code": "C-7"}),
]


# -- the lenient examples do what their docstrings warn about --------------------------------------
def test_lenient_examples_misbehave_as_documented():
    assert lenient_parse([{"role": "assistant", "content": '<answer>{"a": 1}</answer>'}]) == {
        "a": 1
    }
    assert lenient_parse([{"role": "assistant", "content": 'ok {"a": 1} bye'}]) == {"a": 1}
    assert substring_match("unsuccessful", "success") and substring_match("Failure", "fail")
    tool = {"role": "tool", "content": "code C-12 found"}
    assert harvest_tool_results([tool], "C-12")
    assert key_insensitive_matches({"x": "fail", "y": "pass"}, {"y": "fail", "x": "pass"}) == {
        "y": True,
        "x": True,
    }
    ref = REFS[0]
    assert lenient_reward(ref.messages, ref.ground_truth) == dense_reward(
        ref.messages, ref.ground_truth
    )


# -- variants and twins ----------------------------------------------------------------------------
def test_variants_cover_every_kind_and_twins_have_the_strict_credit_of_the_variant():
    pairs = variants.lenient_variants(REFS[0])
    assert {p.kind for p in pairs} == set(variants.VARIANT_KINDS)
    for p in pairs:
        # Under the strict reading, variant and twin are the same answer.
        assert dense_reward(p.variant, p.ground_truth) == dense_reward(p.twin, p.ground_truth), p
        # Only the final turn changes (harvest bait may add one tool message before it).
        assert p.variant[:3] == REFS[0].messages[:3]
    swapped = [p.detail for p in pairs if p.kind == "swapped_fields"]
    assert "result<->electrical" in swapped
    assert len(swapped) == 6  # every pair of the 4 fields differs in value


def test_plainly_wrong_is_unrelated_to_every_expected_value():
    assert variants.plainly_wrong(TRUTH) == "WRONG-VALUE"
    assert variants.plainly_wrong({"a": "wrong-value-x"}) == "XX-INVALID"


# -- each check passes the dense reward and catches what it is for ---------------------------------
@pytest.mark.parametrize("reward_fn", [dense_reward, dense_reward_per_turn])
def test_dense_rewards_pass_every_check(reward_fn):
    for kind in variants.VARIANT_KINDS:
        assert audit.check_variants(reward_fn, REFS, kind).ok, kind
    for check in (
        audit.check_reference_maximum,
        audit.check_no_answer_minimum,
        audit.check_determinism,
        audit.check_bounded,
        audit.check_monotone,
    ):
        result = check(reward_fn, REFS)
        assert result.ok and result.checked > 0, result.report()


def test_lenient_reward_fails_the_bait_variants_only():
    failed = {
        k for k in variants.VARIANT_KINDS if not audit.check_variants(lenient_reward, REFS, k).ok
    }
    assert failed == {"wrong_tag", "bare_json", "contains_value", "harvest_bait", "swapped_fields"}


def _shifted(offset: float):
    def reward(messages, ground_truth, **_):
        r = dense_reward(messages, ground_truth)
        return RewardResult(r.reward + offset(messages), r.metrics)

    return reward


def test_check_catches_a_bonus_for_trailing_text():
    bonus = _shifted(lambda m: 0.05 * ("procedure" in m[-1]["content"]))
    assert not audit.check_variants(bonus, REFS, "trailing_text").ok
    assert not audit.check_reference_maximum(bonus, REFS).ok


def test_check_catches_a_reward_for_not_answering():
    def lazy(messages, ground_truth, **_):
        return RewardResult(0.5 if "<final_response>" not in messages[-1]["content"] else 0.0, {})

    assert not audit.check_no_answer_minimum(lazy, REFS).ok
    assert not audit.check_reference_maximum(lazy, REFS).ok


def test_check_catches_nondeterminism_and_mutation():
    calls = iter(range(10**6))

    def noisy(messages, ground_truth, **_):
        return RewardResult(dense_reward(messages, ground_truth).reward + next(calls) * 1e-3, {})

    def mutating(messages, ground_truth, **_):
        messages[-1]["content"] = messages[-1]["content"].strip() + " "
        return dense_reward(messages, ground_truth)

    assert not audit.check_determinism(noisy, REFS).ok
    assert not audit.check_determinism(mutating, REFS).ok


def test_check_catches_unbounded_and_non_monotone_rewards():
    def unbounded(messages, ground_truth, **_):
        return RewardResult([float("nan")], {})

    def all_or_nothing_inverted(messages, ground_truth, **_):
        # Pays for getting exactly one field right: correcting a second one lowers the reward.
        acc = dense_reward(messages, ground_truth).metrics["field_acc"]
        return RewardResult(1.0 if 0 < acc <= 0.25 else acc / 2, {})

    assert not audit.check_bounded(unbounded, REFS).ok
    assert not audit.check_monotone(all_or_nothing_inverted, REFS).ok


def test_reward_value_reduces_per_turn_lists():
    assert audit.reward_value(RewardResult([0.5, -0.1, 0.25], {})) == pytest.approx(0.65)
    assert audit.reward_value(0.3) == 0.3
    assert audit.reward_value((1.0, {})) == 1.0
    with pytest.raises(TypeError):
        audit.reward_value("1.0")


def test_check_rollouts_share_and_offenders():
    good, ref = REFS
    wrong_tag = variants.lenient_variants(ref, ("wrong_tag",))[0].variant
    rows = [
        {
            "task": "toy",
            "case_id": "a",
            "messages": good.messages,
            "ground_truth": good.ground_truth,
        },
        {"task": "toy", "case_id": "b", "messages": wrong_tag, "ground_truth": ref.ground_truth},
        {"case_id": "c", "messages": wrong_tag, "ground_truth": ref.ground_truth, "_line": 7},
    ]
    assert audit.check_rollouts(dense_reward, rows).offenders == []
    report = audit.check_rollouts(lenient_reward, rows, bound=0.5)
    assert report.share == pytest.approx(2 / 3) and not report.ok
    assert report.offenders == [
        audit.Offender("toy", "b", 2, 1.0, 0.0),
        audit.Offender("?", "c", 7, 1.0, 0.0),
    ]
    assert "case b (line 2): reward 1.0000, strict 0" in report.report()
    assert audit.check_rollouts(lenient_reward, rows, bound=0.5, threshold=1.01).ok


# -- end to end: pytest --pyargs rewards.audits ----------------------------------------------------
def run_audit(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--pyargs", "rewards.audits"]
    cmd += ["--audit-task", "aircraft_inspection", "--audit-cases", "4", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_builtin_audit_passes_the_dense_reward():
    proc = run_audit()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "12 passed" in proc.stdout


def test_builtin_audit_fails_the_lenient_reward_and_names_the_offenders():
    from mtrl_local.plugins import load_task

    task = load_task("aircraft_inspection")
    rows = [{**e.to_rollout(), "_line": i} for i, e in enumerate(task.noisy_episodes("val"), 1)]
    expected = audit.check_rollouts(lenient_reward, rows)
    assert not expected.ok  # the noisy expert's wrong tags are enough to catch it

    proc = run_audit("--audit-reward", "rewards.examples:lenient_reward")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    for kind in ("wrong_tag", "bare_json", "contains_value", "harvest_bait", "swapped_fields"):
        assert f"test_lenient_variant_never_beats_its_strict_twin[{kind}]" in out
    assert "FAILED rewards/audits/test_reward_audit.py::test_rollouts_rarely" in out
    for offender in expected.offenders[:25]:
        assert f"case {offender.case_id} (line {offender.line})" in out


def test_builtin_audit_reads_a_rollouts_file(tmp_path):
    from mtrl_local.plugins import load_task

    task = load_task("aircraft_inspection")
    path = tmp_path / "rollouts.jsonl"
    write_rollout_file(path, [e.to_rollout() for e in task.reference_episodes("val")[:10]])
    assert run_audit("--audit-rollouts", str(path)).returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--audit-rollouts", "{bad}"), "{bad}:2: field 'messages' must be a non-empty list"),
        (("--audit-task", "no_such_task"), "unknown task 'no_such_task'"),
        (("--audit-reward", "rewards.dense:nope"), "reward 'rewards.dense:nope'"),
    ],
)
def test_builtin_audit_bad_option_is_one_line_without_traceback(tmp_path, args, message):
    bad = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}], "ground_truth": {"a": 1}}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "messages": []}) + "\n")
    args = tuple(a.replace("{bad}", str(bad)) for a in args)
    message = message.replace("{bad}", str(bad))
    proc = run_audit(*args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, out
    errors = [line for line in out.splitlines() if line.startswith("ERROR:")]
    assert errors == [f"ERROR: {message}"] or (len(errors) == 1 and message in errors[0]), out
    assert "Traceback" not in out and "_pytest" not in out


def test_plugin_is_inert_for_suites_that_do_not_use_it(tmp_path):
    # A suite with its own `task` fixture and a bad --audit-task: nothing is checked or loaded.
    (tmp_path / "test_other.py").write_text(
        "import sys, pytest\n"
        "@pytest.fixture\n"
        "def task():\n"
        "    return 'mine'\n"
        "def test_x(task):\n"
        "    assert task == 'mine'\n"
        "    assert 'sopbench' not in sys.modules\n"
    )
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(tmp_path)]
    proc = subprocess.run(
        [*cmd, "--audit-task", "nope", "--rootdir", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
