"""Policy losses on tiny tensors, ratios and gradients worked out by hand, and in float64 against
the losses as they were before each became a per-token term."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtrl_local.config import Aggregation
from mtrl_local.errors import UserError
from mtrl_local.kl import kl_k3
from mtrl_local.losses import (
    LOSSES,
    aggregate,
    cispo_term,
    get_loss_fn,
    policy_loss,
)
from tests.legacy import losses_e4464ff as legacy


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def close(actual: torch.Tensor, expected: float | list[list[float]], tol: float = 1e-5) -> None:
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=torch.float32), atol=tol, rtol=0
    )


# Four tokens, π_old = 0.4 everywhere, ratios r = [1.5, 1.5, 0.5, 0.5], advantages [+1, −1, −1, +1].
OLD = torch.full((1, 4), math.log(0.4))
RATIOS = [1.5, 1.5, 0.5, 0.5]
ADV = t([1.0, -1.0, -1.0, 1.0])
MASK = torch.ones(1, 4)


def current() -> torch.Tensor:
    """logπθ = logπ_old + log r, a leaf with grad."""
    return (OLD + torch.log(t(RATIOS))).requires_grad_()


def test_ppo_clip_blocks_the_gradient_on_the_binding_side() -> None:
    # ε = 0.2/0.2 → clip range [0.8, 1.2]. Per token −min(r·A, clip(r)·A):
    #   r=1.5, A=+1: min(1.5, 1.2) = 1.2 → loss −1.2, clipped term binds → ∂/∂logπ = 0
    #   r=1.5, A=−1: min(−1.5, −1.2) = −1.5 → loss 1.5, ∂/∂logπ = −A·r = 1.5
    #   r=0.5, A=−1: min(−0.5, −0.8) = −0.8 → loss 0.8, binds → 0
    #   r=0.5, A=+1: min(0.5, 0.8) = 0.5 → loss −0.5, ∂/∂logπ = −0.5
    # token_mean over 4: loss (−1.2 + 1.5 + 0.8 − 0.5)/4 = 0.15; grads [0, 1.5, 0, −0.5]/4.
    logp = current()
    loss, metrics = policy_loss("ppo", logp, OLD, ADV, MASK)
    loss.backward()
    close(loss, 0.15)
    assert logp.grad is not None
    close(logp.grad, [[0.0, 0.375, 0.0, -0.125]])
    close(metrics["clip_frac"], 0.5)
    close(metrics["ratio_mean"], 1.0)
    close(metrics["is_ratio_mean"], 1.0)


def test_cispo_keeps_the_gradient_of_clipped_tokens() -> None:
    # Same tokens, ε_low = 0.2 and cap ε_high = 1.2 (TRL's meaning: the cap itself): weights
    # sg(clip(r, 0.8, 1.2)) = [1.2, 1.2, 0.8, 0.8]; ∂/∂logπ (−w·A·logπ) = −w·A =
    # [−1.2, 1.2, 0.8, −0.8], /4. The token PPO blocked (first) moves.
    logp = current()
    loss, metrics = policy_loss("cispo", logp, OLD, ADV, MASK, epsilon_low=0.2, epsilon_high=1.2)
    loss.backward()
    assert logp.grad is not None
    close(logp.grad, [[-0.3, 0.3, 0.2, -0.2]])
    close(metrics["clip_frac"], 1.0)
    # Recipe defaults (1.0, 7.0): no clip here, weights are the ratios themselves.
    logp = current()
    loss, metrics = policy_loss("cispo", logp, OLD, ADV, MASK)
    loss.backward()
    assert logp.grad is not None
    close(logp.grad, [[-0.375, 0.375, 0.125, -0.125]])
    close(metrics["clip_frac"], 0.0)


def test_is_loss_caps_the_ratio() -> None:
    # π_old = 0.1, πθ = 0.3 → r = 3, capped at 2; A = 1: loss −2·log 0.3 = 2.407946, grad −2.
    # Second token r = 0.5 (under the cap), A = −2: loss −0.5·(−2)·log 0.05 = −2.995732, grad 1.
    old = torch.log(t([0.1, 0.1]))
    logp = torch.log(t([0.3, 0.05])).requires_grad_()
    loss, metrics = policy_loss("is", logp, old, t([1.0, -2.0]), torch.ones(1, 2), is_cap=2.0)
    loss.backward()
    close(loss, (2.407946 - 2.995732) / 2)
    assert logp.grad is not None
    close(logp.grad, [[-1.0, 0.5]])
    close(metrics["clip_frac"], 0.5)


@pytest.mark.parametrize("name", ["ppo", "cispo", "is"])
def test_on_policy_gradients_agree(name: str) -> None:
    # r = 1 everywhere: every loss gives the policy gradient −A·mask / N (N = 3 masked tokens).
    logp = torch.log(t([0.2, 0.5, 0.9], [0.3, 0.6, 0.1])).requires_grad_()
    adv = t([1.0, 1.0, 1.0], [-2.0, -2.0, -2.0])
    mask = t([1.0, 1.0, 0.0], [1.0, 0.0, 0.0])
    loss, _ = policy_loss(name, logp, logp.detach(), adv, mask)
    loss.backward()
    assert logp.grad is not None
    close(logp.grad, [[-1 / 3, -1 / 3, 0.0], [2 / 3, 0.0, 0.0]])


def test_truncated_is_weight_between_sampler_and_trainer() -> None:
    # On-policy PPO (r = 1), A = 1. The sampler's μ: π_old/μ = 4 on token 0 → min(4, 2) = 2;
    # π_old/μ = 0.5 on token 1 → 0.5 (no truncation). grads −A·w/2 = [−1, −0.25].
    logp = torch.log(t([0.4, 0.2])).requires_grad_()
    mu = logp.detach() - torch.log(t([4.0, 0.5]))
    loss, metrics = policy_loss(
        "ppo", logp, logp.detach(), t([1.0, 1.0]), torch.ones(1, 2), behaviour_logprobs=mu
    )
    loss.backward()
    assert logp.grad is not None
    close(logp.grad, [[-1.0, -0.25]])
    close(metrics["is_ratio_mean"], 2.25)
    close(metrics["is_trunc_frac"], 0.5)
    # tis_cap=None switches the correction off (w = 1); an infinite cap is plain IS (w = 4).
    for cap, expected in ((None, [[-0.5, -0.5]]), (math.inf, [[-2.0, -0.25]])):
        logp.grad = None
        loss, _ = policy_loss(
            "ppo",
            logp,
            logp.detach(),
            t([1.0, 1.0]),
            torch.ones(1, 2),
            behaviour_logprobs=mu,
            tis_cap=cap,
        )
        loss.backward()
        assert logp.grad is not None
        close(logp.grad, expected)


def test_aggregations_by_hand() -> None:
    # Per-token loss −A (on-policy PPO). Sequence 0 has 3 masked tokens (A = 1, 2, 3; the 100 is
    # padding), sequence 1 has one (A = 6).
    #   token_mean          = −(1 + 2 + 3 + 6)/4      = −3
    #   seq_mean_token_mean = −((1 + 2 + 3)/3 + 6)/2  = −4
    logp = torch.log(t([0.5] * 4, [0.5] * 4))
    adv = t([1.0, 2.0, 3.0, 100.0], [6.0, 0.0, 0.0, 0.0])
    mask = t([1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0])
    loss, _ = policy_loss("ppo", logp, logp, adv, mask, aggregation="token_mean")
    close(loss, -3.0)
    loss, _ = policy_loss("ppo", logp, logp, adv, mask, aggregation="seq_mean_token_mean")
    close(loss, -4.0)
    # An all-padding row does not count as a sequence.
    loss, _ = policy_loss(
        "ppo",
        torch.cat([logp, logp[:1]]),
        torch.cat([logp, logp[:1]]),
        torch.cat([adv, adv[:1]]),
        torch.cat([mask, torch.zeros(1, 4)]),
        aggregation="seq_mean_token_mean",
    )
    close(loss, -4.0)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(adv, mask, "sum")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["ppo", "cispo", "is"])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_micro_batches_sum_to_the_full_batch(name: str, aggregation: Aggregation) -> None:
    # Off-policy on purpose (r ≠ 1, μ ≠ π_old) so the clip and the IS weight are exercised.
    gen = torch.Generator().manual_seed(0)
    logp = (-torch.rand(4, 6, generator=gen) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(4, 6, generator=gen)
    mu = old + 0.3 * torch.randn(4, 6, generator=gen)
    adv = torch.randn(4, 1, generator=gen).expand(4, 6)
    mask = (torch.rand(4, 6, generator=gen) > 0.3).float()
    mask[:, 0] = 1.0
    full, _ = policy_loss(
        name, logp, old, adv, mask, behaviour_logprobs=mu, aggregation=aggregation
    )
    (full_grad,) = torch.autograd.grad(full, logp)

    # Gradient accumulation: each micro-batch normalised by the global token / sequence count.
    total = torch.zeros(())
    for part in (slice(0, 1), slice(1, 4)):
        loss, _ = policy_loss(
            name,
            logp[part],
            old[part],
            adv[part],
            mask[part],
            behaviour_logprobs=mu[part],
            aggregation=aggregation,
            num_tokens=mask.sum(),
            num_sequences=4,
        )
        total = total + loss
    (micro_grad,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(micro_grad, full_grad)


def test_kl_k3() -> None:
    logp = torch.log(t([0.5, 0.25, 0.5]))
    # Equal → 0. ref − logp = ln 2: 2 − ln 2 − 1 = 0.306853; ref − logp = −ln 2: 0.5 + ln 2 − 1 =
    # 0.193147.
    close(kl_k3(logp, logp), [[0.0, 0.0, 0.0]])
    close(kl_k3(logp, torch.log(t([1.0, 0.125, 0.5]))), [[0.306853, 0.193147, 0.0]])


@settings(max_examples=100, deadline=None)
@given(st.floats(-8, 8), st.floats(-1e-4, 1e-4) | st.floats(-8, 8))
def test_kl_k3_matches_its_formula_in_float64(logp: float, delta: float) -> None:
    """k3 = exp(δ) − 1 − δ, δ = ref − logp, against the formula in float64 (small |δ| too, where
    float32 rounding of the naive form goes negative), and its gradient 1 − exp(δ)."""
    lp = torch.tensor([[logp]], dtype=torch.float32, requires_grad=True)
    ref = lp.detach() + delta
    kl = kl_k3(lp, ref)
    d = float(ref) - float(lp.detach())  # the δ the float32 tensors hold
    exact = math.expm1(d) - d
    assert float(kl.detach()) == pytest.approx(exact, rel=1e-4, abs=1e-7)
    kl.sum().backward()
    assert lp.grad is not None
    if exact > 1e-6:  # away from the clamp: the gradient is the formula's
        assert float(lp.grad) == pytest.approx(-math.expm1(d), rel=1e-4, abs=1e-6)


def test_policy_loss_adds_beta_kl() -> None:
    # A = 0, so the policy term is 0; KL per token [0.306853, 0.193147], token_mean 0.25,
    # β = 0.1 → loss 0.025.
    logp = torch.log(t([0.5, 0.25])).requires_grad_()
    ref = torch.log(t([1.0, 0.125]))
    mask = torch.ones(1, 2)
    loss, metrics = policy_loss(
        "ppo", logp, logp.detach(), torch.zeros(1, 2), mask, ref_logprobs=ref, beta=0.1
    )
    close(loss, 0.025)
    close(metrics["kl"], 0.25)
    close(metrics["loss"], 0.025)
    loss.backward()  # the KL term has a gradient: d/dlogp k3 = 1 − exp(ref − logp) = [−1, 0.5]
    assert logp.grad is not None
    close(logp.grad, [[-0.05, 0.025]])
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss("ppo", logp, logp.detach(), torch.zeros(1, 2), mask, beta=0.1)


def test_registry_and_unknown_name() -> None:
    assert set(LOSSES) == {"ppo", "cispo", "is"}
    assert get_loss_fn("cispo") is cispo_term
    with pytest.raises(UserError, match="known: cispo, is, ppo"):
        get_loss_fn("grpo")


@pytest.mark.parametrize("name", ["ppo", "cispo", "is"])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("extras", ["plain", "behaviour", "kl", "behaviour+kl+caps"])
def test_same_numbers_as_the_losses_before_the_per_token_terms(
    name: str, aggregation: Aggregation, extras: str
) -> None:
    """Float64, random off-policy inputs: the loss, its gradient and every metric equal those of
    the losses as they were at commit e4464ff (tests/legacy)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}{aggregation}{extras}".encode()))
    shape = (5, 9)
    logp0 = -torch.rand(shape, generator=gen, dtype=torch.float64) * 3
    old = logp0 + 0.4 * torch.randn(shape, generator=gen, dtype=torch.float64)
    mu = old + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    ref = logp0 + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    adv = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = (torch.rand(shape, generator=gen) > 0.3).double()
    eps_low, eps_high = (1.0, 6.0) if name == "cispo" else (0.2, 0.2)
    kwargs: dict[str, object] = {
        "epsilon_low": eps_low,
        "epsilon_high": eps_high,
        "aggregation": aggregation,
        "num_tokens": float(mask.sum()) + 3.0,
        "num_sequences": 7.0,
    }
    if "behaviour" in extras:
        kwargs["behaviour_logprobs"] = mu
    if "kl" in extras:
        kwargs.update(ref_logprobs=ref, beta=0.05)
    if "caps" in extras:
        kwargs.update(is_cap=1.3, tis_cap=1.5, epsilon_low=0.1, epsilon_high=0.3)
    # cispo's ε_high is now the cap itself (TRL's meaning); the legacy one was 1 + ε_high.
    new_kwargs = dict(kwargs)
    if name == "cispo":
        new_kwargs["epsilon_high"] = 1.0 + float(kwargs["epsilon_high"])  # type: ignore[arg-type]

    results = []
    for fn, fn_kwargs in ((policy_loss, new_kwargs), (legacy.policy_loss, kwargs)):
        logp = logp0.clone().requires_grad_()
        loss, metrics = fn(name, logp, old, adv, mask, **fn_kwargs)  # type: ignore[operator]
        (grad,) = torch.autograd.grad(loss, logp)
        results.append((loss.detach(), grad, {k: v.detach() for k, v in metrics.items()}))
    (new_loss, new_grad, new_m), (old_loss, old_grad, old_m) = results
    torch.testing.assert_close(new_loss, old_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(new_grad, old_grad, rtol=0, atol=1e-12)
    assert new_m.keys() == old_m.keys()
    for key in new_m:
        torch.testing.assert_close(new_m[key], old_m[key], rtol=0, atol=1e-12, msg=key)
