"""The evaluation harness: pass@k, metric aggregation, end-to-end runs, the ``eval`` CLI."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mtrl_local.cli.tables import format_table
from mtrl_local.env.actions import parse_answer
from mtrl_local.eval_metrics import first_turn_tool_call_ok, pass_at_k, summarize, val_metrics
from mtrl_local.evaluate import EvalConfig, EvalReport, LoadedModel, ModelResult, evaluate
from mtrl_local.plugins import load_task
from mtrl_local.scoring import normalize, strict_score
from mtrl_local.trajectory import Trajectory, TurnSpan
from rewards.dense import dense_reward
from rewards.variants import no_answer_episode, with_answer
from sopbench.base import ExpertEpisode

TASK = "aircraft_inspection"
MTRL = [sys.executable, "-m", "mtrl_local.cli"]


# -- pass@k ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 1, 0.25),
        (4, 1, 4, 1.0),
        (4, 0, 1, 0.0),
        (4, 0, 4, 0.0),
        (8, 2, 2, 1 - math.comb(6, 2) / math.comb(8, 2)),
        (8, 8, 1, 1.0),
        (1, 1, 1, 1.0),
        (10, 3, 5, 1 - math.comb(7, 5) / math.comb(10, 5)),
    ],
)
def test_pass_at_k_hand_computed(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_large_n_is_stable_and_rejects_bad_input() -> None:
    # C(2000, 1000) overflows a float; the product form does not form it.
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5)
    for bad in ((4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


# -- aggregation on hand-made trajectories ---------------------------------------------------------
def make_traj(
    ep: ExpertEpisode,
    messages: list[dict[str, Any]],
    sample: int,
    *,
    done: str = "final_answer",
    last_finish: str = "stop",
    tool_errors: int = 0,
    failed: bool = False,
) -> Trajectory:
    """A Trajectory as the engine would return it (reward and strict score applied once), without
    tokens (the metrics do not read them)."""
    n_turns = sum(m["role"] == "assistant" for m in messages)
    turns = [TurnSpan(0, 0, "stop") for _ in range(n_turns)]
    if turns:
        turns[-1].finish_reason = last_finish  # type: ignore[assignment]
    result = dense_reward(messages, ep.case.ground_truth)
    return Trajectory(
        task=TASK,
        case_id=ep.case.case_id,
        split=ep.case.split,
        ground_truth=ep.case.ground_truth,
        messages=messages,
        turns=turns,
        done_reason=done,
        tool_calls=ep.tool_calls,
        tool_errors=tool_errors,
        failed=failed,
        reward=result.reward,
        metrics=result.metrics,
        strict=strict_score(messages, ep.case.ground_truth) if messages else None,
        group_id=ep.case.case_id,
        sample_index=sample,
    )


@pytest.fixture(scope="module")
def hand_made() -> tuple[list[Trajectory], list[ExpertEpisode]]:
    """2 cases x 2 samples: A = (reference, truncated without answer), B = (1 wrong field) x 2."""
    task = load_task(TASK)
    a, b = (task.run_expert(c) for c in task.cases("test")[:2])
    wrong = dict(parse_answer(b.messages) or {})
    wrong["mechanical_inspection_result"] = "WRONG"
    b_wrong = with_answer(b.messages, wrong)
    b_bad_first = copy.deepcopy(b_wrong)
    b_bad_first[2]["content"] = '<tool_call>{"name": "no_such_tool", "arguments": {}}</tool_call>'
    b_bad_first[3]["content"] = "error: unknown tool 'no_such_tool'"
    trajs = [
        make_traj(a, a.messages, 0),
        make_traj(a, no_answer_episode(a.messages), 1, done="length", last_finish="length"),
        make_traj(b, b_wrong, 0),
        make_traj(b, b_bad_first, 1, tool_errors=1),
    ]
    return trajs, [a, b]


def test_summarize_hand_made(hand_made: tuple[list[Trajectory], list[ExpertEpisode]]) -> None:
    trajs, (a, b) = hand_made
    s = summarize(trajs, load_task(TASK), success_threshold=1.0, n_samples=2)
    assert (s["n_cases"], s["n_samples"], s["n_trajectories"]) == (2, 2, 4)
    assert s["tsr"] == pytest.approx(0.25)
    assert s["pass_at_1"] == pytest.approx((0.5 + 0.0) / 2)
    assert s["pass_at_2"] == pytest.approx((1.0 + 0.0) / 2)
    # At threshold 1.0 only the reference reaches reward 1: reward agrees with strict.
    assert s["reward_pass_at_1"] == pytest.approx(0.25)
    assert s["reward_strict_disagree_frac"] == 0.0
    six_of_seven = 6 / 7
    assert s["reward_mean"] == pytest.approx((1.0 - 0.1 + 2 * six_of_seven) / 4)
    assert s["completion_rate"] == pytest.approx(0.75)
    assert s["field_acc"] == pytest.approx((1.0 + 0.0 + 2 * six_of_seven) / 4)
    by_field = s["field_acc_by_field"]
    assert list(by_field) == list(load_task(TASK).output_fields)
    assert by_field["mechanical_inspection_result"] == pytest.approx(0.25)
    assert by_field["tail_number"] == pytest.approx(0.75)
    assert s["truncated_frac"] == pytest.approx(0.25)
    assert s["failure_rate"] == 0.0
    assert s["first_turn_tool_call_frac"] == pytest.approx(0.75)
    assert s["tool_calls_mean"] == pytest.approx((2 * a.tool_calls + 2 * b.tool_calls) / 4)
    assert s["tool_errors_frac"] == pytest.approx(1 / (2 * a.tool_calls + 2 * b.tool_calls))
    assert s["turns_mean"] == pytest.approx((2 * a.turns + 2 * b.turns) / 4)
    assert s["done_reasons"] == {"final_answer": 3, "length": 1}
    assert s["per_case"][b.case.case_id] == {
        "samples": 2,
        "strict_successes": 0,
        "reward_successes": 0,
    }
    json.dumps(s)  # the summary goes into report.json as it is


def test_summarize_strict_vs_reward_pass_at_k(
    hand_made: tuple[list[Trajectory], list[ExpertEpisode]],
) -> None:
    """pass@k succeeds on the strict score; a lenient threshold moves only the reward's pass@k."""
    trajs, _ = hand_made
    s = summarize(trajs, load_task(TASK), success_threshold=0.8, n_samples=2)
    assert s["pass_at_1"] == pytest.approx(0.25)  # strict is 0/1: unchanged
    assert s["reward_pass_at_1"] == pytest.approx((0.5 + 1.0) / 2)  # B's 6/7 now count
    assert s["reward_over_strict_frac"] == pytest.approx(0.5)
    v = val_metrics(s)
    assert v["val/tsr"] == pytest.approx(0.25)
    assert v["val/reward/pass_k_2"] == pytest.approx(1.0)
    assert v["val/strict/pass_k_2"] == pytest.approx(0.5)


