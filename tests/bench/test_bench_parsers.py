"""Action parsers on adversarial model output: time grows linearly with the text.

Marked ``slow`` (the default run deselects it with ``-m 'not slow'``; the default run's
``tests/adversarial/test_parsers.py`` parses the large inputs once, under a generous deadline).
Run::

    .venv/bin/python -m pytest tests/bench/test_bench_parsers.py -m slow -p no:cacheprovider \\
        --log-cli-level=INFO --benchmark-disable-gc

Each input is an unclosed tag repeated ``SMALL`` and ``10 × SMALL`` times (what a model writes
when it loops until its token budget runs out). The ratio of the two parse times is ~10 for a
linear parser and ~100 for a quadratic one (one that searches for the closing tag again from
every opening tag); the bound below sits between the two. Best of ``ROUNDS`` runs each, as a
ratio measured in one process, so that a shared CPU's load cancels out.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest

from mtrl_local.env.actions import (
    FINAL_OPEN,
    TOOL_CALL_OPEN,
    TOOL_CALL_RE,
    extract_final_response,
    parse_tool_calls,
)

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

SMALL = 20_000
ROUNDS = 9
#: Linear is ~10, quadratic ~100; a shared CPU has measured up to ~30 for linear code.
MAX_RATIO = 40.0

CASES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "parse_tool_calls": (TOOL_CALL_OPEN, parse_tool_calls),
    "extract_final_response": (FINAL_OPEN, extract_final_response),
    "TOOL_CALL_RE.sub": (TOOL_CALL_OPEN, lambda text: TOOL_CALL_RE.sub("", text)),
    "mixed tags": (FINAL_OPEN + TOOL_CALL_OPEN + '{"name": "a"', parse_tool_calls),
}


def best_seconds(parse: Callable[[str], Any], text: str) -> float:
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        parse(text)
        times.append(time.perf_counter() - start)
    return min(times)


def test_bench_parsers_are_linear(benchmark: Any) -> None:
    results: dict[str, dict[str, float]] = {}

    def measure() -> None:
        for name, (unit, parse) in CASES.items():
            small = best_seconds(parse, unit * SMALL)
            large = best_seconds(parse, unit * (10 * SMALL))
            results[name] = {"small_s": small, "large_s": large, "ratio": large / small}

    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(results)
    logger.info("parser benchmark:\n%s", json.dumps(results, indent=2))
    for name, result in results.items():
        assert result["ratio"] < MAX_RATIO, (name, result)
