"""Advantage estimators: pure functions of one group's rewards, picked by name.

Formulas in docs/design.md ("Advantages"). G is the group size (rollouts of one prompt). Every
estimator takes the rewards of *one* group and returns that group's advantages;
:func:`compute_advantages` runs one over all groups of a batch and names the groups that carry no
signal (the one place zero-advantage groups are decided: ``analysis/zero_adv_groups`` counts
them). :func:`token_advantages` puts a trajectory's advantage onto its sampled tokens.

Choices and departures, on purpose:

* **Population std** (``unbiased=False``, divide by G) in ``group_based`` and
  ``group_based_per_turn``. TRL's GRPO uses ``torch.std`` (sample std, divide by G − 1). The
  population std makes the advantages of a group exactly unit-variance, is defined for G = 1, and
  agrees with ``grpo_passk``, whose σ = sqrt(ρ(1 − ρ)) is the population std of a Bernoulli: with
  k = 1, ``grpo_passk`` equals ``group_based`` on binary rewards. (For G = 4 the sample std is
  1.155× larger, so TRL's advantages are 0.866× ours.)
* A group whose rewards are all equal gets **exact zeros** (no ``0/1e-6`` round-off noise), in
  every estimator; for ``group_based_per_turn`` "equal" means equal total returns (see there).
  "Equal" is within :data:`REWARD_ATOL` (1e-9): the same per-turn rewards summed in another
  order differ in the last bit (0.1 + 0.2 + 0.3 = 0.6000000000000001, 0.3 + 0.2 + 0.1 = 0.6),
  and dividing that by ``std + 1e-6`` would turn a rounding error into an advantage.
* Arithmetic in float64 (rewards are Python floats), results in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mtrl_local.errors import UserError
from mtrl_local.trajectory import Trajectory, TurnSpan

EPS = 1e-6
"""Added to the std before dividing."""
REWARD_ATOL = 1e-9
"""Rewards (or total returns) of a group whose spread is at most this count as all equal. An
absolute tolerance, so that shifting every reward by a constant changes nothing: float64 rounding
of returns of order 1 is ~1e-16, a reward difference that means anything is orders above 1e-9."""

Rewards = Tensor | Sequence[float]
"""One group's scalar rewards, shape (G,)."""
Reward = float | Sequence[float]
"""One trajectory's reward: a scalar, or one value per turn."""
AdvantageFn = Callable[..., "Tensor | list[Tensor]"]


def _as_rewards(rewards: Rewards) -> Tensor:
    """(G,) float64 copy of ``rewards``."""
    r = torch.as_tensor(rewards, dtype=torch.float64).detach()
    if r.dim() != 1:
        raise ValueError(f"rewards must be 1-D (G,), got shape {tuple(r.shape)}")
    return r


def _all_equal(r: Tensor) -> bool:
    """Whether the (G,) rewards are all equal, within :data:`REWARD_ATOL`."""
    return r.numel() == 0 or bool(r.max() - r.min() <= REWARD_ATOL)


def group_based(
    rewards: Rewards, scale_rewards: Literal["group", "none"] = "group"
) -> Tensor:  # (G,)
    """GRPO: ``A_i = (R_i − mean_G R) / (std_G R + 1e-6)``; ``scale_rewards="none"`` (Dr. GRPO,
    arXiv 2503.20783) drops the division: ``A_i = R_i − mean_G R``.

    std is the population std (divide by G), see the module docstring. All-equal rewards → zeros.
    """
    r = _as_rewards(rewards)  # (G,)
    if scale_rewards not in ("group", "none"):
        raise ValueError(f"scale_rewards must be 'group' or 'none', got {scale_rewards!r}")
    if _all_equal(r):
        return torch.zeros(r.shape, dtype=torch.float32)
    adv = r - r.mean()  # (G,)
    if scale_rewards == "group":
        adv = adv / (r.std(unbiased=False) + EPS)
    return adv.float()


