"""Shared-prefix training: a group's common prompt goes through the model once per update.

The ``num_generations`` trajectories of one case start with the same prompt (system turn with the
tool schemas, then the user turn): token for token the same ids, since the sampler's ids are kept
as they were. On aircraft_inspection that prompt is ~1.6k of a ~2.1k-token trajectory, so running
every trajectory whole through forward and backward spends most of the update on G copies of the
same prefix.

Here the prefix runs once: its keys and values are recorded per layer and handed to every suffix
forward as the cache, as *leaf* tensors that collect the suffixes' gradients. After the last
suffix of the group, one backward through the prefix turns those accumulated key/value gradients
into parameter gradients. The result is the gradient of the whole-sequence computation (the
attention of a suffix token over the cached prefix is the same sum as over the whole sequence; a
test compares the updates), at the cost of one prefix instead of G.

The prefix ends one token before the first trained token (whose logprob needs the hidden state of
the token before it), so no loss position lies in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mtrl_local.rollout.kv import cache_kwarg


class _Recorder:
    """A cache for a forward without a past: keeps what each layer computed."""

    def __init__(self) -> None:
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *_, **__) -> tuple[Tensor, Tensor]:
        self.keys.append(key)  # (1, H_kv, P, D)
        self.values.append(value)
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, q_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return q_length, 0


class _PrefixCache:
    """A cache whose past is the prefix: each layer returns prefix ⊕ this call's keys/values."""

    def __init__(self, prefix: PrefixKV, rows: int) -> None:
        self.prefix = prefix
        self.rows = rows

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *_, **__) -> tuple[Tensor, Tensor]:
        k = self.prefix.keys[layer_idx].expand(self.rows, -1, -1, -1)
        v = self.prefix.values[layer_idx].expand(self.rows, -1, -1, -1)
        return torch.cat([k, key], dim=2), torch.cat([v, value], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prefix.length

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.prefix.length

    def get_mask_sizes(self, q_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.prefix.length + q_length, 0


@dataclass
class PrefixKV:
    """One prefix's keys/values per layer; with ``grad``, leaves that gather the suffixes'
    gradients until :meth:`backward`."""

    length: int
    keys: list[Tensor]
    values: list[Tensor]
    #: The graph-connected tensors the leaves were detached from (empty without grad).
    _sources: list[Tensor] = field(default_factory=list)

    def forward_kwargs(self, model: torch.nn.Module, rows: int, width: int) -> dict[str, object]:
        """Extra arguments of a forward over ``rows`` suffixes of ``width`` tokens."""
        device = self.keys[0].device
        positions = torch.arange(self.length, self.length + width, device=device)
        return {
            cache_kwarg(model): _PrefixCache(self, rows),
            "position_ids": positions.unsqueeze(0).expand(rows, -1),
            "use_cache": True,
        }

    def backward(self) -> None:
        """Carry the gradients the suffixes left on the keys/values into the parameters."""
        pairs = [
            (src, leaf.grad)
            for src, leaf in zip(self._sources, [*self.keys, *self.values], strict=True)
            if leaf.grad is not None
        ]
        if pairs:
            torch.autograd.backward([s for s, _ in pairs], [g for _, g in pairs])
        self._sources = []


def run_prefix(model: torch.nn.Module, ids: Tensor, grad: bool = True) -> PrefixKV:
    """Run ``ids`` (1, P) through ``model`` once; its keys/values for the suffixes."""
    recorder = _Recorder()
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): recorder})
    length = ids.shape[1]
    if not (grad and torch.is_grad_enabled()):
        return PrefixKV(length, recorder.keys, recorder.values)
    sources = [*recorder.keys, *recorder.values]
    leaves = [t.detach().requires_grad_() for t in sources]
    n = len(recorder.keys)
    return PrefixKV(length, leaves[:n], leaves[n:], sources)


def prefix_groups(
    input_ids: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[int]], min_length: int = 32
) -> list[tuple[int, list[int]]]:
    """Examples that share a prompt: ``(prefix length, indices)`` per group, in first-seen order.

    An example's prefix is everything before the token that predicts its first trained token.
    A group of one, or a prefix shorter than ``min_length``, gets length 0 (run whole).
    """
    buckets: dict[tuple[int, ...], list[int]] = {}
    for i, (ids, mask) in enumerate(zip(input_ids, loss_masks, strict=True)):
        first = next((t for t, m in enumerate(mask) if m), len(ids))
        buckets.setdefault(tuple(ids[: max(first - 1, 0)]), []).append(i)
    groups = []
    for key, members in buckets.items():
        shared = len(key) >= min_length and len(members) > 1
        groups.append((len(key) if shared else 0, members))
    return groups


__all__ = ["PrefixKV", "prefix_groups", "run_prefix"]
