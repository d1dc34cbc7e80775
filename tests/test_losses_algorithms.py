"""The loss options beyond the defaults, on tiny tensors worked out by hand in the comments: GSPO's
sequence ratio, the Dr. GRPO aggregation, the KL estimators, the sampler-correction modes, the
entropy bonus and cispo's cap; and, with all of them on, micro-batches that still sum to the full
batch."""

from __future__ import annotations

import math

import pytest
import torch

from mtrl_local.errors import UserError
from mtrl_local.kl import KL_ESTIMATORS, get_kl_fn, kl_k1, kl_k2
from mtrl_local.losses import importance_ratio, policy_loss
from mtrl_local.sampler_correction import sampler_correction


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def close(actual: torch.Tensor, expected: float | list[list[float]], tol: float = 1e-5) -> None:
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=torch.float32), atol=tol, rtol=0
    )


# -- GSPO: importance_sampling_level = "sequence" -------------------------------------------------


def test_gspo_sequence_ratio_by_hand() -> None:
    # logπ_old = log 0.4; log-ratios ℓ: row 0 [0.2, 0.0], row 1 [0.5, 0.3]; a third, padding
    # position with ℓ = 5 (mask 0) must not count. A = +1, PPO ε = 0.2 (clip range [0.8, 1.2]).
    #   row 0: s = exp(mean(0.2, 0)) = e^0.1 = 1.105171, inside → term −s per token, gradient
    #          −s per token (both tokens, although token 0's own ratio e^0.2 = 1.2214 would clip);
    #   row 1: s = e^0.4 = 1.491825 > 1.2 and A > 0 → the clip binds: term −1.2, no gradient.
    # token_mean over 4 tokens: (−2·1.105171 − 2·1.2)/4 = −1.152585; grads −1.105171/4 = −0.276293.
    old = torch.full((2, 3), math.log(0.4))
    logp = (old + t([0.2, 0.0, 5.0], [0.5, 0.3, 5.0])).requires_grad_()
    mask = t([1.0, 1.0, 0.0], [1.0, 1.0, 0.0])
    adv = torch.ones(2, 3)
    loss, metrics = policy_loss("ppo", logp, old, adv, mask, importance_sampling_level="sequence")
    loss.backward()
    close(loss, -1.152585)
    assert logp.grad is not None
    close(logp.grad, [[-0.276293, -0.276293, 0.0], [0.0, 0.0, 0.0]])
    close(metrics["clip_frac"], 0.5)
    close(metrics["ratio_mean"], (2 * 1.105171 + 2 * 1.491825) / 4)
    # The token level on the same tokens: token 0 of row 0 (r = 1.2214) is clipped, token 1
    # (r = 1) gets −1/4; row 1's tokens (r = 1.65, 1.35) are both clipped.
    logp.grad = None
    loss, _ = policy_loss("ppo", logp, old, adv, mask)
    loss.backward()
    close(logp.grad, [[0.0, -0.25, 0.0], [0.0, 0.0, 0.0]])


def test_gspo_token_form_keeps_per_turn_advantages_on_their_tokens() -> None:
    # One sequence, ℓ = [0.2, 0.0] → s = e^0.1 = 1.105171 (inside the clip range); per-turn
    # advantages A = [+1, −1]: terms −s·A = [−1.105171, +1.105171]; each token's gradient is
    # −s·A_t/2 = [−0.552585, +0.552585] (GSPO-token: s_{i,t} = sg[s_i]·πθ(y_t)/sg[πθ(y_t)]).
    old = torch.full((1, 2), math.log(0.4))
    logp = (old + t([0.2, 0.0])).requires_grad_()
    ratio = importance_ratio(logp, old, torch.ones(1, 2), "sequence")
    close(ratio.detach(), [[1.105171, 1.105171]])
    loss, _ = policy_loss(
        "ppo", logp, old, t([1.0, -1.0]), torch.ones(1, 2), importance_sampling_level="sequence"
    )
    loss.backward()
    assert logp.grad is not None
    close(logp.grad, [[-0.552585, 0.552585]])
    with pytest.raises(ValueError, match="importance_sampling_level"):
        importance_ratio(logp, old, torch.ones(1, 2), "segment")


# -- Dr. GRPO aggregation --------------------------------------------------------------------------


