"""Token sampling from next-token logits: temperature, top-p, greedy, seeded per row.

Pure tensor functions. Each row draws its noise from its own ``torch.Generator`` seeded by
:func:`~mtrl_local.rollout.sampler.row_seed`, so a row's sample depends on its seed and its logits,
not on which other rows share the batch (the same episode samples the same tokens at max_batch 1
and 64, up to floating-point differences in the logits).
"""

from __future__ import annotations

import torch


def processed_logprobs(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    banned: int | None = None,
) -> torch.Tensor:
    """Log-probabilities of the distribution that is sampled from.  # (B, V) -> (B, V)

    ``logits / temperature``, then tokens outside the top-p nucleus (and ``banned``) at -inf,
    renormalised. Not for ``temperature == 0`` (greedy has no distribution).
    """
    scores = logits.float() / temperature
    if banned is not None:
        scores[:, banned] = float("-inf")
    logp = torch.log_softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        probs = sorted_logp.exp()
        mass_before = probs.cumsum(dim=-1) - probs  # (B, V): mass of the tokens ranked above
        drop_sorted = mass_before >= top_p  # the first token always stays (mass_before = 0)
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


def sample(
    logits: torch.Tensor,
    generators: list[torch.Generator],
    temperature: float,
    top_p: float,
    banned: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row.  # logits (B, V) -> tokens (B,), raw (B,), sampled (B,)

    Returns the tokens, their log-softmax under the raw logits (the unmodified policy, what the
    trainer's importance ratio needs) and under the distribution actually sampled from (0 for
    greedy). Sampling uses the exponential race: ``argmax(logp - log E)``, ``E ~ Exp(1)`` per token,
    which draws exactly from ``softmax(logp)``.
    """
    raw = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    if temperature == 0:
        scores = raw if banned is None else raw.clone()
        if banned is not None:
            scores[:, banned] = float("-inf")
        tokens = scores.argmax(dim=-1)
        picked = torch.zeros(tokens.shape, dtype=raw.dtype, device=raw.device)
    else:
        logp = processed_logprobs(logits, temperature, top_p, banned)
        noise = torch.stack(
            [
                torch.empty(logp.shape[1], device=logp.device).exponential_(generator=g)
                for g in generators
            ]
        )  # (B, V)
        tokens = (logp - noise.log()).argmax(dim=-1)
        picked = logp.gather(1, tokens[:, None]).squeeze(1)
    return tokens, raw.gather(1, tokens[:, None]).squeeze(1), picked


__all__ = ["processed_logprobs", "sample"]
