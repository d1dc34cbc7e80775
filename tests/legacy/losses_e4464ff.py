"""The policy losses as they were at commit e4464ff, before each loss became a per-token term.

Kept verbatim (below this docstring) as an oracle: ``tests/test_losses.py`` checks in float64
that :func:`mtrl_local.losses.policy_loss` gives the same losses, gradients and metrics.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import Tensor

from mtrl_local.errors import UserError

Aggregation = Literal["token_mean", "seq_mean_token_mean"]
Metrics = dict[str, Tensor]


class LossFn(Protocol):
    """The signature every registered loss shares."""

    def __call__(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        behaviour_logprobs: Tensor | None = ...,
        epsilon_low: float = ...,
        epsilon_high: float = ...,
        is_cap: float = ...,
        tis_cap: float | None = ...,
        aggregation: Aggregation = ...,
        num_tokens: float | Tensor | None = ...,
        num_sequences: float | Tensor | None = ...,
    ) -> tuple[Tensor, Metrics]: ...


# -- shared pieces -------------------------------------------------------------------------------


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


def truncated_is_weight(
    old_logprobs: Tensor, behaviour_logprobs: Tensor | None, tis_cap: float | None
) -> Tensor:  # (B, T)
    """``sg(min(π_old/μ, C))`` per token (TIS); ones when there is no μ or C is None."""
    if behaviour_logprobs is None or tis_cap is None:
        return torch.ones_like(old_logprobs)
    return torch.exp(old_logprobs - behaviour_logprobs).detach().clamp(max=tis_cap)


def _metrics(
    ratio: Tensor,  # (B, T) πθ/π_old
    clipped: Tensor,  # (B, T) bool: the clip or cap acted on this token
    old_logprobs: Tensor,
    behaviour_logprobs: Tensor | None,
    tis_cap: float | None,
    mask: Tensor,
) -> Metrics:
    """What every loss reports, as masked means over this batch (detached)."""
    with torch.no_grad():
        if behaviour_logprobs is None:
            is_ratio = torch.ones_like(old_logprobs)
        else:
            is_ratio = torch.exp(old_logprobs - behaviour_logprobs)  # (B, T) π_old/μ
        truncated = is_ratio > tis_cap if tis_cap is not None else torch.zeros_like(clipped)
        return {
            "clip_frac": masked_mean(clipped.float(), mask),
            "ratio_mean": masked_mean(ratio.detach(), mask),
            "is_ratio_mean": masked_mean(is_ratio, mask),
            "is_trunc_frac": masked_mean(truncated.float(), mask),
        }


# -- the losses ----------------------------------------------------------------------------------


def ppo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    behaviour_logprobs: Tensor | None = None,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    is_cap: float = 2.0,
    tis_cap: float | None = 2.0,
    aggregation: Aggregation = "token_mean",
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017), per token:
    ``−min(r·A, clip(r, 1−ε_low, 1+ε_high)·A)``; defaults ε_low = ε_high = 0.2.

    Where the clipped term binds (A > 0 and r > 1+ε_high, or A < 0 and r < 1−ε_low) the token has
    zero gradient; ``clip_frac`` is the share of such tokens. ``is_cap`` is unused.
    """
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    unclipped = ratio * advantages  # (B, T)
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * advantages  # (B, T)
    per_token = -torch.min(unclipped, clipped)  # (B, T)
    binds = ((advantages > 0) & (ratio > 1 + epsilon_high)) | (
        (advantages < 0) & (ratio < 1 - epsilon_low)
    )
    tis = truncated_is_weight(old_logprobs, behaviour_logprobs, tis_cap)  # (B, T) sampler→trainer
    loss = aggregate(per_token * tis, mask, aggregation, num_tokens, num_sequences)
    return loss, _metrics(ratio, binds, old_logprobs, behaviour_logprobs, tis_cap, mask)


def cispo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    behaviour_logprobs: Tensor | None = None,
    epsilon_low: float = 1.0,
    epsilon_high: float = 6.0,
    is_cap: float = 2.0,
    tis_cap: float | None = 2.0,
    aggregation: Aggregation = "token_mean",
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """CISPO (MiniMax-M1, arXiv 2506.13585), per token:
    ``−sg(clip(r, 1−ε_low, 1+ε_high))·A·logπθ``.

    The clip acts on the (detached) IS weight, not on the objective, so a clipped token still gets
    the gradient ``−clip(r)·A·∇logπθ``. Recipe defaults ε_low = 1.0 (no lower bound) and
    ε_high = 6.0. ``clip_frac``: share of tokens whose weight was clipped. ``is_cap`` is unused.
    """
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    weight = ratio.detach().clamp(1 - epsilon_low, 1 + epsilon_high)  # (B, T)
    per_token = -weight * advantages * logprobs  # (B, T)
    clipped = (ratio > 1 + epsilon_high) | (ratio < 1 - epsilon_low)
    tis = truncated_is_weight(old_logprobs, behaviour_logprobs, tis_cap)  # (B, T) sampler→trainer
    loss = aggregate(per_token * tis, mask, aggregation, num_tokens, num_sequences)
    return loss, _metrics(ratio, clipped, old_logprobs, behaviour_logprobs, tis_cap, mask)


