"""The built-in reward audit set: one test per property of a reward that is safe to train with.

Run it on a task and a reward before training (docs/design.md, "The loop")::

    pytest -p no:cacheprovider --pyargs rewards.audits --audit-task aircraft_inspection \\
        [--audit-reward MODULE:FUNCTION] [--audit-rollouts FILE]

The checks are :mod:`rewards.audit`'s; the fixtures are the ``mtrl_reward_audit`` plugin's.
"""

from __future__ import annotations

import pytest

from rewards import audit, variants


def _passed(result: audit.CheckResult) -> None:
    # The problems are the message; a traceback through this module would only hide them.
    if not result.ok:
        pytest.fail(result.report(), pytrace=False)


@pytest.mark.parametrize("kind", variants.VARIANT_KINDS)
def test_lenient_variant_never_beats_its_strict_twin(kind, reward_fn, reference_episodes):
    result = audit.check_variants(reward_fn, reference_episodes, kind)
    assert result.checked, f"no '{kind}' variant could be built from the references"
    _passed(result)


def test_references_get_the_maximum(reward_fn, reference_episodes, strict_scorer):
    result = audit.check_reference_maximum(reward_fn, reference_episodes, strict_scorer)
    _passed(result)


def test_no_answer_and_malformed_json_get_the_minimum(reward_fn, reference_episodes):
    result = audit.check_no_answer_minimum(reward_fn, reference_episodes)
    _passed(result)


def test_deterministic(reward_fn, reference_episodes):
    result = audit.check_determinism(reward_fn, reference_episodes)
    _passed(result)


def test_bounded(reward_fn, reference_episodes):
    result = audit.check_bounded(reward_fn, reference_episodes)
    _passed(result)


def test_monotone_in_correct_fields(reward_fn, reference_episodes):
    result = audit.check_monotone(reward_fn, reference_episodes, orders=3)
    _passed(result)


def test_rollouts_rarely_rewarded_where_strict_is_zero(
    reward_fn, rollouts, strict_scorer, audit_options
):
    report = audit.check_rollouts(
        reward_fn,
        rollouts,
        bound=audit_options.bound,
        threshold=audit_options.threshold,
        strict_scorer=strict_scorer,
    )
    if not report.ok:
        pytest.fail(f"{audit_options.rollouts_label}: {report.report()}", pytrace=False)
