"""Policy losses: a per-token term per loss, picked by name, and the steps every loss shares.

Notation, per token (docs/design.md, "Losses"): ``logπθ`` = ``logprobs`` (the trainer's, with
grad), ``logπ_old`` = ``old_logprobs`` (the trainer's logprobs before this update, detached;
on-policy they equal ``logprobs.detach()``), ``logμ`` = ``behaviour_logprobs`` (what the sampler
reported), ``r = exp(logπθ − logπ_old)``, ``A`` = advantages, ``sg`` = stop-gradient. Every tensor
is (B, T), aligned so that position t holds the logprob of token t (the caller shifts the logits),
and ``mask`` is 1 on sampled assistant tokens only: the prompt, tool results and template glue
are context the policy did not choose, so they get no loss. A row is one whole trajectory.

A loss in :data:`LOSSES` computes only its per-token term (:class:`LossTerm`). Everything else
happens once, in :func:`policy_loss`, whatever the loss:

1. the ratio, per token or per sequence (``importance_sampling_level``, :func:`importance_ratio`:
   GSPO's sequence ratio in its GSPO-token form);
2. the loss's per-token term and which tokens its clip or cap acted on;
3. the **sampler/trainer correction**: μ differs from π_old even on-policy (vLLM kernels, bf16,
   a stale policy version under async rollouts), so each token's term is multiplied by a
   detached importance weight built from π_old/μ, truncated at C = ``tis_cap`` or masked outside
   [1/C, C], per token or per sequence (``is_correction``, :mod:`mtrl_local.sampler_correction`);
   ``None`` disables it, and no ``behaviour_logprobs`` means w = 1;
4. **aggregation** (:func:`aggregate`): ``token_mean``, ``seq_mean_token_mean`` or ``dr_grpo``.
   Under gradient accumulation pass the *global* ``num_tokens`` (or ``num_sequences``): the
   micro-batches' losses then sum to the full-batch loss, and so do their gradients;
5. the KL term ``β·aggregate(k)`` to the reference, k one of the estimators of
   :mod:`mtrl_local.kl` (``kl_estimator``, default k3), same aggregation and normaliser;
6. the entropy bonus ``−c_H·(mean token entropy)`` when ``entropy_coef`` > 0;
7. the metrics, detached 0-d tensors (no device sync here; the trainer calls ``.item()``).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from mtrl_local.config import LOSS_EPSILONS, Aggregation
from mtrl_local.errors import UserError
from mtrl_local.kl import get_kl_fn
from mtrl_local.sampler_correction import (
    Correction,
    sampler_correction,
    sampler_ratio,
    sequence_mean,
)

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
    """CISPO (MiniMax-M1, arXiv 2506.13585): ``−sg(clip(r, 1−ε_low, ε_high))·A·logπθ``.

    The clip acts on the (detached) IS weight, not on the objective, so a clipped token still gets
    the gradient ``−clip(r)·A·∇logπθ``. **ε_high is the cap on the weight itself**, as in TRL's
    ``loss_type="cispo"`` (ScaleRL's ε_max), not a distance from 1 as in PPO; ε_low stays a
    distance (the weight is at least 1 − ε_low). Recipe defaults ε_low = 1.0 (no lower bound),
    ε_high = 7.0 (the 1 + 6.0 of MiniMax-M1's ε_high = 6.0 before the names were aligned).
    """
    weight = ratio.detach().clamp(1 - epsilon_low, epsilon_high)  # (B, T)
    clipped = (ratio > epsilon_high) | (ratio < 1 - epsilon_low)
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
    max_tokens: float | None = None,
) -> Tensor:  # ()
    """Reduce a (B, T) per-token loss to a scalar.

    ``token_mean``: ``Σ_{b,t} ℓ·m / N``, N = ``num_tokens`` or, if None, ``Σ m`` (this batch).
    ``seq_mean_token_mean``: ``Σ_b (Σ_t ℓ·m / Σ_t m) / S``, S = ``num_sequences`` or, if None,
    the number of sequences with at least one masked token (an empty row adds nothing).
    ``dr_grpo`` (Dr. GRPO, arXiv 2503.20783; TRL's ``loss_type="dr_grpo"``, verl's
    ``seq-mean-token-sum-norm``): ``Σ_{b,t} ℓ·m / (S · L)``, L = ``max_tokens`` (required), the
    most loss tokens a sequence can have: a constant, so a long sequence's tokens weigh as much
    as a short one's (no length bias either way).
    """
    keep = mask.bool()  # (B, T)
    # where, not multiply: a non-finite value on a padding position must not leak (inf·0 = nan).
    masked = torch.where(keep, per_token, 0)  # (B, T)
    if aggregation == "token_mean":
        denom = keep.sum() if num_tokens is None else torch.as_tensor(num_tokens)
        return masked.sum() / denom.clamp(min=1)
    lengths = keep.sum(-1)  # (B,)
    n_seq = (lengths > 0).sum() if num_sequences is None else torch.as_tensor(num_sequences)
    if aggregation == "seq_mean_token_mean":
        per_seq = masked.sum(-1) / lengths.clamp(min=1)  # (B,)
        return per_seq.sum() / n_seq.clamp(min=1)
    if aggregation == "dr_grpo":
        if max_tokens is None:
            raise ValueError("the dr_grpo aggregation needs max_tokens (its constant length)")
        return masked.sum() / (n_seq * max_tokens).clamp(min=1)
    raise ValueError(
        f"aggregation must be token_mean, seq_mean_token_mean or dr_grpo, got {aggregation!r}"
    )


def importance_ratio(
    logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, level: str = "token"
) -> Tensor:  # (B, T)
    """The ratio the loss terms clip, by ``importance_sampling_level`` (TRL's name).

    ``token``: ``r_t = exp(logπθ − logπ_old)``. ``sequence`` (GSPO, arXiv 2507.18071, in its
    GSPO-token form): ``s_{i,t} = sg[s_i]·πθ(y_t)/sg[πθ(y_t)]`` with
    ``s_i = exp(mean_t (logπθ − logπ_old))`` over the sequence's mask tokens. Its value is s_i on
    every token of sequence i (so the clip keeps or drops whole sequences) and its gradient is
    ``s_i·∇logπθ(y_t)``: with one advantage per sequence this is GSPO's gradient, and per-turn
    advantages still land on their own tokens. GSPO's ε are small (~3e-4 / 4e-4).
    """
    if level == "token":
        return torch.exp(logprobs - old_logprobs)
    if level == "sequence":
        log_s = sequence_mean((logprobs - old_logprobs).detach(), mask)  # (B, 1)
        return torch.exp(log_s + logprobs - logprobs.detach())  # value s_i, gradient s_i·∇logπθ
    raise ValueError(f"importance_sampling_level must be token or sequence, got {level!r}")


def _metrics(ratio: Tensor, clipped: Tensor, is_ratio: Tensor, mask: Tensor) -> Metrics:
    """What every loss reports, as masked means over this batch (detached)."""
    with torch.no_grad():
        return {
            "clip_frac": masked_mean(clipped.float(), mask),
            "ratio_mean": masked_mean(ratio.detach(), mask),
            "is_ratio_mean": masked_mean(is_ratio, mask),
        }


def _correction_metrics(correction: Correction, mode: str, mask: Tensor) -> Metrics:
    """The share of loss tokens whose sampler weight was truncated (``is_trunc_frac``) or, in
    the mask modes, rejected (``is_rejected_frac``)."""
    if mode.endswith("mask"):
        return {"is_rejected_frac": masked_mean(correction.rejected.float(), mask)}
    return {"is_trunc_frac": masked_mean(correction.truncated.float(), mask)}


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
    max_tokens: float | None = None,
    importance_sampling_level: str = "token",
    is_correction: str = "token_truncate",
    kl_estimator: str = "k3",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """The loss ``name`` on one (micro-)batch: ``(scalar with grad, metrics)``.

    ``aggregate(term · w) + β·aggregate(kl) − entropy_coef·mean_t H`` (module docstring, steps
    1–7). ``epsilon_low`` / ``epsilon_high`` default to the loss's recipe values
    (:data:`mtrl_local.config.LOSS_EPSILONS`). ``metrics["kl"]`` is the masked mean of the
    ``kl_estimator`` when ``ref_logprobs`` is given; β > 0 requires it. ``entropy`` (B, T), with
    its gradient, is required when ``entropy_coef`` > 0; the bonus is its mean over the loss
    tokens (normalised by ``num_tokens`` whatever the aggregation, as in TRL, so ``entropy_coef``
    means the same under every aggregation).
    """
    term = get_loss_fn(name)
    default_low, default_high = LOSS_EPSILONS[name]
    ratio = importance_ratio(logprobs, old_logprobs, mask, importance_sampling_level)  # (B, T)
    per_token, clipped = term(
        logprobs,
        ratio,
        advantages,
        epsilon_low=default_low if epsilon_low is None else epsilon_low,
        epsilon_high=default_high if epsilon_high is None else epsilon_high,
        is_cap=is_cap,
    )
    correction = sampler_correction(
        old_logprobs, behaviour_logprobs, mask, mode=is_correction, cap=tis_cap
    )
    norm = (aggregation, num_tokens, num_sequences, max_tokens)
    loss = aggregate(per_token * correction.weight, mask, *norm)
    metrics = _metrics(ratio, clipped, sampler_ratio(old_logprobs, behaviour_logprobs), mask)
    metrics.update(_correction_metrics(correction, is_correction, mask))
    if ref_logprobs is not None:
        kl = get_kl_fn(kl_estimator)(logprobs, ref_logprobs)  # (B, T)
        metrics["kl"] = masked_mean(kl.detach(), mask)
        if beta:
            loss = loss + beta * aggregate(kl, mask, *norm)
    elif beta:
        raise ValueError("beta > 0 needs ref_logprobs")
    if entropy_coef:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs entropy")
        loss = loss - entropy_coef * aggregate(entropy, mask, "token_mean", num_tokens)
    metrics["loss"] = loss.detach()
    return loss, metrics
