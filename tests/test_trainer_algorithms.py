"""The algorithm options end to end: a short real training run on the tiny model for each, which
must change the parameters and log the option's metric; dynamic sampling's refill, counted, on a
stand-in engine; and the combinations the trainer refuses."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

from mtrl_local import metrics as M
from mtrl_local.config import load_config
from mtrl_local.errors import UserError
from mtrl_local.model_io import load_model
from mtrl_local.scoring import RewardResult
from mtrl_local.train.batch_source import EngineBatchSource, StepBatch
from mtrl_local.train.setup import start_processes
from mtrl_local.trajectory import Trajectory
from rewards.dense import dense_reward
from tests.trainer_fixtures import build_tiny_model, make_trainer, noisy_expert_sampler


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def half_constant_reward(messages: Any, ground_truth: Any, **kwargs: Any) -> Any:
    """The dense reward on half of the cases (by a hash of the ground truth), a constant 0.5 on
    the others: their groups have zero advantage, which dynamic sampling must drop."""
    if zlib.crc32(json.dumps(ground_truth, sort_keys=True).encode()) % 2:
        return RewardResult(0.5, {})
    return dense_reward(messages, ground_truth, **kwargs)


def run(model: Path, out: Path, **overrides: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """A short run of the noisy-expert sampler (real engine, rewards, update); the trainer and the
    parameters it started from."""
    values: dict[str, Any] = {
        "task": "aircraft_inspection",
        "model": str(model),
        "output_dir": str(out),
        "run_name": "run",
        "max_steps": 1,
        "num_generations": 4,
        "per_device_train_batch_size": 8,
        "sampling_max_tokens": 256,
        "eval_steps": 0,
        "save_steps": 0,
        "mlflow": False,
        "learning_rate": 1e-2,
        **overrides,
    }
    cfg = load_config(None, values)
    _, tokenizer = load_model(cfg.model)
    trainer = make_trainer(cfg, progress=False, sampler=noisy_expert_sampler(tokenizer, cfg.task))
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    return trainer, before


def changed(trainer: Any, before: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())


@pytest.mark.parametrize(
    ("overrides", "metric"),
    [
        ({"importance_sampling_level": "sequence", "num_iterations": 2}, M.TRAIN_CLIP_FRAC),
        ({"loss_aggregation": "dr_grpo"}, M.TRAIN_LOSS),
        ({"entropy_coef": 0.05}, M.TRAIN_ENTROPY),
        ({"kl_estimator": "k2", "beta": 0.1, "max_steps": 2}, M.TRAIN_KL),
        ({"is_correction": "sequence_mask", "tis_cap": 1e9}, M.TRAIN_IS_REJECTED_FRAC),
        ({"mask_truncated": True, "sampling_max_tokens": 80}, M.TRAIN_MASKED_TRUNCATED),
    ],
    ids=["gspo", "dr_grpo", "entropy", "kl_k2", "is_sequence_mask", "mask_truncated"],
)
def test_each_option_trains(
    tiny_model: Path, tmp_path: Path, overrides: dict[str, Any], metric: str
) -> None:
    trainer, before = run(tiny_model, tmp_path, **overrides)
    assert changed(trainer, before), "no parameter changed"
    latest = trainer.store.latest_metrics()
    assert metric in latest and torch.isfinite(torch.tensor(latest[metric]))
    if "beta" in overrides:  # step 2's policy differs from the reference
        assert latest[M.TRAIN_KL] > 0
    if "mask_truncated" in overrides:  # some cut, some kept: both sides of the mask exercised
        assert 0 < latest[M.TRAIN_MASKED_TRUNCATED] < 8
        assert latest[M.TRAIN_SEQUENCES] <= 8 - latest[M.TRAIN_MASKED_TRUNCATED]
    trainer.close()


def test_entropy_bonus_changes_the_step(tiny_model: Path, tmp_path: Path) -> None:
    """The same batch with and without the bonus: different parameters after the step."""
    plain, _ = run(tiny_model, tmp_path / "a", learning_rate=1e-3)
    bonus, _ = run(tiny_model, tmp_path / "b", learning_rate=1e-3, entropy_coef=0.5)
    a = dict(plain.model.named_parameters())
    assert any(not torch.equal(a[k], v) for k, v in bonus.model.named_parameters())
    plain.close()
    bonus.close()


@pytest.mark.parametrize("staleness", [0, 1], ids=["sync", "async"])
def test_dynamic_sampling_refills_the_batch(
    tiny_model: Path, tmp_path: Path, staleness: int
) -> None:
    trainer, before = run(
        tiny_model,
        tmp_path,
        max_steps=2,
        reward="tests.test_trainer_algorithms:half_constant_reward",
        dynamic_sampling=True,
        max_refill_rounds=4,
        async_config={"max_steps_off_policy": staleness},
    )
    assert changed(trainer, before)
    store = trainer.store
    dropped = [v for _, v in store.metric_series(M.GROUPS_DROPPED)]
    rounds = [v for _, v in store.metric_series(M.REFILL_ROUNDS)]
    episodes = [v for _, v in store.metric_series(M.REFILL_EPISODES)]
    assert len(dropped) == len(rounds) == 2
    assert sum(dropped) > 0 and sum(rounds) > 0 and sum(episodes) > 0
    assert all(e % 4 == 0 for e in episodes)  # whole groups of num_generations
    # The batches stayed full (8 trajectories a step), of groups that carry signal.
    rows = store.trajectories()
    assert [sum(r.step == s for r in rows) for s in (1, 2)] == [8, 8]
    assert max(v for _, v in store.metric_series(M.ZERO_ADV_GROUPS)) == 0.0
    trainer.close()


# -- the refill on a stand-in engine: counts worked out by hand ------------------------------------


class _Stats:
    seconds, sampled_tokens = 1.0, 10


def _episode(case: str, sample: int) -> Trajectory:
    return Trajectory("t", case, "train", {}, group_id=case, sample_index=sample)


def test_refill_counts_by_hand() -> None:
    # Cases named "z…" have zero advantage. 4 groups wanted; round 0 samples a, z1, b, z2
    # (2 kept); round 1 samples the 2 missing: z3, c (3 kept); round 2 samples 1: z4; round 3
    # (the bound) samples 1: a again (the order wrapped), a clash renamed a~r3 (4 kept). Dropped:
    # z1..z4 = 4 groups; extra rounds 3; extra episodes (2 + 1 + 1 cases) × 2 samples = 8.
    order = ["a", "z1", "b", "z2", "z3", "c", "z4", "a"]

    def pick(position: int, epoch: int, count: int | None = None) -> tuple[list[Any], int, int]:
        n = 4 if count is None else count
        return order[position : position + n], position + n, epoch

    source = EngineBatchSource.__new__(EngineBatchSource)
    source.pick_cases = pick
    source.seed, source._batch_index, source._position = 0, 0, (0, 0)
    source.engine = type("Engine", (), {"stats": _Stats()})()
    source.sampler = type("Sampler", (), {"policy_version": 0})()
    seeds: list[int] = []

    def fake_run(cases: list[str], seed: int) -> list[Trajectory]:
        seeds.append(seed)
        return [_episode(c, s) for c in cases for s in range(2)]

    source._run = fake_run  # type: ignore[method-assign]
    source.zero_groups = lambda ts: {t.group_id for t in ts if t.group_id.startswith("z")}
    source.max_refill_rounds = 3
    batch: StepBatch = source._make()
    assert [t.group_id for t in batch.trajectories[::2]] == ["a", "b", "c", "a~r3"]
    assert batch.metrics == {M.GROUPS_DROPPED: 4.0, M.REFILL_ROUNDS: 3.0, M.REFILL_EPISODES: 8.0}
    assert (batch.data_position, source._position) == (8, (8, 0))
    assert (batch.wall_s, batch.new_tokens) == (4.0, 40)
    assert len(set(seeds)) == 4  # every round its own seed
    # A bound of 1: one extra round, then the batch is topped up with the first dropped groups.
    source._position, source.max_refill_rounds = (0, 0), 1
    batch = source._make()
    assert [t.group_id for t in batch.trajectories[::2]] == ["a", "b", "c", "z1"]
    assert batch.metrics[M.GROUPS_DROPPED] == 2.0  # z2, z3 left out; z1 in as a top-up


def test_dynamic_sampling_is_refused_where_it_cannot_run() -> None:
    cfg = load_config(None, {"dynamic_sampling": "true"})
    with pytest.raises(UserError, match=r"dynamic_sampling .* --agent-cmd"):
        start_processes(cfg, agent=True)
