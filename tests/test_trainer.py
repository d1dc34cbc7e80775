"""The RL trainer end to end on a tiny model: every loss and advantage method updates the
parameters, metrics reach the run store and MLflow, a lenient reward raises the alarm, and a run
killed with SIGKILL resumes without losing or duplicating trajectories."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from mtrl_local.config import load_config
from mtrl_local.errors import UserError
from mtrl_local.metrics import ALL_METRICS
from mtrl_local.store import RunStore
from mtrl_local.train.trainer import Trainer
from tests.trainer_fixtures import build_tiny_model, make_trainer, noisy_expert_sampler


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def small_config(model: Path, out: Path, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "task": "aircraft_inspection",
        "model": str(model),
        "output_dir": str(out),
        "run_name": "run",
        "max_steps": 2,
        "num_generations": 4,
        "per_device_train_batch_size": 8,
        "sampling_max_tokens": 256,
        "eval_steps": 0,
        "save_steps": 1,
        "mlflow": False,
        "learning_rate": 1e-2,
    }
    values.update(overrides)
    return load_config(None, values)


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def scripted_trainer(cfg: Any) -> Trainer:
    from mtrl_local.model_io import load_model

    _, tokenizer = load_model(cfg.model)
    sampler = noisy_expert_sampler(tokenizer, cfg.task)
    return make_trainer(cfg, progress=False, sampler=sampler)


@pytest.mark.parametrize(
    ("loss_type", "advantage_method", "reward"),
    [
        ("ppo", "group_based", "rewards.dense:dense_reward"),
        ("cispo", "group_based", "rewards.dense:dense_reward"),
        ("is", "group_based", "rewards.dense:dense_reward"),
        ("ppo", "rloo", "rewards.dense:dense_reward"),
        ("ppo", "grpo_passk", "rewards.dense:dense_reward"),
        ("ppo", "group_based_per_turn", "rewards.dense:dense_reward_per_turn"),
    ],
)
def test_each_loss_and_advantage_updates_the_policy(
    tiny_model: Path, tmp_path: Path, loss_type: str, advantage_method: str, reward: str
) -> None:
    cfg = small_config(
        tiny_model,
        tmp_path,
        loss_type=loss_type,
        advantage_method=advantage_method,
        reward=reward,
        pass_k=2,
        success_threshold=0.99,
    )
    trainer = scripted_trainer(cfg)
    before = params_of(trainer.model)
    state = trainer.train()
    after = params_of(trainer.model)
    assert state.step == 2
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"
    latest = trainer.store.latest_metrics()
    assert torch.isfinite(torch.tensor(latest["train/loss"]))
    assert latest["train/sequences"] > 0
    assert 0.0 <= latest["analysis/zero_adv_groups"] < 1.0
    rows = trainer.store.trajectories()
    assert len(rows) == 2 * 8
    assert {r.step for r in rows} == {1, 2}
    trainer.close()


def test_ppo_epochs_clip_against_the_policy_frozen_at_the_first_pass(
    tiny_model: Path, tmp_path: Path
) -> None:
    """num_iterations = 1: the ratio is 1 (π_old = π detached), nothing is clipped; 4 steps on
    the same batch move the policy away from the frozen π_old and the clip engages."""
    clip = {}
    for n in (1, 4):
        cfg = small_config(
            tiny_model, tmp_path / f"it{n}", num_iterations=n, max_steps=1, learning_rate=3e-2
        )
        trainer = scripted_trainer(cfg)
        trainer.train()
        clip[n] = trainer.store.latest_metrics()["train/clip_frac"]
        trainer.close()
    assert clip[1] == 0.0
    assert clip[4] > 0.0


def test_lora_updates_only_the_adapter(tiny_model: Path, tmp_path: Path) -> None:
    cfg = small_config(tiny_model, tmp_path, lora_rank=4, lora_alpha=8, max_steps=1)
    trainer = scripted_trainer(cfg)
    names = {k for k, v in trainer.model.named_parameters() if v.requires_grad}
    assert names and all("lora_" in k for k in names)
    before = params_of(trainer.model)
    trainer.train()
    after = params_of(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    exported = trainer.export()
    assert (exported / "model.safetensors").is_file()
    assert not (exported / "adapter_config.json").exists()  # merged: a plain HF directory
    trainer.close()


def test_lenient_reward_raises_the_reward_hacking_alarm(tiny_model: Path, tmp_path: Path) -> None:
    lenient = scripted_trainer(
        small_config(tiny_model, tmp_path / "a", reward="rewards.examples:lenient_reward")
    )
    lenient.train()
    codes = {d.code for d in lenient.store.diagnostics()}
    assert "reward_hacking_audit" in codes
    assert lenient.store.latest_metrics()["rollout/reward/over_strict_frac"] > 0.02
    lenient.close()
    dense = scripted_trainer(small_config(tiny_model, tmp_path / "b"))
    dense.train()
    assert "reward_hacking_audit" not in {d.code for d in dense.store.diagnostics()}
    assert dense.store.latest_metrics()["rollout/reward/over_strict_frac"] == 0.0
    dense.close()


def test_every_design_metric_reaches_store_and_mlflow(tiny_model: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    cfg = small_config(
        tiny_model,
        tmp_path,
        mlflow=True,
        eval_steps=2,
        eval_cases=2,
        val_sampling_params={"temperature": 1.0, "n_samples": 8, "sampling_max_tokens": 16},
    )
    trainer = scripted_trainer(cfg)
    trainer.train()
    stored = set(trainer.store.metric_names())
    assert set(ALL_METRICS) - stored == set()
    trainer.tracker.flush()
    run_id = trainer.tracker.run_id
    assert run_id is not None
    logged = set(MlflowClient(trainer.tracker.tracking_uri).get_run(run_id).data.metrics)
    assert set(ALL_METRICS) - logged == set()
    trainer.close()


def _rows(db: Path) -> list[tuple[int, str, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT step, group_id, sample_index FROM trajectories WHERE label = ''"
        ).fetchall()


def _steps_so_far(db: Path) -> int:
    """Distinct steps stored so far; 0 while the trainer is still creating the store's tables."""
    if not db.exists():
        return 0
    try:
        return len({r[0] for r in _rows(db)})
    except sqlite3.OperationalError:  # the file exists, its schema is not written yet
        return 0


