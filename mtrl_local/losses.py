"""Policy losses: a per-token term per loss, picked by name, and the steps every loss shares.

Notation, per token (docs/design.md, "Losses"): ``logπθ`` = ``logprobs`` (the trainer's, with
grad), ``logπ_old`` = ``old_logprobs`` (the trainer's logprobs before this update, detached;
on-policy they equal ``logprobs.detach()``), ``logμ`` = ``behaviour_logprobs`` (what the sampler
reported), ``r = exp(logπθ − logπ_old)``, ``A`` = advantages, ``sg`` = stop-gradient. Every tensor
is (B, T), aligned so that position t holds the logprob of token t (the caller shifts the logits),
and ``mask`` is 1 on sampled assistant tokens only: the prompt, tool results and template glue
are context the policy did not choose, so they get no loss.

A loss in :data:`LOSSES` computes only its per-token term (:class:`LossTerm`). Everything else
happens once, in :func:`policy_loss`, whatever the loss:

1. ``r`` from the two logprobs;
2. the loss's per-token term and which tokens its clip or cap acted on;
3. the **sampler/trainer correction**: μ differs from π_old even on-policy (vLLM kernels, bf16,
   a stale policy version under async rollouts), so each token's term is multiplied by the
   truncated importance weight ``w = sg(min(π_old/μ, C))`` (TIS: Yao et al. 2025, "Your
   efficient RL framework secretly brings you off-policy RL training"); C = ``tis_cap``,
   ``None`` disables it, and no ``behaviour_logprobs`` means w = 1;
4. **aggregation**: ``token_mean`` is Σ over every masked token of the global batch / their
   number; ``seq_mean_token_mean`` the mean over each sequence's masked tokens, then the mean
   over the sequences. Under gradient accumulation pass the *global* ``num_tokens`` (or
   ``num_sequences``): the micro-batches' losses then sum to the full-batch loss, and so do
   their gradients;
5. the KL term ``β·aggregate(k3)`` to the reference, same aggregation and normaliser;
6. the metrics, detached 0-d tensors (no device sync here; the trainer calls ``.item()``).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from mtrl_local.config import LOSS_EPSILONS, Aggregation
from mtrl_local.errors import UserError

Metrics = dict[str, Tensor]


class LossTerm(Protocol):
    """A loss's per-token term: ``(term (B, T), clipped (B, T) bool)``.

    ``clipped`` marks the tokens whose clip or cap acted (``clip_frac``). A term ignores the
    parameters it does not use (``is_cap`` outside ``is``, the ε's in ``is``).
    """

    def __call__(
        self,
        logprobs: Tensor,
        ratio: Tensor,
        advantages: Tensor,
        *,
        epsilon_low: float,
        epsilon_high: float,
        is_cap: float,
    ) -> tuple[Tensor, Tensor]: ...


# -- the per-token terms -------------------------------------------------------------------------


def ppo_term(
    logprobs: Tensor,
    ratio: Tensor,
    advantages: Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    is_cap: float,
) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017): ``−min(r·A, clip(r, 1−ε_low, 1+ε_high)·A)``.

    Where the clipped term binds (A > 0 and r > 1+ε_high, or A < 0 and r < 1−ε_low) the token has
    zero gradient; those tokens are ``clipped``. No dual clip (TRL has none either).
    """
    unclipped = ratio * advantages  # (B, T)
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * advantages  # (B, T)
    binds = ((advantages > 0) & (ratio > 1 + epsilon_high)) | (
        (advantages < 0) & (ratio < 1 - epsilon_low)
    )
    return -torch.min(unclipped, clipped), binds


def cispo_term(
    logprobs: Tensor,
    ratio: Tensor,
    advantages: Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    is_cap: float,
) -> tuple[Tensor, Tensor]:
    """CISPO (MiniMax-M1, arXiv 2506.13585): ``−sg(clip(r, 1−ε_low, 1+ε_high))·A·logπθ``.

    The clip acts on the (detached) IS weight, not on the objective, so a clipped token still gets
    the gradient ``−clip(r)·A·∇logπθ``. Recipe defaults ε_low = 1.0 (no lower bound), ε_high =
    6.0. Here ε_high is a distance from 1 (the weight is capped at 1 + ε_high), as in PPO.
    """
    weight = ratio.detach().clamp(1 - epsilon_low, 1 + epsilon_high)  # (B, T)
    clipped = (ratio > 1 + epsilon_high) | (ratio < 1 - epsilon_low)
    return -weight * advantages * logprobs, clipped


def is_term(
    logprobs: Tensor,
    ratio: Tensor,
    advantages: Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    is_cap: float,
) -> tuple[Tensor, Tensor]:
    """Truncated importance-sampling policy gradient: ``−sg(min(r, is_cap))·A·logπθ``.

    On-policy (r = 1) this is REINFORCE with advantages. Tokens with r > ``is_cap`` are clipped.
    """
    weight = ratio.detach().clamp(max=is_cap)  # (B, T)
    return -weight * advantages * logprobs, ratio > is_cap


LOSSES: dict[str, LossTerm] = {"ppo": ppo_term, "cispo": cispo_term, "is": is_term}
"""Per-token loss terms by ``loss_type`` name."""


def get_loss_fn(name: str) -> LossTerm:
    """The term registered as ``name``; a :class:`UserError` listing the known ones."""
    try:
        return LOSSES[name]
    except KeyError:
        known = ", ".join(sorted(LOSSES))
        raise UserError(f"unknown loss_type {name!r}; known: {known}") from None


# -- the shared steps ----------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:  # ()
    """Mean of ``x`` (B, T) over ``mask`` (B, T); 0 when the mask is empty."""
    keep = mask.bool()
    return torch.where(keep, x, 0).sum() / keep.sum().clamp(min=1)


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    aggregation: Aggregation = "token_mean",
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
) -> Tensor:  # ()
    """Reduce a (B, T) per-token loss to a scalar.

    ``token_mean``: ``Σ_{b,t} ℓ·m / N``, N = ``num_tokens`` or, if None, ``Σ m`` (this batch).
    ``seq_mean_token_mean``: ``Σ_b (Σ_t ℓ·m / Σ_t m) / S``, S = ``num_sequences`` or, if None,
    the number of sequences with at least one masked token (an empty row adds nothing).
    """
    keep = mask.bool()  # (B, T)
    # where, not multiply: a non-finite value on a padding position must not leak (inf·0 = nan).
    masked = torch.where(keep, per_token, 0)  # (B, T)
    if aggregation == "token_mean":
        denom = keep.sum() if num_tokens is None else torch.as_tensor(num_tokens)
        return masked.sum() / denom.clamp(min=1)
    if aggregation == "seq_mean_token_mean":
        lengths = keep.sum(-1)  # (B,)
        per_seq = masked.sum(-1) / lengths.clamp(min=1)  # (B,)
        n_seq = (lengths > 0).sum() if num_sequences is None else torch.as_tensor(num_sequences)
        return per_seq.sum() / n_seq.clamp(min=1)
    raise ValueError(f"aggregation must be token_mean or seq_mean_token_mean, got {aggregation!r}")