def is_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    behaviour_logprobs: Tensor | None = None,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    is_cap: float = 2.0,
    tis_cap: float | None = 2.0,
    aggregation: Aggregation = "token_mean",
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """Truncated importance-sampling policy gradient, per token:
    ``−sg(min(r, is_cap))·A·logπθ`` (default cap 2.0). On-policy (r = 1) this is REINFORCE with
    advantages. ``clip_frac``: share of tokens with r > is_cap. The ε's are unused.
    """
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    weight = ratio.detach().clamp(max=is_cap)  # (B, T)
    per_token = -weight * advantages * logprobs  # (B, T)
    tis = truncated_is_weight(old_logprobs, behaviour_logprobs, tis_cap)  # (B, T) sampler→trainer
    loss = aggregate(per_token * tis, mask, aggregation, num_tokens, num_sequences)
    return loss, _metrics(ratio, ratio > is_cap, old_logprobs, behaviour_logprobs, tis_cap, mask)


LOSSES: dict[str, LossFn] = {"ppo": ppo_loss, "cispo": cispo_loss, "is": is_loss}
"""Policy losses by ``loss_type`` name."""


def get_loss_fn(name: str) -> LossFn:
    """The loss registered as ``name``; a :class:`UserError` listing the known ones."""
    try:
        return LOSSES[name]
    except KeyError:
        known = ", ".join(sorted(LOSSES))
        raise UserError(f"unknown loss_type {name!r}; known: {known}") from None


# -- KL to the reference, and the wrapper the trainer calls ---------------------------------------


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:  # (B, T)
    """Schulman's k3 estimator of KL(πθ ‖ π_ref) per token, ≥ 0 and unbiased under πθ samples:
    ``exp(ref − logp) − (ref − logp) − 1``. Gradient flows through ``logprobs``.

    Computed as ``expm1(δ) − δ``: in float32 ``exp(δ) − δ − 1`` rounds to a small negative
    number for |δ| ~ 1e-6 (found by the property test: −6e-8 at δ = 1e-6); the clamp keeps the
    last ulp of rounding from making it negative."""
    delta = ref_logprobs - logprobs  # (B, T)
    return (torch.expm1(delta) - delta).clamp_min(0.0)


def policy_loss(
    name: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    aggregation: Aggregation = "token_mean",
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
    **loss_kwargs: object,
) -> tuple[Tensor, Metrics]:
    """``LOSSES[name](…) + β·aggregate(kl_k3(logprobs, ref_logprobs))``, same aggregation and
    normaliser for both terms. ``loss_kwargs`` (behaviour_logprobs, ε's, caps) go to the loss.
    ``metrics["kl"]`` is the masked mean k3 when ``ref_logprobs`` is given; β > 0 requires it."""
    fn = get_loss_fn(name)
    loss, metrics = fn(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        aggregation=aggregation,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        **loss_kwargs,  # type: ignore[arg-type]
    )
    if ref_logprobs is not None:
        kl = kl_k3(logprobs, ref_logprobs)  # (B, T)
        metrics["kl"] = masked_mean(kl.detach(), mask)
        if beta:
            loss = loss + beta * aggregate(kl, mask, aggregation, num_tokens, num_sequences)
    elif beta:
        raise ValueError("beta > 0 needs ref_logprobs")
    metrics["loss"] = loss.detach()
    return loss, metrics


# -- logits → logprobs / entropy, a chunk of rows at a time --------------------------------------


def selective_log_softmax(logits: Tensor, ids: Tensor, chunk_rows: int = 1024) -> Tensor:
    """``log_softmax(logits)[..., ids]``: (B, T, V), (B, T) → (B, T) float32.

    ``logit[id] − logsumexp(logits)`` over ``chunk_rows`` positions at a time, upcast to float32
    chunk by chunk: the full (B, T, V) log-softmax (or a float32 copy of bf16 logits) is never
    materialised. The caller aligns logits and ids (logits of position t−1 predict id t).
    """
    flat = logits.reshape(-1, logits.shape[-1])  # (B·T, V)
    flat_ids = ids.reshape(-1)  # (B·T,)
    out = []
    for start in range(0, flat.shape[0], chunk_rows):
        chunk = flat[start : start + chunk_rows].float()  # (n, V)
        picked = chunk.gather(-1, flat_ids[start : start + chunk_rows, None]).squeeze(-1)  # (n,)
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    if not out:
        return torch.zeros(ids.shape, dtype=torch.float32, device=logits.device)
    return torch.cat(out).reshape(ids.shape)


def entropy_from_logits(logits: Tensor, chunk_rows: int = 1024) -> Tensor:
    """Entropy of the softmax at each position: (B, T, V) → (B, T) float32,
    ``H = logsumexp(z) − Σ softmax(z)·z``, ``chunk_rows`` positions at a time (float32 per chunk).

    Memory-light under ``torch.no_grad()`` (the usual case: entropy is a metric); with grad,
    autograd keeps each chunk's intermediates anyway.
    """
    flat = logits.reshape(-1, logits.shape[-1])  # (B·T, V)
    out = []
    for start in range(0, flat.shape[0], chunk_rows):
        z = flat[start : start + chunk_rows].float()  # (n, V)
        out.append(torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1))  # (n,)
    if not out:
        return torch.zeros(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    return torch.cat(out).reshape(logits.shape[:-1])