def rloo(rewards: Rewards) -> Tensor:  # (G,)
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024):
    ``A_i = R_i − (1/(G−1)) Σ_{j≠i} R_j`` = ``G/(G−1) · (R_i − mean_G R)``.

    G = 1 has no other sample to compare with: zeros. The advantages of a group sum to 0.
    """
    r = _as_rewards(rewards)  # (G,)
    g = r.numel()
    if g < 2 or _all_equal(r):
        return torch.zeros(r.shape, dtype=torch.float32)
    baseline = (r.sum() - r) / (g - 1)  # (G,) mean of the others
    return (r - baseline).float()


def _comb(a: int, b: int) -> int:
    """C(a, b), 0 when b > a or either is negative."""
    return math.comb(a, b) if 0 <= b <= a else 0


def grpo_passk(rewards: Rewards, k: int, success_threshold: float = 1.0) -> Tensor:  # (G,)
    """Pass@k training (Chen et al., arXiv 2508.10751), analytic advantages.

    Binary success ``s_i = [R_i ≥ success_threshold]``, n = G samples, c successes::

        ρ     = 1 − C(n−c, k) / C(n, k)                      # unbiased pass@k of the group
        σ     = sqrt(ρ (1 − ρ))
        A_pos = (1 − ρ) / (σ + 1e-6)                          # for s_i = 1
        A_neg = (1 − ρ − C(n−c−1, k−1) / C(n−1, k−1)) / (σ + 1e-6)   # for s_i = 0

    c = 0 (ρ = 0) and c = n (ρ = 1) give σ = 0: zeros. C(a, b) = 0 when a < b. Requires
    1 ≤ k ≤ n. With k = 1 this is ``group_based`` on the binary successes; the advantages of a
    group always sum to 0 (c·A_pos + (n−c)·A_neg = 0).
    """
    r = _as_rewards(rewards)  # (G,)
    n = r.numel()
    if not 1 <= k <= n:
        raise ValueError(f"grpo_passk needs 1 ≤ k ≤ G, got k={k}, G={n}")
    success = r >= success_threshold  # (G,) bool
    c = int(success.sum())
    if c in (0, n):
        return torch.zeros(n, dtype=torch.float32)
    rho = 1.0 - _comb(n - c, k) / _comb(n, k)
    sigma = math.sqrt(rho * (1.0 - rho))
    a_pos = (1.0 - rho) / (sigma + EPS)
    a_neg = (1.0 - rho - _comb(n - c - 1, k - 1) / _comb(n - 1, k - 1)) / (sigma + EPS)
    return torch.where(success, a_pos, a_neg).float()


def group_based_per_turn(
    per_turn_rewards: Sequence[Sequence[float]],
    scale_rewards: Literal["group", "none"] = "group",
) -> list[Tensor]:  # G tensors, (T_i,) each
    """Per-turn GRPO: return-to-go ``G_{i,t} = Σ_{t'≥t} r_{i,t'}``, normalised by the group
    statistics of the *total* returns ``G_{·,0}``::

        A_{i,t} = (G_{i,t} − mean_G G_{·,0}) / (std_G G_{·,0} + 1e-6)

    Ragged input (one list of T_i per-turn rewards per trajectory, T_i ≥ 1), ragged output, applied
    to turn t's tokens by :func:`token_advantages`. std is the population std.

    If all total returns of the group are equal (std = 0) the group gets zeros: there is no
    between-trajectory signal, and the formula would otherwise divide a turn's non-zero
    return-to-go difference by 1e-6 (e.g. [1, 0] in every trajectory → A_{i,1} = −10⁶). Equal
    means within :data:`REWARD_ATOL`: [0.1, 0.2, 0.3] and [0.3, 0.2, 0.1] sum to totals one ulp
    apart, which exact comparison called different (advantages down to −5·10⁵).
    ``scale_rewards="none"`` drops the division, as in :func:`group_based`.
    """
    if scale_rewards not in ("group", "none"):
        raise ValueError(f"scale_rewards must be 'group' or 'none', got {scale_rewards!r}")
    if any(len(r) == 0 for r in per_turn_rewards):
        raise ValueError("group_based_per_turn needs at least one reward per trajectory")
    # Return-to-go: reversed cumulative sum over turns. [(T_i,)] float64
    rtg = [_as_rewards(r).flip(0).cumsum(0).flip(0) for r in per_turn_rewards]
    totals = torch.stack([g[0] for g in rtg]) if rtg else torch.zeros(0)  # (G,)
    if _all_equal(totals):
        return [torch.zeros(g.shape, dtype=torch.float32) for g in rtg]
    mean = totals.mean()
    scale = totals.std(unbiased=False) + EPS if scale_rewards == "group" else 1.0
    return [((g - mean) / scale).float() for g in rtg]


ADVANTAGES: dict[str, AdvantageFn] = {
    "group_based": group_based,
    "rloo": rloo,
    "grpo_passk": grpo_passk,
    "group_based_per_turn": group_based_per_turn,
}
"""Advantage estimators by ``advantage_method`` name."""

PER_TURN_METHODS = frozenset({"group_based_per_turn"})
"""Estimators that take per-turn reward lists (the others take one scalar per trajectory)."""


def get_advantage_fn(name: str) -> AdvantageFn:
    """The estimator registered as ``name``; a :class:`UserError` listing the known ones."""
    try:
        return ADVANTAGES[name]
    except KeyError:
        known = ", ".join(sorted(ADVANTAGES))
        raise UserError(f"unknown advantage_method {name!r}; known: {known}") from None


def group_by(items: Sequence[Trajectory] | Sequence[str]) -> list[list[int]]:
    """Indices of ``items`` grouped by group id (a trajectory's ``group_id``, or the string
    itself), groups in order of first appearance, indices ascending within a group."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        key = item.group_id if isinstance(item, Trajectory) else str(item)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