def sampler_ratio(old_logprobs: Tensor, behaviour_logprobs: Tensor | None) -> Tensor:  # (B, T)
    """``π_old/μ`` per token, detached; ones when there is no μ."""
    if behaviour_logprobs is None:
        return torch.ones_like(old_logprobs)
    return torch.exp(old_logprobs - behaviour_logprobs).detach()


def truncated_is_weight(
    old_logprobs: Tensor, behaviour_logprobs: Tensor | None, tis_cap: float | None
) -> Tensor:  # (B, T)
    """``sg(min(π_old/μ, C))`` per token (TIS); ones when there is no μ or C is None."""
    if behaviour_logprobs is None or tis_cap is None:
        return torch.ones_like(old_logprobs)
    return torch.exp(old_logprobs - behaviour_logprobs).detach().clamp(max=tis_cap)


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:  # (B, T)
    """Schulman's k3 estimator of KL(πθ ‖ π_ref) per token, ≥ 0 and unbiased under πθ samples:
    ``exp(δ) − 1 − δ`` with ``δ = ref − logp``. Gradient flows through ``logprobs``.

    Computed as ``expm1(δ) − δ``: in float32 ``exp(δ) − δ − 1`` rounds to a small negative
    number for |δ| ~ 1e-6 (−6e-8 at δ = 1e-6); the clamp keeps the last ulp of rounding from
    making it negative."""
    delta = ref_logprobs - logprobs  # (B, T)
    return (torch.expm1(delta) - delta).clamp_min(0.0)


def _metrics(
    ratio: Tensor, clipped: Tensor, is_ratio: Tensor, tis_cap: float | None, mask: Tensor
) -> Metrics:
    """What every loss reports, as masked means over this batch (detached)."""
    with torch.no_grad():
        truncated = is_ratio > tis_cap if tis_cap is not None else torch.zeros_like(clipped)
        return {
            "clip_frac": masked_mean(clipped.float(), mask),
            "ratio_mean": masked_mean(ratio.detach(), mask),
            "is_ratio_mean": masked_mean(is_ratio, mask),
            "is_trunc_frac": masked_mean(truncated.float(), mask),
        }


def policy_loss(
    name: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    behaviour_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float | None = None,
    epsilon_high: float | None = None,
    is_cap: float = 2.0,
    tis_cap: float | None = 2.0,
    aggregation: Aggregation = "token_mean",
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """The loss ``name`` on one (micro-)batch: ``(scalar with grad, metrics)``.

    ``aggregate(term · w) + β·aggregate(k3)`` (module docstring, steps 1–6). ``epsilon_low`` /
    ``epsilon_high`` default to the loss's recipe values (:data:`mtrl_local.config.LOSS_EPSILONS`).
    ``metrics["kl"]`` is the masked mean k3 when ``ref_logprobs`` is given; β > 0 requires it.
    """
    term = get_loss_fn(name)
    default_low, default_high = LOSS_EPSILONS[name]
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    per_token, clipped = term(
        logprobs,
        ratio,
        advantages,
        epsilon_low=default_low if epsilon_low is None else epsilon_low,
        epsilon_high=default_high if epsilon_high is None else epsilon_high,
        is_cap=is_cap,
    )
    tis = truncated_is_weight(old_logprobs, behaviour_logprobs, tis_cap)  # (B, T) sampler→trainer
    loss = aggregate(per_token * tis, mask, aggregation, num_tokens, num_sequences)
    is_ratio = sampler_ratio(old_logprobs, behaviour_logprobs)
    metrics = _metrics(ratio, clipped, is_ratio, tis_cap, mask)
    if ref_logprobs is not None:
        kl = kl_k3(logprobs, ref_logprobs)  # (B, T)
        metrics["kl"] = masked_mean(kl.detach(), mask)
        if beta:
            loss = loss + beta * aggregate(kl, mask, aggregation, num_tokens, num_sequences)
    elif beta:
        raise ValueError("beta > 0 needs ref_logprobs")
    metrics["loss"] = loss.detach()
    return loss, metrics