#: How long a subprocess may show no progress (no new log output, no new stored step) before a
#: test gives up on it. Generous: on a machine whose cores are shared a step can take minutes.
PATIENCE_S = 900.0
_HOLD_AFTER, _HOLD_FILE = "MTRL_TEST_HOLD_AFTER", "MTRL_TEST_HOLD_FILE"
_scored = 0


def held_dense_reward(messages: Any, ground_truth: Any, **kwargs: Any) -> Any:
    """The default reward; with ``MTRL_TEST_HOLD_AFTER=N`` in the environment, the process stops
    in the (N+1)-th call, after touching ``MTRL_TEST_HOLD_FILE``: a run held mid-step for as long
    as a test needs, instead of a race against its next steps."""
    from rewards.dense import dense_reward

    global _scored
    _scored += 1
    if _scored > int(os.environ.get(_HOLD_AFTER, "0")) > 0:
        Path(os.environ[_HOLD_FILE]).touch()
        while True:
            time.sleep(1)
    return dense_reward(messages, ground_truth, **kwargs)


def _wait_for(done: Any, proc: subprocess.Popen[bytes], log: Path, db: Path, what: str) -> None:
    """Poll until ``done()``. Fails only if ``proc`` exits first, or shows no progress for
    ``PATIENCE_S`` — never on a fixed wall-clock, which a busy machine would exceed."""
    seen, quiet_since = None, time.monotonic()
    while not done():
        if proc.poll() is not None and not done():
            pytest.fail(f"{what}: the run ended first ({proc.returncode}): {_tail(log)}")
        progress = (log.stat().st_size, _steps_so_far(db))
        if progress != seen:
            seen, quiet_since = progress, time.monotonic()
        elif time.monotonic() - quiet_since > PATIENCE_S:
            pytest.fail(f"{what}: no progress for {PATIENCE_S:.0f} s: {_tail(log)}")
        time.sleep(0.2)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def test_sigkill_mid_run_then_resume_loses_and_duplicates_nothing(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run held in the middle of step 3 refuses a second writer, is killed with SIGKILL, and
    its resume clears the stale lock, redoes step 3 and finishes: no episode lost or doubled."""
    from mtrl_local.cli import main

    args = [
        sys.executable,
        "-m",
        "mtrl_local.cli",
        "train",
        "--task",
        "aircraft_inspection",
        "--model",
        str(tiny_model),
        "--output-dir",
        str(tmp_path),
        "--run-name",
        "killed",
        "--no-baseline",
        "--no-final-eval",
        "max_steps=4",
        "num_generations=2",
        "batch_size=4",
        "sampling_max_tokens=48",
        "eval_steps=0",
        "save_steps=1",
        "mlflow=false",
        "reward=tests.test_trainer:held_dense_reward",
    ]
    run_dir, held, log = tmp_path / "killed", tmp_path / "held", tmp_path / "killed.log"
    db = run_dir / "run.sqlite"
    resume = [*args[:4], "--resume", str(run_dir), "--no-baseline", "--no-final-eval"]
    env = {**os.environ, _HOLD_AFTER: str(2 * 4), _HOLD_FILE: str(held)}  # steps 1-2 scored
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=out, env=env)
    try:
        _wait_for(held.exists, proc, log, db, "waiting for step 3 to start")
        refused = main([*resume[3:], "max_steps=4"])
        err = capsys.readouterr().err.strip().splitlines()
        assert refused == 2
        assert err[-1].startswith(f"mtrl: error: {run_dir}: in use by pid {proc.pid} on ")
        os.kill(proc.pid, signal.SIGKILL)  # mid-step: step 3 is being scored
    finally:
        proc.kill()
        proc.wait(timeout=PATIENCE_S)
    assert proc.returncode == -signal.SIGKILL
    before = _rows(db)
    assert sorted({r[0] for r in before}) == [1, 2]
    assert (run_dir / "checkpoints" / "step-000002").is_dir()

    resume_log = tmp_path / "resumed.log"
    with resume_log.open("wb") as out:
        resumed = subprocess.Popen(resume, stdout=subprocess.DEVNULL, stderr=out)
    try:
        _wait_for(lambda: resumed.poll() is not None, resumed, resume_log, db, "the resume")
    finally:
        resumed.kill()
        resumed.wait(timeout=PATIENCE_S)
    assert resumed.returncode == 0, _tail(resume_log)
    assert f"{run_dir}: cleared a stale lock of pid {proc.pid} on " in resume_log.read_text()
    rows = _rows(db)
    assert len(rows) == len(set(rows)), "duplicated trajectory rows"
    assert sorted({r[0] for r in rows}) == [1, 2, 3, 4]
    assert len(rows) == 4 * 4
    assert set(before) <= set(rows), "a stored trajectory was lost"
    with RunStore.open(run_dir, readonly=True) as store:
        assert store.steps()[-1] == 4
        assert store.run().status == "finished"
    assert (run_dir / "checkpoints" / "step-000004").is_dir()
    assert not (run_dir / "run.lock").exists()


#: ``accelerate launch`` of 2 processes. ``--multi_gpu`` selects the torchrun launcher, which on a
#: machine without CUDA starts 2 CPU processes over gloo; ``--cpu`` would start only one.
TWO_PROCESSES = [
    str(Path(sys.executable).with_name("accelerate")),
    "launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def _update_size_and_gap(
    model_dir: Path, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]
) -> tuple[float, float]:
    """``(‖a − start‖, ‖b − a‖)``: how far update ``a`` moved, how far ``b`` is from ``a``."""
    from mtrl_local.model_io import load_model

    start, _ = load_model(model_dir)
    p0 = start.state_dict()
    moved = torch.cat([(a[k] - p0[k]).flatten() for k in a]).norm()
    apart = torch.cat([(b[k] - a[k]).flatten() for k in a]).norm()
    return float(moved), float(apart)


def _ddp_step(model: Path, out: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    script = str(Path(__file__).with_name("ddp_step.py"))
    done = _run([sys.executable, script, str(model), str(out), json.dumps(overrides)])
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


ALGORITHM_OPTIONS = {
    "importance_sampling_level": "sequence",
    "loss_aggregation": "dr_grpo",
    "is_correction": "sequence_truncate",
    "beta": 0.1,
    "kl_estimator": "k2",
    "entropy_coef": 0.1,
}


@pytest.mark.parametrize(
    ("reference", "variant"),
    [
        # On CPU the update runs one sequence per micro-batch (no padding, no attention mask).
        ({"share_prefix": False}, {"share_prefix": False, "micro_batch_rows": 16}),
        # A group's prompt once, its keys/values (and their gradient) reused by each suffix.
        ({"share_prefix": False}, {"share_prefix": True}),
        ({"share_prefix": False}, {"share_prefix": True, "micro_batch_rows": 16}),
        # The reference model's logprobs through the shared prefix too (KL term not zero).
        ({"share_prefix": False, "beta": 0.1}, {"share_prefix": True, "beta": 0.1}),
        # The algorithm options: GSPO's sequence ratio, Dr. GRPO's constant, the sequence-level
        # sampler correction, the k2 KL and the entropy bonus (its gradient through the prefix).
        (
            {"share_prefix": False, **ALGORITHM_OPTIONS},
            {"share_prefix": True, "micro_batch_rows": 16, **ALGORITHM_OPTIONS},
        ),
    ],
    ids=[
        "padded-rows",
        "shared-prefix",
        "shared-prefix-padded",
        "shared-prefix-kl",
        "shared-prefix-padded-options",
    ],
)
def test_update_variants_give_the_same_step(
    tiny_model: Path, tmp_path: Path, reference: dict[str, Any], variant: dict[str, Any]
) -> None:
    """Different ways of running one update's forward/backward passes give the same step."""
    a = _ddp_step(tiny_model, tmp_path / "a.pt", reference)
    b = _ddp_step(tiny_model, tmp_path / "b.pt", variant)
    for name in ("train/loss", "train/kl", "train/grad_norm"):
        assert abs(a["metrics"][name] - b["metrics"][name]) < 1e-6, name
    if reference.get("beta"):
        assert a["metrics"]["train/kl"] > 1e-4  # the reference differs: the term is exercised
    if variant.get("share_prefix"):  # far fewer tokens through the model
        assert b["metrics"]["train/tokens"] < 0.5 * a["metrics"]["train/tokens"]
    moved, apart = _update_size_and_gap(tiny_model, a["params"], b["params"])
    assert moved > 0 and apart < 1e-3 * moved, (apart, moved)


def test_micro_batches_respect_the_row_limit() -> None:
    from mtrl_local.train.batching import TrainExample, micro_batches

    def example(n: int) -> TrainExample:
        return TrainExample(0, [1] * n, [1] * n, [0.0] * n, [1.0] * n)

    examples = [example(n) for n in (50, 40, 30, 20, 10)]
    assert micro_batches(examples, 10_000) == [[0, 1, 2, 3, 4]]
    assert micro_batches(examples, 10_000, max_rows=2) == [[0, 1], [2, 3], [4]]
    assert micro_batches(examples, 100, max_rows=1) == [[0], [1], [2], [3], [4]]


def test_prefix_groups_share_only_a_common_untrained_prompt() -> None:
    from mtrl_local.train.prefix import prefix_groups

    prompt_a, prompt_b = list(range(40)), list(range(100, 140))
    ids = [[*prompt_a, 7, 8, 9], [*prompt_a, 7, 5], [*prompt_b, 1, 2], [*prompt_a[:5], 3, 4]]
    masks = [[0] * 41 + [1, 1], [0] * 41 + [1], [0] * 40 + [1, 1], [0] * 6 + [1]]
    # The prefix stops one token before the first trained one (its logprob needs that token's
    # hidden state); a prompt seen once, or shorter than min_length, is run whole (length 0).
    assert prefix_groups(ids, masks, min_length=32) == [(40, [0, 1]), (0, [2]), (0, [3])]
    assert prefix_groups(ids, masks, min_length=64) == [(0, [0, 1]), (0, [2]), (0, [3])]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_process_step_equals_single_process_step(
    tiny_model: Path, tmp_path: Path, fsdp: bool
) -> None:
    """`accelerate launch` with 2 CPU processes (gloo) = one process on the whole batch, with
    the model replicated (gradients all-reduced) or sharded (FSDP2: reduce-scattered)."""
    script = str(Path(__file__).with_name("ddp_step.py"))
    single, double = tmp_path / "single.pt", tmp_path / "double.pt"
    one = _run([sys.executable, script, str(tiny_model), str(single)])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run([*TWO_PROCESSES, script, str(tiny_model), str(double), json.dumps({"fsdp": fsdp})])
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(single, weights_only=False)
    b = torch.load(double, weights_only=False)
    assert (a["world"], b["world"]) == (1, 2)  # the launch really ran two processes
    assert a["metrics"]["train/sequences"] == b["metrics"]["train/sequences"] > 0
    assert abs(a["metrics"]["train/loss"] - b["metrics"]["train/loss"]) < 1e-5
    assert abs(a["metrics"]["train/grad_norm"] - b["metrics"]["train/grad_norm"]) < 1e-5
    moved, apart = _update_size_and_gap(tiny_model, a["params"], b["params"])
    assert moved > 0.1, "the step changed nothing: the comparison would be vacuous"
    # Two processes sum gradients in another order; Adam turns a rounding difference into a
    # visible change of a weight whose gradient is near zero (seen: 1 of 19,200 weights off by
    # 2e-6): compare the runs against the size of the update.
    assert apart < 1e-3 * moved, (apart, moved)


def _episodes(db: Path) -> dict[tuple[int, str, int], tuple[str, str, float]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT step, group_id, sample_index, messages, turn_tokens, reward FROM trajectories "
            "WHERE label = ''"
        ).fetchall()
    return {(r[0], r[1], r[2]): (r[3], r[4], r[5]) for r in rows}


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_accelerate_launch_runs_the_whole_trainer_like_one_process(
    tiny_model: Path, tmp_path: Path, fsdp: bool
) -> None:
    """`accelerate launch` of `mtrl train` with 2 CPU processes: each samples half of every
    step's cases, process 0 stores all of them, and the run equals the one-process run — the
    same episodes (per-episode sampler seeds) and the same final weights. With FSDP (sharded
    policy, a whole copy per process for sampling) the same, and the run resumes from its
    sharded-optimizer checkpoint."""
    train = [
        "train",
        "--task",
        "aircraft_inspection",
        "--model",
        str(tiny_model),
        "--output-dir",
        str(tmp_path),
        "--no-baseline",
        "--no-final-eval",
        "max_steps=2",
        "num_generations=2",
        "batch_size=8",
        "sampling_max_tokens=48",
        "eval_steps=0",
        "save_steps=2",
        "mlflow=false",
        "learning_rate=1e-2",
        "reward=tests.trainer_fixtures:digit_share_reward",  # varies between random samples
    ]
    one = _run([sys.executable, "-m", "mtrl_local.cli", *train, "--run-name", "one"])
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [*TWO_PROCESSES, "-m", "mtrl_local.cli"]
    two = _run([*launch, *train, f"fsdp={str(fsdp).lower()}", "--run-name", "two"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "data-parallel over 2 processes" in two.stderr

    a, b = _episodes(tmp_path / "one" / "run.sqlite"), _episodes(tmp_path / "two" / "run.sqlite")
    assert len(a) == 2 * 8 and a.keys() == b.keys()  # both processes' episodes, once each
    assert a == b  # same messages, token counts and rewards
    with RunStore.open(tmp_path / "two", readonly=True) as store:
        assert store.steps() == [1, 2] and store.run().status == "finished"
    from mtrl_local.model_io import load_model

    m1, _ = load_model(tmp_path / "one" / "final_model")
    m2, _ = load_model(tmp_path / "two" / "final_model")
    start, _ = load_model(tiny_model)
    p0, p1, p2 = params_of(start), params_of(m1), params_of(m2)
    moved = torch.cat([(p1[k] - p0[k]).flatten() for k in p0]).norm()
    apart = torch.cat([(p2[k] - p1[k]).flatten() for k in p0]).norm()
    assert moved > 0.1, "training changed nothing: the comparison would be vacuous"
    # Batched forward passes round differently on 1 and 2 processes, and Adam turns a rounding
    # difference in a near-zero gradient into a visible step for that one weight (seen: 1 of
    # 19,200 weights off by 4e-5 after 2 steps at lr 1e-2): compare the runs against the update.
    assert apart < 1e-3 * moved, (apart, moved)
    if not fsdp:
        return
    resume = ["train", "--resume", str(tmp_path / "two"), "--no-baseline", "--no-final-eval"]
    resumed = _run([*launch, *resume, "max_steps=3"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    with RunStore.open(tmp_path / "two", readonly=True) as store:
        assert store.steps() == [1, 2, 3] and store.run().status == "finished"
    m3, _ = load_model(tmp_path / "two" / "final_model")
    assert torch.cat([(params_of(m3)[k] - p2[k]).flatten() for k in p2]).norm() > 0
    # A sharded optimizer state cannot be loaded into an unsharded run: said, not crashed.
    plain = _run([sys.executable, "-m", "mtrl_local.cli", *resume, "fsdp=false", "max_steps=4"])
    assert plain.returncode != 0
    assert "resume with the same fsdp setting" in plain.stderr
    assert "Traceback" not in plain.stderr


def test_fsdp_with_lora_and_a_kl_term(tiny_model: Path, tmp_path: Path) -> None:
    """FSDP over a peft model: the adapter trains, the KL reference (the adapter disabled) runs
    sharded, and the exported model differs from the base only in the adapted projections."""
    from mtrl_local.model_io import load_model

    args = ["train", "--task", "aircraft_inspection", "--model", str(tiny_model)]
    args += ["--output-dir", str(tmp_path)]
    args += ["--run-name", "lora", "--no-baseline", "--no-final-eval", "max_steps=2"]
    args += ["num_generations=2", "batch_size=8", "sampling_max_tokens=48", "eval_steps=0"]
    args += ["save_steps=2", "mlflow=false", "learning_rate=1e-2", "fsdp=true", "lora_rank=4"]
    args += ["beta=0.1", "reward=tests.trainer_fixtures:digit_share_reward"]
    proc = _run([*TWO_PROCESSES, "-m", "mtrl_local.cli", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with RunStore.open(tmp_path / "lora", readonly=True) as store:
        kl = dict(store.metric_series("train/kl"))
    assert kl[2] > 0  # the policy has moved away from the reference after one step
    start, _ = load_model(tiny_model)
    tuned, _ = load_model(tmp_path / "lora" / "final_model")
    p0, p1 = params_of(start), params_of(tuned)
    changed = {k for k in p0 if not torch.equal(p0[k], p1[k])}
    targets = {"q_proj", "k_proj", "v_proj", "o_proj"}  # the default lora_target_modules
    assert changed and all(k.rsplit(".", 2)[-2] in targets for k in changed), changed


def test_fsdp_needs_several_processes(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="fsdp shards the model over several processes"):
        make_trainer(small_config(tiny_model, tmp_path, fsdp=True), progress=False)


def test_accelerate_launch_refuses_async_and_uneven_splits(
    tiny_model: Path, tmp_path: Path
) -> None:
    launch = [*TWO_PROCESSES, "-m", "mtrl_local.cli"]
    base = ["train", "--task", "aircraft_inspection", "--model", str(tiny_model)]
    base += ["--output-dir", str(tmp_path), "--no-baseline"]
    base += ["--no-final-eval", "mlflow=false", "max_steps=1", "num_generations=2"]
    for extra, message in [
        (["batch_size=6"], "do not split evenly over 2 processes"),
        (["batch_size=8", "async_config.max_steps_off_policy=1"], "needs one process"),
    ]:
        proc = subprocess.run(
            [*launch, *base, *extra], capture_output=True, text=True, timeout=300, check=False
        )
        assert proc.returncode != 0
        assert message in proc.stderr


def test_async_rollouts_respect_the_staleness_bound(tiny_model: Path, tmp_path: Path) -> None:
    """A background worker samples with its own copy of the weights (real sampler)."""
    cfg = small_config(
        tiny_model,
        tmp_path,
        max_steps=4,
        sampling_max_tokens=24,
        async_config={"max_steps_off_policy": 1},
    )
    trainer = make_trainer(cfg, progress=False)
    assert trainer.source.sampler.model is not trainer.model  # a copy, not the live module
    trainer.train()
    staleness = trainer.store.metric_series("perf/staleness_mean")
    assert len(staleness) == 4
    assert all(0.0 <= value <= 1.0 for _, value in staleness)
    for row in trainer.store.trajectories():
        assert 0 <= (row.step - 1) - row.policy_version <= 1
    # The worker picked up the trainer's weights after each step.
    assert trainer.source.sampler.policy_version >= 2
    trainer.close()
