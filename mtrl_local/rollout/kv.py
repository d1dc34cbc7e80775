"""The batch KV buffer behind :class:`~mtrl_local.rollout.transformers_sampler.TransformersSampler`.

One preallocated tensor holds the keys and values of every row of a ``generate`` call, slot by slot.
Slot ``j`` of every row is written in the same forward call, so the write position is one shared
integer, while each row carries its own ``valid`` mask and ``positions`` (rotary position ids):

    slot:   0 ........ C-1 | C ........ C+N-1 | C+N ... (decode)
    row a:  pad  cached_a  | pad     suffix_a | sampled_a ...
    row b:  cached_b       | pad  suffix_b    | sampled_b ...

``cached`` is what an episode kept from its previous turn (left-padded to the longest, C),
``suffix`` the ids appended since (tool results and glue, right-aligned to the longest, N), so every
row's last prefill slot is a real token and its logits are the next-token logits. Pads have mask 0
and attend only to themselves (a query that sees no key would give NaN, and NaN values in a pad slot
would leak through a 0 attention weight). Writing into a preallocated buffer costs one copy per
token instead of the concatenation per decode step of ``DynamicCache``.

The model is called with this object as ``past_key_values`` and a ready 4D mask per layer type, so
transformers builds no mask of its own: Llama/Qwen3-style decoders only call :meth:`update`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from mtrl_local.rollout.shared_prefix import SharedPrefix


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (``model`` itself when there is none)."""
    unwrap = getattr(model, "get_base_model", None)
    base: torch.nn.Module = unwrap() if callable(unwrap) else model
    return base


def forward_parameters(model: torch.nn.Module) -> frozenset[str]:
    """The keyword parameters of the model's own forward (under a peft wrapper: the wrapped
    model's), read once per model class."""
    cls = type(unwrapped(model))
    if cls not in _FORWARD_PARAMETERS:
        _FORWARD_PARAMETERS[cls] = frozenset(inspect.signature(cls.forward).parameters)
    return _FORWARD_PARAMETERS[cls]