def test_summarize_reads_the_scorer_not_the_rewards_metrics(
    hand_made: tuple[list[Trajectory], list[ExpertEpisode]],
) -> None:
    """TSR is the scorer's verdict carried on the trajectory: a reward whose metrics claim a
    strict success changes nothing; an episode that was never scored counts as 0."""
    trajs, _ = hand_made
    lying = [copy.deepcopy(t) for t in trajs]
    for t in lying:
        t.metrics = {"completion": 1.0, "strict": 1.0}
    assert summarize(lying, load_task(TASK), 1.0, 2)["tsr"] == pytest.approx(0.25)
    lying[0].strict = None
    assert summarize(lying, load_task(TASK), 1.0, 2)["tsr"] == 0.0


def test_failed_and_unscored_trajectories(
    hand_made: tuple[list[Trajectory], list[ExpertEpisode]],
) -> None:
    _, (a, _) = hand_made
    failed = make_traj(a, [], 0, done="error", failed=True)
    failed.reward = None
    s = summarize([failed], load_task(TASK), 1.0, 1)
    assert (s["tsr"], s["failure_rate"], s["first_turn_tool_call_frac"]) == (0.0, 1.0, 0.0)
    assert s["reward_mean"] is None and s["reward_pass_at_1"] is None
    with pytest.raises(ValueError):
        summarize([], load_task(TASK), 1.0, 1)