@dataclass
class AdvantageResult:
    """What :func:`compute_advantages` returns."""

    advantages: list[Tensor]
    """One per trajectory, in the order of the input rewards: shape () for a scalar advantage,
    (T_i,) for per-turn advantages (``group_based_per_turn`` on a per-turn reward)."""
    zero_groups: list[int]
    """Indices (into ``groups``) of the groups whose advantages are all zero: no gradient. The
    estimator's own verdict (all rewards equal; for ``grpo_passk``, all succeed or all fail)."""


def compute_advantages(
    rewards: Sequence[Reward],
    groups: Sequence[Sequence[int]],
    method: str = "group_based",
    **kwargs: object,
) -> AdvantageResult:
    """Run the estimator ``method`` over each group (indices into ``rewards``, from
    :func:`group_by`) and put the advantages back in input order.

    ``kwargs`` go to the estimator (:func:`estimator_kwargs` picks them from a config). A
    per-turn reward given to a scalar estimator counts as its sum (the total return). A scalar
    reward given to ``group_based_per_turn`` is a reward on the last turn, so its return-to-go is
    the same at every turn: it gets a scalar advantage (shape ()).
    """
    fn = get_advantage_fn(method)
    per_turn = method in PER_TURN_METHODS
    out: list[Tensor | None] = [None] * len(rewards)
    zero: list[int] = []
    for g, group in enumerate(groups):
        rs = [rewards[i] for i in group]
        if per_turn:
            lists = [[float(r)] if isinstance(r, (int, float)) else list(r) for r in rs]
            advs = list(fn(lists, **kwargs))  # G tensors of shape (T_i,)
            advs = [
                a[0] if isinstance(r, (int, float)) else a for a, r in zip(advs, rs, strict=True)
            ]
        else:
            totals = [float(r) if isinstance(r, (int, float)) else float(sum(r)) for r in rs]
            advs = list(fn(totals, **kwargs))  # G tensors of shape ()
        if all(not bool(torch.any(a != 0)) for a in advs):
            zero.append(g)
        for i, a in zip(group, advs, strict=True):
            out[i] = a
    if any(a is None for a in out):
        raise ValueError("groups do not cover every trajectory")
    return AdvantageResult(advantages=[a for a in out if a is not None], zero_groups=zero)


def estimator_kwargs(
    method: str, *, scale_rewards: str, pass_k: int, success_threshold: float
) -> dict[str, object]:
    """The config knobs estimator ``method`` takes (the others ignore them)."""
    if method in ("group_based", "group_based_per_turn"):
        return {"scale_rewards": scale_rewards}
    if method == "grpo_passk":
        return {"k": pass_k, "success_threshold": success_threshold}
    return {}


@dataclass
class BatchAdvantages:
    """A step's advantages, one per trajectory, and the groups that carry no gradient."""

    advantages: list[Tensor]
    zero_group_ids: set[str]


def batch_advantages(
    trajectories: Sequence[Trajectory], method: str, **kwargs: object
) -> BatchAdvantages:
    """Group advantages of a step's trajectories (grouped by ``group_id``).

    A failed environment is not the policy's doing: its trajectory scores 0 here and is left out
    of training (:func:`mtrl_local.train.batching.build_examples`).
    """
    rewards: list[Reward] = [
        0.0 if t.failed or t.reward is None else t.reward for t in trajectories
    ]
    groups = group_by(trajectories)
    result = compute_advantages(rewards, groups, method, **kwargs)
    zero = {trajectories[groups[g][0]].group_id for g in result.zero_groups}
    return BatchAdvantages(result.advantages, zero)


def token_advantages(
    advantage: float | Tensor | Sequence[float], turns: Sequence[TurnSpan], seq_len: int
) -> Tensor:  # (seq_len,)
    """One trajectory's advantage on its tokens: turn t's span ``[start:end)`` gets the scalar
    advantage (shape () or a float) or, for a per-turn advantage (shape (n_turns,)), ``A_t``;
    every other token (prompt, tool results, template glue, padding) gets 0."""
    adv = torch.as_tensor(advantage, dtype=torch.float32).detach()
    if adv.dim() == 1 and adv.numel() != len(turns):
        raise ValueError(f"{adv.numel()} per-turn advantages for {len(turns)} turns")
    if adv.dim() > 1:
        raise ValueError(f"advantage must be a scalar or (n_turns,), got {tuple(adv.shape)}")
    out = torch.zeros(seq_len, dtype=torch.float32)  # (seq_len,)
    for t, span in enumerate(turns):
        if not 0 <= span.start <= span.end <= seq_len:
            raise ValueError(f"turn span {span.start}:{span.end} outside a sequence of {seq_len}")
        out[span.start : span.end] = adv if adv.dim() == 0 else adv[t]
    return out
