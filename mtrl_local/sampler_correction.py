"""The sampler/trainer correction: importance weights for the gap between μ and π_old.

The sampler's probabilities μ (``behaviour_logprobs``) differ from the trainer's π_old even
on-policy: other kernels (vLLM), bf16, a stale policy version under async rollouts. Each token's
loss term is multiplied by a detached weight built from ``ρ_t = π_old/μ``; ``mode``
(``is_correction`` in the config) picks how, C is ``tis_cap``:

* ``token_truncate`` (default): ``w_t = min(ρ_t, C)`` — truncated IS (TIS: Yao et al. 2025,
  "Your efficient RL framework secretly brings you off-policy RL training");
* ``token_mask``: ``w_t = ρ_t`` if ``1/C ≤ ρ_t ≤ C``, else 0 (the token is rejected);
* ``sequence_truncate``: the sequence ratio ``ρ_i = exp(mean_t log ρ_t)`` (geometric mean over
  the sequence's loss tokens), ``w_t = min(ρ_i, C)`` on every token of sequence i;
* ``sequence_mask``: ``w_t = ρ_i`` if ``1/C ≤ ρ_i ≤ C``, else 0 for the whole sequence.

Masking (Liu et al. 2025, "When speed kills stability"; TRL's ``vllm_importance_sampling_mode``,
verl's ``rollout_correction``) drops tokens the sampler and trainer disagree on instead of keeping
them at a capped weight. TRL's sequence modes multiply the token ratios (``exp Σ_t log ρ_t``);
here the geometric mean keeps C meaningful whatever the sequence length (a 2,000-token
trajectory with ρ_t = 1.001 everywhere has a product of 7.4 but a geometric mean of 1.001).

No μ or C = ``None``: every weight is 1. All tensors are (B, T); a row is one whole trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IS_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
"""The ``is_correction`` modes."""


@dataclass
class Correction:
    """The weights and what they did, per token (all detached)."""

    weight: Tensor  # (B, T)
    truncated: Tensor  # (B, T) bool: the weight was capped at C
    rejected: Tensor  # (B, T) bool: the weight was set to 0 (mask modes)


def sampler_ratio(old_logprobs: Tensor, behaviour_logprobs: Tensor | None) -> Tensor:  # (B, T)
    """``ρ_t = π_old/μ`` per token, detached; ones when there is no μ."""
    if behaviour_logprobs is None:
        return torch.ones_like(old_logprobs)
    return torch.exp(old_logprobs - behaviour_logprobs).detach()


def sequence_mean(x: Tensor, mask: Tensor) -> Tensor:  # (B, 1)
    """Mean of ``x`` over each row's ``mask`` tokens; 0 for a row without any."""
    keep = mask.bool()  # (B, T)
    return torch.where(keep, x, 0).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp(min=1)


def sampler_correction(
    old_logprobs: Tensor,
    behaviour_logprobs: Tensor | None,
    mask: Tensor,
    *,
    mode: str = "token_truncate",
    cap: float | None = 2.0,
) -> Correction:
    """The weights of ``mode`` (module docstring) with cap C = ``cap``."""
    if mode not in IS_CORRECTIONS:
        raise ValueError(f"is_correction must be one of {', '.join(IS_CORRECTIONS)}, got {mode!r}")
    none = torch.zeros_like(old_logprobs, dtype=torch.bool)  # (B, T)
    if behaviour_logprobs is None or cap is None:
        return Correction(torch.ones_like(old_logprobs), none, none)
    if mode == "token_truncate":  # the arithmetic of the TIS weight before the modes, bit for bit
        ratio = sampler_ratio(old_logprobs, behaviour_logprobs)  # (B, T)
        return Correction(ratio.clamp(max=cap), ratio > cap, none)
    log_ratio = (old_logprobs - behaviour_logprobs).detach()  # (B, T)
    if mode.startswith("sequence"):
        log_ratio = sequence_mean(log_ratio, mask).expand_as(old_logprobs)  # (B, T) ρ_i per row
    ratio = torch.exp(log_ratio)  # (B, T)
    if mode.endswith("truncate"):
        return Correction(ratio.clamp(max=cap), ratio > cap, none)
    inside = (ratio >= 1.0 / cap) & (ratio <= cap)  # (B, T)
    return Correction(torch.where(inside, ratio, 0.0), none, ~inside)