def test_dr_grpo_divides_by_a_constant() -> None:
    # On-policy PPO, per-token loss −A. Sequence 0: three tokens A = 1, 2, 3 (the 100 is padding);
    # sequence 1: one token A = 6. Σ = −12; S = 2 sequences, L = 5 → −12/(2·5) = −1.2 (token_mean
    # would give −3, seq_mean_token_mean −4). Gradient −A/10 on every loss token, whatever the
    # length of its sequence.
    logp = torch.log(torch.full((2, 4), 0.5)).requires_grad_()
    adv = t([1.0, 2.0, 3.0, 100.0], [6.0, 0.0, 0.0, 0.0])
    mask = t([1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0])
    loss, _ = policy_loss(
        "ppo", logp, logp.detach(), adv, mask, aggregation="dr_grpo", max_tokens=5
    )
    loss.backward()
    close(loss, -1.2)
    assert logp.grad is not None
    close(logp.grad, [[-0.1, -0.2, -0.3, 0.0], [-0.6, 0.0, 0.0, 0.0]])
    # A global sequence count (gradient accumulation) replaces this batch's 2.
    loss, _ = policy_loss(
        "ppo", logp, logp.detach(), adv, mask, aggregation="dr_grpo", num_sequences=4, max_tokens=5
    )
    close(loss, -0.6)
    with pytest.raises(ValueError, match="max_tokens"):
        policy_loss("ppo", logp, logp.detach(), adv, mask, aggregation="dr_grpo")


# -- KL estimators ---------------------------------------------------------------------------------


def test_kl_estimators_by_hand() -> None:
    # δ = logπ_ref − logπθ = [ln 2, −ln 2, 0]:
    #   k1 = −δ     = [−0.693147, 0.693147, 0],   d/dlogπθ = 1
    #   k2 = δ²/2   = [0.240227, 0.240227, 0],    d/dlogπθ = −δ
    #   k3 = e^δ−1−δ = [0.306853, 0.193147, 0],   d/dlogπθ = 1 − e^δ = [−1, 0.5, 0]
    logp = torch.log(t([0.5, 0.25, 0.5]))
    ref = torch.log(t([1.0, 0.125, 0.5]))
    close(kl_k1(logp, ref), [[-0.693147, 0.693147, 0.0]])
    close(kl_k2(logp, ref), [[0.240227, 0.240227, 0.0]])
    close(get_kl_fn("k3")(logp, ref), [[0.306853, 0.193147, 0.0]])
    # In the loss: A = 0, β = 0.1, k2: 0.1·(2·0.240227)/3 = 0.016015, metric kl 0.160151;
    # gradient 0.1·(−δ)/3 = [−0.023105, 0.023105, 0].
    lp = logp.clone().requires_grad_()
    loss, metrics = policy_loss(
        "ppo", lp, lp.detach(), torch.zeros(1, 3), torch.ones(1, 3),
        ref_logprobs=ref, beta=0.1, kl_estimator="k2",
    )  # fmt: skip
    loss.backward()
    close(loss, 0.016015)
    close(metrics["kl"], 0.160151)
    assert lp.grad is not None
    close(lp.grad, [[-0.023105, 0.023105, 0.0]])
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    with pytest.raises(UserError, match="known: k1, k2, k3"):
        get_kl_fn("k4")


# -- sampler/trainer correction modes --------------------------------------------------------------

# ρ = π_old/μ per token, C = 2 (accept [0.5, 2]); a 4th, padding position with ρ = 100.
#   row 0: [4, 0.5, 1]   geometric mean (4·0.5·1)^(1/3) = 2^(1/3) = 1.259921
#   row 1: [8, 8, 1]     geometric mean 64^(1/3) = 4
#   row 2: [0.25, 0.25, 1] geometric mean 0.0625^(1/3) = 0.396850
RHO = t([4.0, 0.5, 1.0, 100.0], [8.0, 8.0, 1.0, 100.0], [0.25, 0.25, 1.0, 100.0])
RHO_MASK = t([1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0])
G0, G2 = 1.259921, 0.396850
CORRECTIONS = {
    # mode: (weights, share of the 9 loss tokens truncated or rejected)
    "token_truncate": ([[2, 0.5, 1], [2, 2, 1], [0.25, 0.25, 1]], 3 / 9),
    "token_mask": ([[0, 0.5, 1], [0, 0, 1], [0, 0, 1]], 5 / 9),
    "sequence_truncate": ([[G0] * 3, [2] * 3, [G2] * 3], 3 / 9),
    "sequence_mask": ([[G0] * 3, [0] * 3, [0] * 3], 6 / 9),
}


@pytest.mark.parametrize("mode", sorted(CORRECTIONS))
def test_sampler_correction_modes_by_hand(mode: str) -> None:
    weights, share = CORRECTIONS[mode]
    old = torch.log(torch.full((3, 4), 0.3))
    mu = old - torch.log(RHO)
    correction = sampler_correction(old, mu, RHO_MASK, mode=mode, cap=2.0)
    close(correction.weight[:, :3], weights)
    # On-policy PPO with A = 1: each loss token's gradient is −w/9.
    logp = old.clone().requires_grad_()
    loss, metrics = policy_loss(
        "ppo", logp, old, torch.ones(3, 4), RHO_MASK, behaviour_logprobs=mu, is_correction=mode
    )
    loss.backward()
    assert logp.grad is not None
    close(logp.grad[:, :3], [[-w / 9 for w in row] for row in weights])
    close(logp.grad[:, 3:], [[0.0]] * 3)
    key = "is_rejected_frac" if mode.endswith("mask") else "is_trunc_frac"
    close(metrics[key], share)
    assert ({"is_rejected_frac", "is_trunc_frac"} - {key}).isdisjoint(metrics)
    # No cap: no correction in any mode.
    off = sampler_correction(old, mu, RHO_MASK, mode=mode, cap=None)
    assert torch.equal(off.weight, torch.ones(3, 4)) and not off.rejected.any()


