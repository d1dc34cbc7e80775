"""Per-token estimators of KL(πθ ‖ π_ref) from tokens sampled by πθ, picked by name.

Schulman, "Approximating KL divergence" (2020). With ``δ = logπ_ref − logπθ`` on a sampled token
(both (B, T), ``logπθ`` with grad):

* ``k1 = −δ``: unbiased, but negative on some tokens and high-variance;
* ``k2 = δ²/2``: ≥ 0, biased (low bias while the policies are close);
* ``k3 = exp(δ) − 1 − δ``: ≥ 0 and unbiased (the default; GRPO's and TRL's).

Each returns the per-token estimate with its gradient through ``logprobs``;
:func:`mtrl_local.losses.policy_loss` aggregates it like the policy term and adds ``β·aggregate``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mtrl_local.errors import UserError

KLEstimatorFn = Callable[[Tensor, Tensor], Tensor]


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:  # (B, T)
    """``k1 = −δ = logπθ − logπ_ref``; its gradient with respect to ``logprobs`` is 1."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:  # (B, T)
    """``k2 = δ²/2``; gradient ``−δ`` with respect to ``logprobs``."""
    return 0.5 * (ref_logprobs - logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:  # (B, T)
    """``k3 = exp(δ) − 1 − δ``, ≥ 0 and unbiased under πθ samples; gradient ``1 − exp(δ)``.

    Computed as ``expm1(δ) − δ``: in float32 ``exp(δ) − δ − 1`` rounds to a small negative
    number for |δ| ~ 1e-6 (−6e-8 at δ = 1e-6); the clamp keeps the last ulp of rounding from
    making it negative."""
    delta = ref_logprobs - logprobs  # (B, T)
    return (torch.expm1(delta) - delta).clamp_min(0.0)


KL_ESTIMATORS: dict[str, KLEstimatorFn] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
"""KL estimators by ``kl_estimator`` name."""


def get_kl_fn(name: str) -> KLEstimatorFn:
    """The estimator registered as ``name``; a :class:`UserError` listing the known ones."""
    try:
        return KL_ESTIMATORS[name]
    except KeyError:
        known = ", ".join(sorted(KL_ESTIMATORS))
        raise UserError(f"unknown kl_estimator {name!r}; known: {known}") from None
