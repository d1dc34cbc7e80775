"""Checkpoints and the run directory under attack: crafted pickles, corrupt or half-written
checkpoints, two writers at once, a lock left behind by a killed process.

Every case starts from a copy of one real 2-step run of a tiny model (checkpoints at steps 1 and
2) and asserts the exact outcome: which checkpoint the resumed trainer continues from, the one
``mtrl: error:`` line and exit code 2, that nothing in the run directory changed, and that no
code hidden in a checkpoint ran.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mtrl_local.cli import main
from mtrl_local.config import load_config
from mtrl_local.errors import UserError
from mtrl_local.store import RunStore
from mtrl_local.train.trainer import Trainer
from tests.trainer_fixtures import build_tiny_model, make_trainer

LOCK = "run.lock"
NEWEST, OLDER = "step-000002", "step-000001"
#: The pickled files of the checkpoint format that loaded them with ``weights_only=False``.
PICKLE_NAMES = ("optim.pt", "rng.pt")


class Payload:
    """Unpickling this runs a shell command that creates ``marker``: a crafted checkpoint file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def train_args(model: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [
        "train",
        "--task",
        "aircraft_inspection",
        "--model",
        str(model),
        "--output-dir",
        str(out),
        "--run-name",
        name,
        "--no-baseline",
        "--no-final-eval",
        "num_generations=2",
        "batch_size=4",
        "sampling_max_tokens=48",
        "eval_steps=0",
        "save_steps=1",
        "mlflow=false",
        "learning_rate=1e-2",
        "reward=tests.trainer_fixtures:digit_share_reward",  # varies between random samples
        *extra,
    ]


def resume_args(run: Path, *extra: str) -> list[str]:
    return ["train", "--resume", str(run), "--no-baseline", "--no-final-eval", *extra]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def template(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step run with complete checkpoints at steps 1 and 2 (kept: keep=2)."""
    out = tmp_path_factory.mktemp("template")
    assert main(train_args(tiny_model, out, "run", "max_steps=2")) == 0
    run = out / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [OLDER, NEWEST]
    assert not (run / LOCK).exists()
    return run


@pytest.fixture
def run(template: Path, tmp_path: Path) -> Path:
    """A private copy of the template run."""
    return Path(shutil.copytree(template, tmp_path / "run"))


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "code in a checkpoint file ran"


def resume_trainer(run: Path, **overrides: Any) -> Trainer:
    """A trainer resuming ``run`` in this process, as ``mtrl train --resume`` builds it."""
    saved = json.loads((run / "config.json").read_text())
    saved.update(overrides)
    return make_trainer(load_config(None, saved), run_dir=run, resume=True, progress=False)


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file under ``run`` and its bytes."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def checkpoint_files(checkpoint: Path) -> list[Path]:
    return sorted(p for p in checkpoint.rglob("*") if p.is_file())


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def cli_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one ``mtrl: error:`` line on stderr (asserting there is exactly one, no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("mtrl: error:")]
    assert len(errors) == 1, err
    return errors[0]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# -- 1. no code runs from a checkpoint -------------------------------------------------------------
def test_a_pickle_in_place_of_any_newest_checkpoint_file_runs_nothing_and_falls_back(
    run: Path, marker: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each file of the newest checkpoint replaced by a crafted pickle: nothing runs, the resume
    continues from the older checkpoint and says which one it skipped."""
    files = checkpoint_files(run / "checkpoints" / NEWEST)
    assert files
    outcomes, expected = {}, {}
    for target in files:
        scratch = Path(shutil.copytree(run, run.with_name(f"scratch-{target.name}")))
        torch.save(Payload(marker), scratch / target.relative_to(run))
        caplog.clear()
        step: Any = None
        try:
            trainer = resume_trainer(scratch)
            step = trainer.state.step
            trainer.close()
        except Exception as exc:  # recorded: the table below says what was expected
            step = f"{type(exc).__name__}: {str(exc)[:80]}"
        ran = marker.exists()
        marker.unlink(missing_ok=True)
        skipped = f"skipping checkpoint {scratch / 'checkpoints' / NEWEST}: "
        warned = any(w.startswith(skipped) for w in warnings_of(caplog))
        outcomes[target.name] = {"code ran": ran, "resumed at": step, "warned": warned}
        expected[target.name] = {"code ran": False, "resumed at": 1, "warned": True}
    assert outcomes == expected


def test_old_style_pickles_beside_a_complete_checkpoint_are_never_loaded(
    run: Path, marker: Path
) -> None:
    for checkpoint in (run / "checkpoints").iterdir():
        for name in PICKLE_NAMES:
            torch.save(Payload(marker), checkpoint / name)
    trainer = resume_trainer(run)
    try:
        assert not marker.exists()
        assert trainer.state.step == 2
    finally:
        trainer.close()


def test_pickles_in_every_checkpoint_stop_the_cli_with_one_line_and_write_nothing(
    run: Path, marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for checkpoint in (run / "checkpoints").iterdir():
        for path in [*checkpoint_files(checkpoint), *(checkpoint / n for n in PICKLE_NAMES)]:
            torch.save(Payload(marker), path)
    before = snapshot(run)
    assert main(resume_args(run, "max_steps=3")) == 2
    line = cli_error(capsys)
    assert line.startswith(
        f"mtrl: error: {run / 'checkpoints'}: no complete checkpoint to resume from ("
    )
    assert f"{NEWEST}: " in line and f"{OLDER}: " in line
    assert not marker.exists()
    assert snapshot(run) == before  # no store row, no config, no lock file left


# -- 2. a corrupt or half-written newest checkpoint ------------------------------------------------
def _truncate(path: Path) -> str:
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    return f"has {size // 2} bytes, the manifest says {size}"


def _garble(path: Path) -> str:
    path.write_bytes(random.Random(path.name).randbytes(path.stat().st_size))
    return "does not match its sha256 in the manifest"


def _remove(path: Path) -> str:
    path.unlink()
    return "is missing"


CORRUPTIONS: dict[str, Callable[[Path], str]] = {
    "truncated": _truncate,
    "garbage": _garble,
    "missing": _remove,
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_newest_checkpoint_falls_back_to_the_older_one(
    run: Path, corruption: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Any one file of the newest checkpoint damaged: the trainer resumes from the older one,
    with its exact weights, and the warning names the skipped checkpoint and why."""
    older_weights = weights(run / "checkpoints" / OLDER / "model")
    outcomes, expected = {}, {}
    for target in checkpoint_files(run / "checkpoints" / NEWEST):
        scratch = Path(shutil.copytree(run, run.with_name(f"{corruption}-{target.name}")))
        damaged = scratch / target.relative_to(run)
        rel = str(damaged.relative_to(scratch / "checkpoints" / NEWEST))
        why = CORRUPTIONS[corruption](damaged)
        caplog.clear()
        step: Any = None
        try:
            trainer = resume_trainer(scratch)
            step = trainer.state.step
            state = trainer.model.state_dict()
            exact = all(torch.equal(state[k], v) for k, v in older_weights.items())
            trainer.close()
        except Exception as exc:  # recorded: the table below says what was expected
            step, exact = f"{type(exc).__name__}: {str(exc)[:80]}", False
        prefix = f"skipping checkpoint {scratch / 'checkpoints' / NEWEST}: "
        reasons = [w.removeprefix(prefix) for w in warnings_of(caplog) if w.startswith(prefix)]
        if rel == "manifest.json":
            reason = "no manifest.json" if corruption == "missing" else "manifest.json is"
        else:
            reason = f"{rel} {why}"
        outcomes[rel] = (step, exact, [r[: len(reason)] for r in reasons])
        expected[rel] = (1, True, [reason])
    assert outcomes == expected


def test_a_fallback_resume_through_the_cli_loses_nothing(
    run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Resumed from the older checkpoint, the run redoes step 2 and finishes: every stored
    episode is still there, none twice, and the rewritten newest checkpoint is complete."""
    _truncate(run / "checkpoints" / NEWEST / "model" / "model.safetensors")
    before = _trajectory_keys(run)
    assert main(resume_args(run, "max_steps=2")) == 0
    after = _trajectory_keys(run)
    assert len(after) == len(set(after)) == 2 * 4
    assert set(before) == set(after)
    assert any(
        f"skipping checkpoint {run / 'checkpoints' / NEWEST}" in w for w in warnings_of(caplog)
    )
    with RunStore.open(run, readonly=True) as store:
        assert store.steps() == [1, 2] and store.run().status == "finished"
    caplog.clear()
    trainer = resume_trainer(run)
    try:
        assert trainer.state.step == 2 and not warnings_of(caplog)
    finally:
        trainer.close()


def test_the_leftovers_of_a_killed_save_are_ignored_then_removed(run: Path) -> None:
    """A save killed half-way leaves a temporary directory: never taken for a checkpoint, and
    cleared by the next save (one writer per run directory, so it cannot be anyone's work)."""
    root = run / "checkpoints"
    leftover = root / ".tmp-step-000003-999999"
    shutil.copytree(root / NEWEST, leftover)
    (leftover / "state.json").write_text('{"step": 3')
    assert main(resume_args(run, "max_steps=3")) == 0
    assert sorted(p.name for p in root.iterdir()) == [NEWEST, "step-000003"]


def test_no_complete_checkpoint_is_one_line_naming_the_checkpoint_directory(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for checkpoint in (run / "checkpoints").iterdir():
        (checkpoint / "state.json").unlink()
    before = snapshot(run)
    assert main(resume_args(run, "max_steps=3")) == 2
    line = cli_error(capsys)
    assert line.startswith(
        f"mtrl: error: {run / 'checkpoints'}: no complete checkpoint to resume from ("
    )
    assert f"{NEWEST}: state.json is missing" in line and f"{OLDER}: state.json is missing" in line
    assert snapshot(run) == before


# -- the format keeps a resume exact ---------------------------------------------------------------
def test_a_resumed_run_continues_exactly_like_an_uninterrupted_one(
    tiny_model: Path, run: Path, tmp_path: Path
) -> None:
    assert main(train_args(tiny_model, tmp_path, "straight", "max_steps=3")) == 0
    assert main(resume_args(run, "max_steps=3")) == 0
    straight = weights(tmp_path / "straight" / "final_model")
    resumed = weights(run / "final_model")
    at_step_2 = weights(run / "checkpoints" / NEWEST / "model")
    assert any(not torch.equal(resumed[k], at_step_2[k]) for k in resumed), "step 3 did nothing"
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert _episodes(tmp_path / "straight") == _episodes(run)


def test_rng_optimizer_and_scheduler_states_survive_a_checkpoint_exactly(run: Path) -> None:
    """Save at step 2 (what the trainer holds), scramble everything, resume: the same states,
    and the random generators continue with the same draws."""
    from mtrl_local.train.checkpoint import save_checkpoint

    trainer = resume_trainer(run)
    try:
        optim = trainer.optimizer.state_dict()
        sched = trainer.scheduler.state_dict()
        save_checkpoint(run / "checkpoints", trainer.state, trainer.model, optim, trainer.scheduler)
        draws = _draws()
    finally:
        trainer.close()
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    again = resume_trainer(run)
    try:
        assert _draws() == draws
        restored = again.optimizer.state_dict()
        assert restored["param_groups"] == optim["param_groups"]
        assert type(restored["param_groups"][0]["betas"]) is tuple
        assert restored["state"].keys() == optim["state"].keys()
        for key, values in optim["state"].items():
            for name, value in values.items():
                assert torch.equal(restored["state"][key][name], value), (key, name)
        assert again.scheduler.state_dict() == sched
    finally:
        again.close()


def test_a_lora_run_resumes_its_adapter_exactly(tiny_model: Path, tmp_path: Path) -> None:
    args = train_args(tiny_model, tmp_path, "lora", "max_steps=1", "lora_rank=4", "lora_alpha=8")
    assert main(args) == 0
    run = tmp_path / "lora"
    assert (run / "checkpoints" / "step-000001" / "model" / "adapter_model.safetensors").is_file()
    first = resume_trainer(run)
    try:
        trained = {k: v.detach().clone() for k, v in first.model.named_parameters() if "lora" in k}
        optim = first.optimizer.state_dict()
    finally:
        first.close()
    again = resume_trainer(run)
    try:
        assert again.state.step == 1
        now = {k: v for k, v in again.model.named_parameters() if "lora" in k}
        assert now.keys() == trained.keys() and trained
        # lora_B starts at zero: non-zero values came from the checkpoint, not initialisation.
        assert any(bool(v.abs().sum() > 0) for k, v in trained.items() if "lora_B" in k)
        assert all(torch.equal(now[k], trained[k]) for k in trained)
        restored = again.optimizer.state_dict()["state"]
        assert all(
            torch.equal(restored[i]["exp_avg"], s["exp_avg"]) for i, s in optim["state"].items()
        )
    finally:
        again.close()


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def _trajectory_keys(run: Path) -> list[tuple[int, str, int]]:
    with sqlite3.connect(run / "run.sqlite") as conn:
        return conn.execute(
            "SELECT step, group_id, sample_index FROM trajectories WHERE label = ''"
        ).fetchall()


def _episodes(run: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(run / "run.sqlite") as conn:
        return conn.execute(
            "SELECT step, group_id, sample_index, messages, turn_tokens, reward FROM trajectories "
            "WHERE label = '' ORDER BY step, group_id, sample_index"
        ).fetchall()


# -- 3. one writer per run directory ---------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_run_and_its_holder(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    holder = resume_trainer(run)
    try:
        before = snapshot(run)
        assert main(resume_args(run, "max_steps=3")) == 2
        line = cli_error(capsys)
        assert line.startswith(
            f"mtrl: error: {run}: in use by pid {os.getpid()} on {socket.gethostname()} since "
        )
        assert snapshot(run) == before
        with pytest.raises(UserError, match=f"in use by pid {os.getpid()}"):
            resume_trainer(run)
    finally:
        holder.close()
    assert not (run / LOCK).exists()
    resume_trainer(run).close()  # free again


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


@pytest.mark.parametrize("content", ["holder", "garbage"])
def test_a_stale_lock_of_a_dead_process_is_cleared_with_a_log_line(
    run: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    pid, host = _dead_pid(), socket.gethostname()
    if content == "holder":
        record = {"pid": pid, "host": host, "started": "2000-01-01T00:00:00"}
        (run / LOCK).write_text(json.dumps(record))
        expected = f"{run}: cleared a stale lock of pid {pid} on {host}"
    else:  # a lock file cut short by the kill
        (run / LOCK).write_text('{"pid": 12')
        expected = f"{run}: cleared a stale lock"
    trainer = resume_trainer(run)
    try:
        assert any(w.startswith(expected) for w in warnings_of(caplog)), warnings_of(caplog)
        assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    finally:
        trainer.close()
    assert not (run / LOCK).exists()


def test_the_lock_is_held_while_training_and_released_on_an_exception(
    run: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[Any] = []

    def failing_update(*args: Any, **kwargs: Any) -> Any:
        lock = run / LOCK
        seen.append(json.loads(lock.read_text())["pid"] if lock.exists() else None)
        raise RuntimeError("boom")

    monkeypatch.setattr("mtrl_local.train.trainer.update_policy", failing_update)
    with pytest.raises(RuntimeError, match="boom"):
        main(resume_args(run, "max_steps=3"))
    assert seen == [os.getpid()]
    assert not (run / LOCK).exists()
    with RunStore.open(run, readonly=True) as store:
        assert store.run().status == "failed"
    caplog.clear()
    resume_trainer(run).close()
    assert not [w for w in warnings_of(caplog) if "stale lock" in w]


def test_a_refused_fresh_run_leaves_no_directory_behind(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new run refused while it opens (here: its context budget) leaves nothing behind."""
    out = tmp_path / "runs" / "nested"
    args = train_args(tiny_model, out, "fresh", "max_steps=1", "max_turns=400")
    assert main(args) == 2
    assert "context window" in cli_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_readers_work_while_a_run_holds_its_lock(run: Path) -> None:
    from tui.data import find_latest_run, resolve_run_dir

    holder = resume_trainer(run)
    try:
        assert (run / LOCK).exists()
        assert resolve_run_dir(run) == run
        assert find_latest_run(run.parent) == run
        with RunStore.open(run, readonly=True) as store:
            assert store.steps() == [1, 2]
    finally:
        holder.close()
