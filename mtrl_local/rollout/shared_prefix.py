"""Shared-prompt attention for the transformers rollout sampler (``transformers_sampler.py``).

Every episode of a rollout starts with the same ids: the system turn with the SOP and the tool
schemas (~1.6k of the ~2–3k tokens of an aircraft_inspection context). Without sharing, each row
of a ``generate`` call prefills that prompt on its first turn and then, at every decode step,
reads its own copy of the prompt's keys/values — a memory-bound read that dominated the rollout on
CPU (``scaled_dot_product_attention`` was ~half of a profiled rollout).

Here the common prefix is run **once** (batch 1, positions ``0..P-1``) and kept as one
:class:`SharedPrefix`; the rows' slot buffers hold only what follows it (positions from ``P``).
Attention of a decode step is split in two and merged exactly (the "cascade" form):

    o = (e^{l₁}·o₁ + e^{l₂}·o₂) / (e^{l₁} + e^{l₂})

where ``o₁, l₁`` are the output and log-sum-exp over the shared keys — one matrix product for all
rows at once, so the prompt's keys are read once per step instead of once per row — and
``o₂, l₂`` those over the row's own keys under its mask. A prefill call (several query slots)
concatenates the shared keys in front of the row's own instead (prefill is rare; exactness over
memory there).

The attention function is registered with transformers under :data:`ATTENTION_NAME` and selected
only for the sampler's own forward calls (the model's configured implementation is restored after
each call); without the sampler's cache it defers to plain SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

ATTENTION_NAME = "mtrl_shared_prefix"
"""The name the cascade attention is registered under (``config._attn_implementation``)."""

CACHE_KWARG = "mtrl_slot_cache"
"""The keyword the sampler passes its slot cache under; it reaches the attention function."""


@dataclass(eq=False)
class SharedPrefix:
    """Keys/values of ids that begin every context of a ``generate`` call, computed once."""

    ids: list[int]
    kv: torch.Tensor  # (L, 2, H_kv, P, D)

    def __len__(self) -> int:
        return len(self.ids)

    def starts(self, context: list[int]) -> bool:
        """Whether ``context`` begins with these ids and has at least one id after them."""
        n = len(self.ids)
        return len(context) > n and context[:n] == self.ids


def common_prefix_len(contexts: list[list[int]]) -> int:
    """Length of the longest prefix shared by every context, leaving each at least one id."""
    if not contexts:
        return 0
    lo, hi = min(contexts), max(contexts)  # lexicographic: every other context lies between
    pairs = enumerate(zip(lo, hi, strict=False))
    n = next((i for i, (a, b) in pairs if a != b), min(len(lo), len(hi)))
    return max(0, min(n, min(len(c) for c in contexts) - 1))


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (b, H, q, D)
    key: torch.Tensor,  # (b, H_kv, S, D): the rows' own slots
    value: torch.Tensor,  # (b, H_kv, S, D)
    attention_mask: torch.Tensor | None,  # (b, 1, q, S) additive
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over ``shared prefix + own slots``; see the module docstring.  # (b, q, H, D)"""
    cache = kwargs.pop(CACHE_KWARG, None)
    shared = getattr(cache, "shared_kv", None)
    if shared is None or attention_mask is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    layer: int = getattr(module, "layer_idx")  # noqa: B009 (untyped on nn.Module)
    cache.shared_reads += 1
    ks, vs = shared[layer, 0], shared[layer, 1]  # (H_kv, P, D)
    b, H, q, D = query.shape
    h_kv = ks.shape[0]
    if q > 1:  # prefill: the shared keys in front of each row's own
        P = ks.shape[1]
        key = torch.cat([ks.unsqueeze(0).expand(b, -1, -1, -1), key], dim=2)
        value = torch.cat([vs.unsqueeze(0).expand(b, -1, -1, -1), value], dim=2)
        pad = attention_mask.new_zeros(b, 1, q, P)
        mask = torch.cat([pad, attention_mask], dim=-1)
        return sdpa_attention_forward(
            module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling if scaling is not None else D**-0.5
    rep = H // h_kv
    dtype = query.dtype
    work = torch.promote_types(dtype, torch.float32)  # bf16 → fp32; fp64 stays
    qf = query.to(work)
    # Shared part: every row's query against one copy of the prefix keys.
    qs = qf.reshape(b, h_kv, rep, D).transpose(0, 1).reshape(h_kv, b * rep, D)
    s1 = torch.matmul(qs, ks.to(work).transpose(1, 2)) * scale  # (H_kv, b·rep, P)
    l1 = torch.logsumexp(s1, dim=-1, keepdim=True)  # (H_kv, b·rep, 1)
    o1 = torch.matmul(torch.exp(s1 - l1), vs.to(work))  # (H_kv, b·rep, D)
    o1 = o1.reshape(h_kv, b, rep, D).transpose(0, 1).reshape(b, H, 1, D)
    l1 = l1.reshape(h_kv, b, rep, 1).transpose(0, 1).reshape(b, H, 1, 1)
    # Own part: the row's slots under its mask (its own slot is always visible).
    k2 = repeat_kv(key, rep).to(work)  # (b, H, S, D)
    v2 = repeat_kv(value, rep).to(work)
    s2 = torch.matmul(qf, k2.transpose(2, 3)) * scale + attention_mask.to(work)  # (b, H, 1, S)
    l2 = torch.logsumexp(s2, dim=-1, keepdim=True)  # (b, H, 1, 1)
    o2 = torch.matmul(torch.exp(s2 - l2), v2)  # (b, H, 1, D)
    top = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - top), torch.exp(l2 - top)
    out = (w1 * o1 + w2 * o2) / (w1 + w2)  # (b, H, 1, D)
    return out.to(dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)

__all__ = [
    "ATTENTION_NAME",
    "CACHE_KWARG",
    "SharedPrefix",
    "common_prefix_len",
    "shared_prefix_attention",
]