def test_first_turn_tool_call_ok() -> None:
    names = {"lookup_aircraft"}
    call = (
        '<tool_call>{"name": "lookup_aircraft", "arguments": {"aircraft_id": "AC-1"}}</tool_call>'
    )
    ok = [{"role": "user", "content": "x"}, {"role": "assistant", "content": call}]
    assert first_turn_tool_call_ok([*ok, {"role": "tool", "content": "{}"}], names)
    assert not first_turn_tool_call_ok([*ok, {"role": "tool", "content": "error: bad"}], names)
    assert not first_turn_tool_call_ok(ok, {"other"})
    for text in ("<tool_call>{oops</tool_call>", "no call", "<final_response>{}</final_response>"):
        assert not first_turn_tool_call_ok([{"role": "assistant", "content": text}], names)


def test_report_round_trip_and_table(
    hand_made: tuple[list[Trajectory], list[ExpertEpisode]], tmp_path: Path
) -> None:
    trajs, _ = hand_made
    task = load_task(TASK)
    base = summarize(trajs[1:2] + trajs[3:], task, 1.0, 1)
    tuned = summarize(trajs, task, 1.0, 2)
    report = EvalReport(
        TASK,
        "test",
        {"task": TASK},
        [ModelResult("base", "b", base), ModelResult("tuned", "t", tuned)],
    )
    loaded = EvalReport.load(report.save(tmp_path / "report.json"))
    assert loaded.to_json() == report.to_json()
    table = format_table(loaded)
    headers = [c.header for c in table.columns]
    assert headers == ["metric", "base", "tuned", "Δ"]
    labels = list(table.columns[0].cells)
    assert "TSR (strict)" in labels and "pass@n (strict)" in labels
    assert "  aircraft_ready" in labels
    tsr_row = labels.index("TSR (strict)")
    assert list(table.columns[3].cells)[tsr_row] == "+0.250"
    # TSR per outcome right under the aggregate, one row per ground-truth value
    outcome_rows = [lab for lab in labels if lab.startswith("  where aircraft_ready = ")]
    assert labels[tsr_row + 1 : tsr_row + 1 + len(outcome_rows)] == outcome_rows
    assert len(outcome_rows) == len(tuned["tsr_by_outcome"])


def test_tsr_by_outcome_splits_the_score_by_the_decision_field(
    hand_made: tuple[list[Trajectory], list[ExpertEpisode]],
) -> None:
    """Only the reference sample (case A) succeeds: its outcome value has TSR 1/2 (A's two
    samples), B's value 0 — or, if A and B share a value, 1/4 over all four."""
    trajs, (a, b) = hand_made
    s = summarize(trajs, load_task(TASK), 1.0, 2)
    assert s["outcome_field"] == "aircraft_ready"
    value_a = normalize(a.case.ground_truth["aircraft_ready"])
    value_b = normalize(b.case.ground_truth["aircraft_ready"])
    by = s["tsr_by_outcome"]
    if value_a == value_b:
        assert by == {value_a: {"trajectories": 4, "tsr": pytest.approx(0.25)}}
    else:
        assert by[value_a] == {"trajectories": 2, "tsr": pytest.approx(0.5)}
        assert by[value_b] == {"trajectories": 2, "tsr": 0.0}
    # A synthetic 3-vs-1 split, most common value first.
    ready = [copy.deepcopy(t) for t in trajs]
    for t, value in zip(ready, [True, True, True, False], strict=True):
        t.ground_truth = {**t.ground_truth, "aircraft_ready": value}
    by = summarize(ready, load_task(TASK), 1.0, 2)["tsr_by_outcome"]
    assert list(by) == ["true", "false"] and by["true"]["trajectories"] == 3
    assert summarize(trajs, load_task("customer_service"), 1.0, 2)["outcome_field"] == (
        "final_resolution_status"
    )


def test_config_rejects_bad_values() -> None:
    from mtrl_local.errors import UserError

    for bad in ({"n_samples": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"max_turns": 0}):
        with pytest.raises(UserError):
            EvalConfig(**bad)  # type: ignore[arg-type]


