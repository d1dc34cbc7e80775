"""A batched sampler over a transformers causal LM, with KV-cache reuse across turns.

Our own decode loop over ``model(...)`` forward calls (not ``model.generate``), because a multi-turn
rollout needs what ``generate`` does not give: per-episode caches that survive between turns, rows
whose prefix lengths all differ, per-row seeds and both logprobs of every sampled token.

**KV reuse.** After a turn each episode keeps the keys/values of its whole history (minus the last
sampled token, which was never fed). Next turn its context is that history + the last sampled token
+ the tool results and glue, so only those ~50–100 ids are prefilled instead of the ~2k-token
context. The stored ids are compared with the new context first; any mismatch (new weights, an
edited history) falls back to a full prefill. ``kv_reuse=False`` always re-prefills (same tokens
under greedy; a test checks it). Memory: ``2 · layers · kv_heads · head_dim · dtype bytes`` per
stored token and episode.

**Shared prompt** (``share_prompt``, on with KV reuse). The ids that begin every context of a call
(the system turn: SOP and tool schemas) are run once and kept as one shared prefix; rows hold only
what follows it, and attention splits into the shared part (one matrix product for all rows) and
the row's own part, merged by their log-sum-exps (``shared_prefix.py``). A new episode prefills
only its own ids, and a decode step reads the prompt's keys/values once instead of once per row.
Same tokens and logprobs as per-row copies (tested, float64, to 1e-9).

Decoders with sliding-window layers and flash-attention kernels are not supported (they need masks
we do not build); Llama/Qwen3-style models with ``sdpa`` or ``eager`` attention are.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from mtrl_local.rollout.decode import DecodeRows
from mtrl_local.rollout.kv import (
    CacheEntry,
    SlotCache,
    cache_kwarg,
    check_supported,
    kv_shape,
    unwrapped,
)
from mtrl_local.rollout.sampler import (
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    row_seed,
)
from mtrl_local.rollout.sampling import sample
from mtrl_local.rollout.shared_prefix import (
    ATTENTION_NAME,
    CACHE_KWARG,
    SharedPrefix,
    common_prefix_len,
)

logger = logging.getLogger(__name__)


class TransformersSampler:
    """:class:`~mtrl_local.rollout.sampler.Sampler` over a transformers causal LM.

    ``prefill_tokens`` bounds rows × query slots of one prefill forward (activation memory).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        device: str | torch.device = "cpu",
        kv_reuse: bool = True,
        max_batch: int = 64,
        prefill_tokens: int = 8192,
        prefill_chunk: int = 1024,
        policy_version: int = 0,
        share_prompt: bool = True,
        min_shared_prefix: int = 16,
    ) -> None:
        config = model.config
        attn = check_supported(config)
        eos = tokenizer.eos_token_id
        if not isinstance(eos, int):
            raise ValueError("tokenizer has no eos token")
        model.to(device)  # type: ignore[arg-type]
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.kv_reuse = kv_reuse
        self.share_prompt = share_prompt and kv_reuse
        self.min_shared_prefix = min_shared_prefix
        self._attn_name = attn
        #: The config whose attention implementation selects the shared-prompt attention.
        self._attn_config: PretrainedConfig = unwrapped(model).config  # type: ignore[assignment]
        self._shared: SharedPrefix | None = None
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.prefill_chunk = prefill_chunk
        self.policy_version = policy_version
        self.eos_token_id: int = eos
        self._cache_kwarg = cache_kwarg(model)
        pad = tokenizer.pad_token_id
        self.pad_token_id: int = pad if isinstance(pad, int) else eos
        self.max_context_len: int | None = getattr(config, "max_position_embeddings", None)
        # Additive float masks for both: eager needs them, and CPU sdpa runs them ~20% faster
        # than boolean ones.
        self._additive_mask = True
        self._n_layers, self._n_kv_heads, self._head_dim = kv_shape(config)
        self._entries: dict[str, CacheEntry] = {}
        #: Counters for benchmarks and tests: tokens prefilled (shared prefixes included, once
        #: each), tokens reused from caches (a row's own cached ids and its shared prefix).
        self.stats = {
            "prefill_tokens": 0,
            "reused_tokens": 0,
            "forward_calls": 0,
            "compactions": 0,
            "shared_prefix_tokens": 0,
        }

    # -- the Sampler protocol ----------------------------------------------------------
    def generate(
        self, requests: Sequence[GenerationRequest], params: SamplingParams
    ) -> list[GenerationResult]:
        """Sample one turn for every request, ``max_batch`` rows at a time."""
        out: list[GenerationResult] = []
        shared = self._shared_for(
            [list(r.context_ids) for r in requests]
        )  # every one starts with it
        for i in range(0, len(requests), self.max_batch):
            out.extend(self._generate_batch(requests[i : i + self.max_batch], params, shared))
        return out

    def release(self, key: str) -> None:
        self._entries.pop(key, None)

    def load_state_dict(self, state: Mapping[str, Any], version: int) -> None:
        """Load new weights; cached keys/values came from the old ones, so they are dropped."""
        self.model.load_state_dict(dict(state))
        self._entries.clear()
        self._shared = None
        self.policy_version = version

    def invalidate(self, version: int) -> None:
        """The model object was updated in place (the trainer shares it): drop stale caches."""
        self._entries.clear()
        self._shared = None
        self.policy_version = version

    @property
    def cached_episodes(self) -> int:
        return len(self._entries)

    # -- one batch -----------------------------------------------------------------------------
    @torch.inference_mode()
    def _generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        shared: SharedPrefix | None = None,
    ) -> list[GenerationResult]:
        if not requests:
            return []
        state, logits = self._open_batch(requests, params, shared)
        banned = self.eos_token_id if params.ignore_eos else None
        while True:
            tokens, raw, picked = sample(
                logits[state.live],
                [state.gens[r] for r in state.live],
                params.temperature,
                params.top_p,
                banned,
            )
            next_ids, still = state.record(
                tokens.tolist(),
                raw.tolist(),
                picked.tolist(),
                self.eos_token_id,
                self.pad_token_id,
            )
            if not still:
                break
            if 2 * len(still) <= state.cache.batch and state.cache.batch > 4:
                next_ids, still = self._compact(state, next_ids, still)
            logits = self._feed(state, next_ids, still)
        for r, i in enumerate(state.rows):
            self._store(state.cache, r, requests[i], state.contexts[i], state.sampled[i])
        return state.results()

    def _open_batch(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        shared: SharedPrefix | None,
    ) -> tuple[DecodeRows, torch.Tensor]:
        """Lay the batch out in a slot cache (reused keys/values, then each row's new ids,
        right-aligned) and prefill it; the decode state and each row's last logits (B, V)."""
        B = len(requests)
        contexts = [list(r.context_ids) for r in requests]
        P = 0 if shared is None else len(shared)
        entries = [
            self._reusable(r.key, ctx, shared) for r, ctx in zip(requests, contexts, strict=True)
        ]
        cached = [len(e.ids) if e else P for e in entries]  # ids whose keys/values exist
        suffix = [ctx[c:] for ctx, c in zip(contexts, cached, strict=True)]
        budgets = [min(params.max_tokens, r.max_tokens or params.max_tokens) for r in requests]
        if min(budgets) < 1:
            raise ValueError("a request has no token budget left")
        # Slots hold only what follows the shared prefix.
        C, N, M = max(c - P for c in cached), max(len(s) for s in suffix), max(budgets)
        # Rows sorted by suffix length (longest first) so that prefill groups are row ranges.
        order = sorted(range(B), key=lambda i: -len(suffix[i]))
        cache = self._slot_cache(B, C + N + M - 1)
        cache.shared = shared
        ids = torch.full((B, N), self.pad_token_id, dtype=torch.long)  # (B, N): slots C..C+N
        for row, i in enumerate(order):
            cache.put(row, entries[i], C)
            n = len(suffix[i])
            ids[row, N - n :] = torch.tensor(suffix[i], dtype=torch.long)
            cache.valid[row, C + N - n : C + N] = True
            cache.positions[row, C + N - n : C + N] = torch.arange(cached[i], cached[i] + n)
        self.stats["reused_tokens"] += sum(cached)
        self.stats["prefill_tokens"] += sum(len(s) for s in suffix)
        logits = self._prefill(cache, ids.to(self.device), C, [len(suffix[i]) for i in order])
        gens = [
            torch.Generator(device=self.device).manual_seed(
                row_seed(params.seed or 0, requests[i].key, len(contexts[i]))
            )
            for i in order
        ]
        state = DecodeRows(cache, contexts, budgets, list(order), gens, C + N, requests)
        state.live = list(range(B))
        return state, logits

    def _slot_cache(self, batch: int, slots: int) -> SlotCache:
        return SlotCache(
            self._n_layers,
            batch,
            self._n_kv_heads,
            slots,
            self._head_dim,
            dtype=self.model.dtype,
            device=self.device,
        )

    def _compact(
        self, state: DecodeRows, next_ids: torch.Tensor, still: list[int]
    ) -> tuple[torch.Tensor, list[int]]:
        """Half the rows are done: store them and stop paying for them."""
        keep_set = set(still)
        for r in range(state.cache.batch):
            if r not in keep_set:
                i = state.rows[r]
                self._store(state.cache, r, state.requests[i], state.contexts[i], state.sampled[i])
        self.stats["compactions"] += 1
        state.cache.keep_rows(torch.tensor(still, device=self.device))
        state.rows = [state.rows[r] for r in still]
        state.gens = [state.gens[r] for r in still]
        return next_ids[still], list(range(len(still)))

    def _feed(self, state: DecodeRows, next_ids: torch.Tensor, still: list[int]) -> torch.Tensor:
        """Feed the new tokens at one shared slot (finished rows get a masked pad)."""
        cache, slot = state.cache, state.slot
        live_mask = torch.zeros(cache.batch, dtype=torch.bool)
        live_mask[still] = True
        live_mask = live_mask.to(self.device)
        cache.valid[:, slot] = live_mask
        prev = cache.positions[:, slot - 1] if slot > 0 else torch.zeros_like(live_mask).long()
        cache.positions[:, slot] = prev + 1
        logits = self._forward(cache, next_ids.to(self.device)[:, None], slice(None), slot)
        state.live = still
        state.slot += 1
        return logits

    def _shared_for(self, contexts: list[list[int]]) -> SharedPrefix | None:
        """The shared prefix for a call over ``contexts``: the stored one if every context starts
        with it, else a new one built from their common prefix (two contexts or more, at least
        ``min_shared_prefix`` ids), else none."""
        if not self.share_prompt or not contexts:
            return None
        current = self._shared
        if current is not None and all(current.starts(c) for c in contexts):
            return current
        if len(contexts) < 2:
            return None
        n = common_prefix_len(contexts)
        if n < self.min_shared_prefix:
            return None
        self._shared = self._build_shared(contexts[0][:n])
        return self._shared

    @torch.inference_mode()
    def _build_shared(self, ids: list[int]) -> SharedPrefix:
        """Run ``ids`` once (batch 1, positions from 0) and keep their keys/values."""
        n = len(ids)
        cache = self._slot_cache(1, n)
        cache.valid[0] = True
        cache.positions[0] = torch.arange(n)
        tensor = torch.tensor([ids], dtype=torch.long, device=self.device)
        for a in range(0, n, self.prefill_chunk):
            self._forward(cache, tensor[:, a : a + self.prefill_chunk], slice(None), a)
        self.stats["prefill_tokens"] += n
        self.stats["shared_prefix_tokens"] += n
        return SharedPrefix(list(ids), cache.kv[:, :, 0].clone())

    def _reusable(
        self, key: str, context: list[int], shared: SharedPrefix | None = None
    ) -> CacheEntry | None:
        """The stored entry of ``key`` if it is a strict prefix of ``context`` taken under the
        same shared prefix."""
        if not self.kv_reuse:
            return None
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        if entry.shared is not shared:
            return None
        n = len(entry.ids)
        if n < len(context) and context[:n] == entry.ids:
            return entry
        logger.debug("episode %s: cached ids are not a prefix of the context; re-prefilling", key)
        return None

    def _store(
        self,
        cache: SlotCache,
        row: int,
        request: GenerationRequest,
        context: list[int],
        sampled: list[int],
    ) -> None:
        # The last sampled token was never fed, so the row holds context + sampled[:-1].
        if self.kv_reuse:
            self._entries[request.key] = cache.take(row, context + sampled[:-1])

    def _prefill(
        self, cache: SlotCache, ids: torch.Tensor, start: int, lengths: list[int]
    ) -> torch.Tensor:
        """Run the suffix slots of every row; return each row's last-slot logits.  # (B, V)

        Rows (sorted by suffix length, longest first) are grouped so that a group's rows ×
        query slots stay near ``prefill_tokens`` and its shortest suffix is at least half its
        longest; each group runs only its own right-aligned slots, in chunks of ``prefill_chunk``.
        """
        B, N = ids.shape
        out: list[torch.Tensor] = []
        r0 = 0
        while r0 < B:
            longest = lengths[r0]
            r1 = r0 + 1
            while (
                r1 < B
                and (r1 - r0 + 1) * longest <= self.prefill_tokens
                and 2 * lengths[r1] >= longest
            ):
                r1 += 1
            rows = slice(r0, r1)
            cache.zero_slots(rows, start, start + N - longest)  # this group's unwritten gap
            per_chunk = max(1, min(self.prefill_chunk, self.prefill_tokens // (r1 - r0)))
            logits = None
            for a in range(N - longest, N, per_chunk):
                b = min(a + per_chunk, N)
                logits = self._forward(cache, ids[rows, a:b], rows, start + a)
            assert logits is not None
            out.append(logits)
            r0 = r1
        return torch.cat(out)

    def _forward(
        self, cache: SlotCache, ids: torch.Tensor, rows: slice, start: int
    ) -> torch.Tensor:
        """One forward over slots ``start:start+q`` of ``rows``; last-slot logits.  # (b, V)"""
        q = ids.shape[1]
        cache.rows, cache.start = rows, start
        mask = cache.mask(rows, start, q, self._additive_mask)
        extra: dict[str, Any] = {self._cache_kwarg: cache}
        config = self._attn_config
        if cache.shared is not None:
            extra[CACHE_KWARG] = cache
            config._attn_implementation = ATTENTION_NAME
            cache.shared_reads = 0
        try:
            out = self.model(
                input_ids=ids,
                # A 4-D mask is used as given by every decoder's mask builder (a per-layer-type
                # dict is understood by Qwen3-style models only, not by Llama).
                attention_mask=mask,
                position_ids=cache.positions[rows, start : start + q],
                use_cache=True,
                logits_to_keep=1,
                **extra,
            )
        finally:
            if cache.shared is not None:
                config._attn_implementation = self._attn_name
        if cache.shared is not None and cache.shared_reads != self._n_layers:
            # A model that does not route attention through the configured implementation
            # would silently ignore the prompt: refuse rather than sample from a wrong context.
            raise RuntimeError(
                f"{type(self.model).__name__} did not use the shared-prompt attention in "
                f"{self._n_layers - cache.shared_reads} layers; use share_prompt=False"
            )
        self.stats["forward_calls"] += 1
        return out.logits[:, -1, :]


__all__ = ["TransformersSampler"]