_FORWARD_PARAMETERS: dict[type, frozenset[str]] = {}


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name the model's forward takes its KV cache under (transformers 5.24 renamed
    ``past_key_values`` to ``cache``; the old name still works, with a warning per call)."""
    return "cache" if "cache" in forward_parameters(model) else "past_key_values"


@dataclass
class CacheEntry:
    """What an episode keeps between turns: its ids and where their keys/values lie.

    Not a copy: a reference to the row of the batch buffer that produced them and the slot ranges
    that hold real tokens. The next turn copies those ranges straight into its own buffer (one copy
    per turn instead of two). The price: a buffer stays alive until every episode that left it has
    moved on or been released (peak memory about twice the live caches).
    """

    #: The token ids whose keys/values are stored (context + sampled ids except the last one).
    ids: list[int]
    #: The source batch buffer.  # (L, 2, B, H_kv, S, D)
    kv: torch.Tensor
    row: int
    #: Slot ranges ``[start, end)`` of ``row`` holding ``ids``, in order (after ``shared``).
    ranges: list[tuple[int, int]]
    #: The shared prefix whose keys/values stand for the first ids (not stored in the row).
    shared: SharedPrefix | None = None

    @property
    def own(self) -> int:
        """How many of ``ids`` the row itself holds."""
        return len(self.ids) - (len(self.shared) if self.shared is not None else 0)


class SlotCache:
    """A ``past_key_values`` object over a preallocated buffer. See the module docstring."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        capacity: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        # Not zero-filled (a large buffer): every slot that is read is either written by a forward
        # call or zeroed by put()/zero_slots(), so no garbage (NaN) can reach a 0 attention weight.
        self.kv = torch.empty(
            n_layers, 2, batch, n_kv_heads, capacity, head_dim, dtype=dtype, device=device
        )  # (L, 2, B, H, S, D)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)  # (B, S)
        self.positions = torch.zeros(batch, capacity, dtype=torch.long, device=device)  # (B, S)
        #: Where the current forward call writes: rows ``rows`` and slots ``start:start+q``.
        self.rows = slice(None)
        self.start = 0
        #: Keys/values every row attends to before its own slots (shared_prefix.py).
        self.shared: SharedPrefix | None = None
        #: Layers of the current forward call that attended to ``shared`` (a safety check).
        self.shared_reads = 0

    @property
    def shared_kv(self) -> torch.Tensor | None:  # (L, 2, H_kv, P, D)
        return None if self.shared is None else self.shared.kv

    @property
    def offset(self) -> int:
        """Position of the first own slot token: the shared prefix's length."""
        return 0 if self.shared is None else len(self.shared)

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    @property
    def batch(self) -> int:
        return self.kv.shape[2]

    # -- the part of the transformers Cache interface the decoders use ------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_, **__
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's keys/values; return all keys/values up to its last slot."""
        q = key_states.shape[2]  # key_states: (b, H, q, D)
        end = self.start + q
        self.kv[layer_idx, 0, self.rows, :, self.start : end] = key_states
        self.kv[layer_idx, 1, self.rows, :, self.start : end] = value_states
        return (
            self.kv[layer_idx, 0, self.rows, :, :end],
            self.kv[layer_idx, 1, self.rows, :, :end],
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start

    # -- layout ------------------------------------------------------------------------------------
    def zero_slots(self, rows: slice | int, start: int, end: int) -> None:
        """Zero slots ``start:end`` of ``rows`` (pads that no forward call writes)."""
        if end > start:
            self.kv[:, :, rows, :, start:end] = 0

    def put(self, row: int, entry: CacheEntry | None, end: int) -> None:
        """Place a stored entry in ``row`` so that it ends just before slot ``end``.

        The slots before it (left padding) are zeroed. The entry must have been taken under the
        same shared prefix as this cache.
        """
        n = 0 if entry is None else entry.own
        self.zero_slots(row, 0, end - n)
        if entry is None or n == 0:
            return
        at = end - n
        for a, b in entry.ranges:
            self.kv[:, :, row, :, at : at + b - a] = entry.kv[:, :, entry.row, :, a:b]
            at += b - a
        self.valid[row, end - n : end] = True
        p = self.offset
        self.positions[row, end - n : end] = torch.arange(p, p + n, device=self.positions.device)

    def take(self, row: int, ids: list[int]) -> CacheEntry:
        """The valid slots of ``row`` as an entry for ``ids`` (no copy, see :class:`CacheEntry`)."""
        idx = self.valid[row].nonzero().squeeze(1)
        if idx.numel() != len(ids) - self.offset:
            expected = len(ids) - self.offset
            raise RuntimeError(f"cache row holds {idx.numel()} tokens, expected {expected}")
        ranges: list[tuple[int, int]] = []
        if idx.numel():
            breaks = ((idx[1:] - idx[:-1]) != 1).nonzero().squeeze(1).tolist()
            starts = [0, *(i + 1 for i in breaks)]
            ends = [*(i + 1 for i in breaks), idx.numel()]
            slots = idx.tolist()
            ranges = [(slots[a], slots[b - 1] + 1) for a, b in zip(starts, ends, strict=True)]
        return CacheEntry(ids, self.kv, row, ranges, self.shared)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop every row not in ``rows`` (a copy of the kept rows; used when half are done)."""
        self.kv = self.kv.index_select(2, rows)
        self.valid = self.valid.index_select(0, rows)
        self.positions = self.positions.index_select(0, rows)

    def mask(self, rows: slice, start: int, q: int, additive: bool) -> torch.Tensor:
        """The attention mask of queries at slots ``start:start+q`` of ``rows``.  # (b, 1, q, kv)

        Query slot i sees key slot j iff j is valid and j <= i (slot order is position order
        within a row), and always sees itself.
        """
        end = start + q
        valid = self.valid[rows, :end]  # (b, kv)
        device = valid.device
        qslots = torch.arange(start, end, device=device)
        kslots = torch.arange(end, device=device)
        causal = kslots[None, :] <= qslots[:, None]  # (q, kv)
        own = kslots[None, :] == qslots[:, None]
        allowed = (valid[:, None, :] & causal[None]) | own[None]  # (b, q, kv)
        allowed = allowed[:, None]
        if not additive:
            return allowed
        dtype = self.kv.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(
            ~allowed, torch.finfo(dtype).min
        )


def check_supported(config: PretrainedConfig) -> str:
    """The model's attention implementation, if this sampler supports the model."""
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise NotImplementedError(f"only full-attention decoders are supported: {layer_types}")
    attn = getattr(config, "_attn_implementation", "sdpa") or "sdpa"
    if attn not in ("sdpa", "eager"):
        raise NotImplementedError(f"attention implementation {attn!r} is not supported")
    return str(attn)


def kv_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """``(layers, kv heads, head dim)`` of the keys/values a cache holds."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


__all__ = ["CacheEntry", "SlotCache", "check_supported", "kv_shape"]