# -- the CLI on bad inputs -------------------------------------------------------------------------
def mtrl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MTRL, *args], capture_output=True, text=True, timeout=300, check=False)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mtrl: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_missing_model_is_one_line_exit_2(tmp_path: Path) -> None:
    missing = str(tmp_path / "no_such_model")
    assert_one_line_error(mtrl("eval", "--task", TASK, "--model", missing), missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(
        mtrl("eval", "--task", TASK, "--model", "default", "--base-model", str(empty)),
        "not a model directory",
    )
    assert_one_line_error(mtrl("baseline", "--task", TASK, "--model", missing), missing)
    proc = mtrl("eval", "--task", TASK, "--model", "default", "--n", "0")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("mtrl eval: error: argument --n: must be an integer ≥ 1")


# -- end to end: the engine on tiny random models, and on a scripted sampler -----------------------
def suite_texts(n_cases: int = 6) -> list[str]:
    """A little of the task's own text (SOP, tool schemas, reference turns) for the tokenizer."""
    task = load_task(TASK)
    texts = [task.sop, *(json.dumps(s) for s in task.make_env().tool_schemas())]
    for ep in task.reference_episodes("train")[:n_cases]:
        texts += [m["content"] for m in ep.messages]
    return texts


def save_tiny_qwen3(tok: Any, path: Path, seed: int) -> Path:
    """A random 1-layer, hidden-32 Qwen3 over ``tok``, saved as a model directory."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    Qwen3ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from sopbench.default_model.tokenizer import train_tokenizer

    return train_tokenizer(suite_texts(), vocab_size=400)


@pytest.fixture(scope="module")
def tiny_models(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return save_tiny_qwen3(tokenizer, root / "base", 0), save_tiny_qwen3(
        tokenizer, root / "tuned", 1
    )


def test_evaluate_base_vs_tuned_end_to_end(tiny_models: tuple[Path, Path], tmp_path: Path) -> None:
    from mtrl_local.rollout_files import read_rollout_file

    base, tuned = tiny_models
    config = EvalConfig(
        n_samples=2, temperature=1.0, sampling_max_tokens=8, max_turns=2, max_cases=4, device="cpu"
    )
    out = tmp_path / "out"
    report = evaluate(
        [("base", base), ("tuned", tuned)],
        load_task(TASK),
        config,
        reward_fn=dense_reward,
        out_dir=out,
    )

    assert [r.label for r in report.results] == ["base", "tuned"]
    assert report.result("tuned").model == str(tuned)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report.to_json()))
    for result, name in zip(report.results, ("rollouts-base.jsonl", "rollouts.jsonl"), strict=True):
        s = result.summary
        assert (s["n_cases"], s["n_samples"], s["n_trajectories"]) == (4, 2, 8)
        assert {"tsr", "pass_at_1", "pass_at_2", "reward_mean", "completion_rate"} <= set(s)
        assert s["turns_mean"] >= 1
        assert result.rollouts == str(out / name)
        rows = read_rollout_file(out / name)
        assert len(rows) == 8
        for row in rows:
            traj = Trajectory.from_json(row)
            traj.check()  # the token-level fields survived the round trip
            assert traj.case_id in s["per_case"]
            assert traj.strict is not None and traj.reward is not None

    table = format_table(report)
    assert [c.header for c in table.columns] == ["metric", "base", "tuned", "Δ"]

    # The reward audit accepts the rollouts file as it is (exit 0 on a random model's outputs).
    audit = subprocess.run(
        [*MTRL, "audit", "--task", TASK, "--rollouts", str(out / "rollouts.jsonl")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]


def run_cli(*args: str) -> tuple[int, str]:
    """``mtrl`` in-process (torch is already imported here; a subprocess would reload it)."""
    import contextlib
    import io

    from mtrl_local.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(list(args))
    return code, buf.getvalue()


def test_cli_eval_prints_table_and_paths(
    tiny_models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps to the terminal width
    base, tuned = tiny_models
    out = tmp_path / "cli"
    code, stdout = run_cli(
        "eval", "--task", TASK, "--model", str(tuned), "--base-model", str(base),
        "--max-cases", "2", "--max-tokens", "4", "--max-turns", "1", "--device", "cpu",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0
    header = next(line for line in stdout.splitlines() if "metric" in line)
    assert [c.strip() for c in header.split("┃") if c.strip()] == ["metric", "base", "tuned", "Δ"]
    assert f"report: {out / 'report.json'}" in stdout
    assert f"rollouts (tuned): {out / 'rollouts.jsonl'}" in stdout
    assert (out / "rollouts-base.jsonl").is_file()


def test_cli_baseline_greedy_and_sampled(
    tiny_models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    base, _ = tiny_models
    out = tmp_path / "baseline"
    code, stdout = run_cli(
        "baseline", "--task", TASK, "--model", str(base), "--n", "2", "--max-cases", "2",
        "--max-tokens", "4", "--max-turns", "1", "--device", "cpu", "--out", str(out),
    )  # fmt: skip
    assert code == 0
    header = next(line for line in stdout.splitlines() if "metric" in line)
    cells = [c.strip() for c in header.split("┃") if c.strip()]
    assert cells == ["metric", "base greedy", "base T=1 n=2", "Δ"]
    greedy = EvalReport.load(out / "report.json").results[0]
    sampled = EvalReport.load(out / "sampled" / "report.json").results[0]
    assert (greedy.summary["n_samples"], sampled.summary["n_samples"]) == (1, 2)
    assert sampled.summary["n_trajectories"] == 4
    assert "base model scores zero" in stdout  # a random model: the stop-and-simplify hint
    assert f"--rollouts {out / 'rollouts.jsonl'}" in stdout


def test_scripted_reference_scores_one(tokenizer: Any) -> None:
    """The reference policy's turns replayed through the engine: TSR 1 and pass@k 1, except one
    sample made to give up, which moves TSR and pass@1 but not pass@2."""
    from mtrl_local.chat_codec import ChatCodec
    from mtrl_local.rollout.scripted import ScriptedSampler

    task = load_task(TASK)
    cases = task.cases("test")[:4]
    turns = {
        c.case_id: [
            ChatCodec(tokenizer).encode_assistant(m["content"])
            for m in task.run_expert(c).messages
            if m["role"] == "assistant"
        ]
        for c in cases
    }
    give_up = ChatCodec(tokenizer).encode_assistant("I cannot do this.")
    loser = f"{cases[0].case_id}#1"

    def script(key: str, turn: int, context: list[int]) -> list[int]:
        return give_up if key == loser else turns[key.split("#")[0]][turn]

    sampler = ScriptedSampler(script, tokenizer.eos_token_id)
    config = EvalConfig(n_samples=2, temperature=1.0, max_cases=4)
    scripted = LoadedModel(sampler, tokenizer, "scripted")
    report = evaluate([("reference", scripted)], task, config, reward_fn=dense_reward)
    s = report.result("reference").summary
    assert s["tsr"] == pytest.approx(7 / 8)
    assert s["pass_at_1"] == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    assert s["pass_at_2"] == 1.0
    assert s["completion_rate"] == pytest.approx(7 / 8)
    assert s["first_turn_tool_call_frac"] == pytest.approx(7 / 8)
    assert s["tool_errors_frac"] == 0.0 and s["truncated_frac"] == 0.0
    assert s["reward_mean"] == pytest.approx((7 * 1.0 - 0.1) / 8)
    assert s["done_reasons"] == {"final_answer": 7, "no_action": 1}
    assert all(v == pytest.approx(7 / 8) for v in s["field_acc_by_field"].values())
    # The evaluation applies the scorer it is handed, once per episode: a scorer that credits
    # nothing moves TSR and pass@k to 0 while the reward (the same episodes) is unchanged.
    strict_report = evaluate(
        [("reference", scripted)], task, config, reward_fn=dense_reward, scorer=lambda m, g: 0.0
    )
    none = strict_report.result("reference").summary
    assert (none["tsr"], none["pass_at_2"]) == (0.0, 0.0)
    assert none["reward_mean"] == pytest.approx(s["reward_mean"])