# -- entropy bonus ---------------------------------------------------------------------------------


def test_entropy_bonus_changes_the_gradient_by_hand() -> None:
    # One token, logits z = [0, ln 3] → p = [0.25, 0.75]; H = −Σ p ln p = 0.562335;
    # ∂H/∂z_j = −p_j (ln p_j + H) = [0.205990, −0.205990]. The policy term (A = 1, on-policy,
    # sampled token 1) is −logp_1 in gradient: ∂/∂z = p − onehot = [0.25, −0.25]. With
    # c_H = 0.1 the loss gains −0.1·H, so the gradient moves by −0.1·∂H/∂z = [−0.020599, 0.020599].
    grads = []
    for coef in (0.0, 0.1):
        z = torch.tensor([[[0.0, math.log(3.0)]]], requires_grad=True)  # (B=1, T=1, V=2)
        logp_all = torch.log_softmax(z, -1)
        logp = logp_all[..., 1]  # (1, 1) the sampled token is 1
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # (1, 1)
        close(entropy.detach(), [[0.562335]])
        loss, _ = policy_loss(
            "ppo", logp, logp.detach(), torch.ones(1, 1), torch.ones(1, 1),
            entropy=entropy, entropy_coef=coef,
        )  # fmt: skip
        (grad,) = torch.autograd.grad(loss, z)
        grads.append(grad[0, 0])
    close(grads[0][None], [[0.25, -0.25]])
    close((grads[1] - grads[0])[None], [[-0.020599, 0.020599]])
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(
            "ppo", logp, logp.detach(), torch.ones(1, 1), torch.ones(1, 1), entropy_coef=0.1
        )


# -- cispo's ε_high: the cap itself (TRL's meaning) -----------------------------------------------


def test_cispo_epsilon_high_is_the_cap_on_the_weight() -> None:
    # r = 1.5, A = 1, ε_high = 1.3: the weight is min(1.5, 1.3) = 1.3 (TRL: clamp(r, max=ε_high));
    # gradient −1.3. Before the fix the cap was 1 + 1.3 = 2.3, the weight 1.5 and the gradient −1.5.
    old = torch.log(t([0.4]))
    logp = (old + math.log(1.5)).requires_grad_()
    loss, metrics = policy_loss(
        "cispo", logp, old, torch.ones(1, 1), torch.ones(1, 1), epsilon_low=1.0, epsilon_high=1.3
    )
    loss.backward()
    assert logp.grad is not None
    close(logp.grad, [[-1.3]])
    close(metrics["clip_frac"], 1.0)


# -- everything on: micro-batches still sum to the full batch --------------------------------------


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "dr_grpo"])
@pytest.mark.parametrize("mode", sorted(CORRECTIONS))
def test_micro_batches_sum_to_the_full_batch_with_every_option(aggregation: str, mode: str) -> None:
    gen = torch.Generator().manual_seed(1)
    logp = (-torch.rand(4, 6, generator=gen) * 3).double().requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(4, 6, generator=gen).double()
    mu = old + 0.4 * torch.randn(4, 6, generator=gen).double()
    ref = old + 0.3 * torch.randn(4, 6, generator=gen).double()
    entropy = (torch.rand(4, 6, generator=gen) * 2).double().requires_grad_()
    adv = torch.randn(4, 6, generator=gen).double()  # per-token (per-turn) advantages
    mask = (torch.rand(4, 6, generator=gen) > 0.3).double()
    mask[:, 0] = 1.0
    options = {
        "behaviour_logprobs": mu,
        "ref_logprobs": ref,
        "beta": 0.05,
        "kl_estimator": "k2",
        "importance_sampling_level": "sequence",
        "is_correction": mode,
        "aggregation": aggregation,
        "max_tokens": 6,
        "entropy_coef": 0.03,
    }

    def run(part: slice, **norm: float) -> torch.Tensor:
        loss, _ = policy_loss(
            "ppo", logp[part], old[part], adv[part], mask[part],
            **{**options, "behaviour_logprobs": mu[part], "ref_logprobs": ref[part]},
            entropy=entropy[part], **norm,
        )  # fmt: skip
        return loss

    full = run(slice(0, 4))
    norm = {"num_tokens": float(mask.sum()), "num_sequences": 4.0}
    micro = run(slice(0, 1), **norm) + run(slice(1, 4), **norm)
    torch.testing.assert_close(micro, full)
    for a, b in zip(
        torch.autograd.grad(full, (logp, entropy)),
        torch.autograd.grad(micro, (logp, entropy)),
        strict=True,
    ):
        torch.testing.assert_close(a, b)
