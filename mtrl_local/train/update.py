"""One optimizer step over a batch of trajectories, on one process or several.

Sequence extension: each trajectory is one sequence; micro-batches are packed by a token budget
and their gradients accumulate. The loss of a micro-batch is normalised by the *global* number
of loss tokens (or sequences), so the accumulated gradient is exactly the full-batch gradient.

The micro-batches are grouped into **segments**: the trajectories of a group share their prompt,
which runs once per segment (:mod:`mtrl_local.train.prefix`); the suffixes run as chunks over
its keys and values. A step is then: for each iteration, for each segment, for each chunk, the
loss and its backward; then one gradient step.

Several processes (``accelerate launch``, data parallelism over gloo or NCCL): each process holds
a shard of the batch; the normaliser is summed over processes first, and after the backward
passes the gradients are summed with one all-reduce per parameter, so a step on N processes is
the one-process step on the whole batch (a test checks it). With ``fsdp`` the model is sharded:
its backward reduce-scatters (sums) the gradients itself, and since every forward is a
collective, :func:`pad_for_fsdp` turns the segments into one segment in which every process runs
as many chunks as the busiest one (weightless stand-ins fill the gap).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from mtrl_local import metrics as M
from mtrl_local.config import MultiTurnRLConfig
from mtrl_local.losses import policy_loss
from mtrl_local.train.batching import (
    TrainExample,
    build_examples,
    collate,
    cut_by_token_budget,
    micro_batches,
    token_logprobs,
)
from mtrl_local.train.distributed import is_sharded
from mtrl_local.train.policy import Reference
from mtrl_local.train.prefix import PrefixKV, prefix_groups, run_prefix
from mtrl_local.trajectory import Trajectory

logger = logging.getLogger(__name__)

Chunk = dict[str, torch.Tensor]


@dataclass
class UpdateContext:
    """What an update needs besides the batch."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[torch.nn.Parameter]
    pad_id: int
    device: torch.device
    reference: Reference | None = None
    bf16: bool = False
    #: The most loss tokens one trajectory can hold (max_turns × sampling_max_tokens): the
    #: constant length of the ``dr_grpo`` aggregation.
    max_completion_tokens: int | None = None


# -- collectives -----------------------------------------------------------------------------------
def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_sum(value: float, device: torch.device) -> float:
    if not distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def _all_max(value: int, device: torch.device) -> int:
    if not distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# -- segments --------------------------------------------------------------------------------------
@dataclass
class Segment:
    """Micro-batches that run after one shared prefix (``None``: whole sequences)."""

    prefix: torch.Tensor | None  # (1, P)
    chunks: list[Chunk]
    #: How many of ``chunks`` are real (the rest: FSDP stand-ins); ``None`` = all.
    n_real: int | None = None

    @property
    def real(self) -> int:
        return len(self.chunks) if self.n_real is None else self.n_real


def _max_rows(cfg: MultiTurnRLConfig, device: torch.device) -> int | None:
    """Rows per micro-batch: ``micro_batch_rows``, or automatic (one sequence at a time on CPU,
    where padding forces the masked attention kernel; no limit on CUDA)."""
    if cfg.micro_batch_rows > 0:
        return cfg.micro_batch_rows
    return 1 if device.type == "cpu" else None


def _chunked(
    items: list[TrainExample], cfg: MultiTurnRLConfig, pad_id: int, device: torch.device
) -> list[Chunk]:
    rows = _max_rows(cfg, device)
    return [
        {k: v.to(device) for k, v in collate([items[i] for i in idx], pad_id).items()}
        for idx in micro_batches(items, cfg.micro_batch_tokens, rows)
    ]


def _suffix(example: TrainExample, length: int) -> TrainExample:
    e = example
    return TrainExample(
        e.index,
        e.input_ids[length:],
        e.loss_mask[length:],
        e.behaviour_logprobs[length:],
        e.advantages[length:],
    )


def build_segments(
    examples: list[TrainExample],
    cfg: MultiTurnRLConfig,
    pad_id: int,
    device: torch.device,
    share: bool,
) -> list[Segment]:
    """The update's micro-batches, collated, grouped behind their shared prompt (``share``)."""
    if not share:
        return [Segment(None, _chunked(examples, cfg, pad_id, device))] if examples else []
    segments: list[Segment] = []
    whole: list[TrainExample] = []
    groups = prefix_groups([e.input_ids for e in examples], [e.loss_mask for e in examples])
    for length, members in groups:
        if length == 0:
            whole.extend(examples[i] for i in members)
            continue
        suffixes = [_suffix(examples[i], length) for i in members]
        prefix = torch.tensor([examples[members[0]].input_ids[:length]], device=device)
        segments.append(Segment(prefix, _chunked(suffixes, cfg, pad_id, device)))
    if whole:
        segments.append(Segment(None, _chunked(whole, cfg, pad_id, device)))
    return segments


def _idle_chunk(pad_id: int) -> Chunk:
    """A two-token stand-in micro-batch (one loss position) for a process that has run out of
    its own under FSDP: its forward and backward join the others' collectives, with weight 0."""
    return collate([TrainExample(-1, [pad_id, pad_id], [0, 1], [0.0, 0.0], [0.0, 0.0])], pad_id)


def pad_for_fsdp(segments: list[Segment], pad_id: int, device: torch.device) -> list[Segment]:
    """One segment of whole sequences in which this process runs as many chunks as the busiest
    process: under FSDP every forward and backward is a collective."""
    chunks = [c for seg in segments for c in seg.chunks]
    n_chunks = _all_max(len(chunks), device)
    idle = {k: v.to(device) for k, v in _idle_chunk(pad_id).items()}
    return [Segment(None, chunks + [idle] * (n_chunks - len(chunks)), n_real=len(chunks))]


# -- metric accumulation ---------------------------------------------------------------------------
@dataclass
class _Totals:
    """Sums of the ``train/*`` metrics over the chunks and iterations of one update."""

    num_tokens: float
    iterations: int
    sums: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    grad_norms: list[float] = field(default_factory=list)

    def add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value

    def add_chunk(self, chunk: Chunk, loss_metrics: dict[str, Any], entropy: Any) -> None:
        """One real chunk's metrics, weighted by its share of the loss tokens."""
        self.tokens += int(chunk["attention_mask"].sum())
        # This micro-batch's token weight, averaged over the iterations.
        share = float(chunk["loss_mask"].sum()) / self.num_tokens / self.iterations
        for name, value in loss_metrics.items():
            # the loss is globally normalised already; the rest are token averages
            weight = 1.0 / self.iterations if name == "loss" else share
            self.add(M.train_metric(name), float(value) * weight)
        if entropy is not None:
            mask = chunk["loss_mask"]
            ent = float((entropy.detach() * mask).sum() / mask.sum().clamp(min=1))
            self.add(M.TRAIN_ENTROPY, ent * share)

    def metrics(self, device: torch.device) -> dict[str, float]:
        out = {key: _all_sum(value, device) for key, value in self.sums.items()}
        out[M.TRAIN_GRAD_NORM] = sum(self.grad_norms) / len(self.grad_norms)
        out[M.TRAIN_TOKENS] = _all_sum(float(self.tokens), device)
        out.setdefault(M.TRAIN_KL, 0.0)
        return out


# -- one chunk, one segment, one gradient step -----------------------------------------------------
@dataclass(frozen=True)
class _Normalisers:
    tokens: float
    sequences: float
    max_tokens: float | None = None


def _chunk_loss(
    ctx: UpdateContext,
    cfg: MultiTurnRLConfig,
    chunk: Chunk,
    prefixes: tuple[PrefixKV | None, PrefixKV | None],
    old: dict[int, torch.Tensor],
    index: int,
    norm: _Normalisers,
) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor | None]:
    """The loss of one micro-batch (``index`` keys its frozen π_old), its metrics and entropy.

    The forward passes run under the bf16 autocast when it is on; the loss in float32."""
    prefix, ref_prefix = prefixes
    ids, attention, mask = chunk["input_ids"], chunk["attention_mask"], chunk["loss_mask"]
    with _autocast(ctx):
        logprobs, entropy = token_logprobs(
            ctx.model,
            ids,
            attention,
            mask,
            with_entropy=True,
            prefix=prefix,
            entropy_grad=cfg.entropy_coef > 0,
        )
        ref = None
        if ctx.reference is not None:
            with torch.no_grad(), ctx.reference.module() as ref_model:
                ref, _ = token_logprobs(ref_model, ids, attention, mask, prefix=ref_prefix)
    # π_old: the policy's logprobs on the first pass, frozen for the later iterations.
    old_logprobs = old.setdefault(index, logprobs.detach())
    loss, loss_metrics = policy_loss(
        cfg.loss_type,
        logprobs,
        old_logprobs,
        chunk["advantages"],
        mask,
        behaviour_logprobs=chunk["behaviour_logprobs"],
        ref_logprobs=ref,
        beta=cfg.beta,
        epsilon_low=cfg.epsilon_low,
        epsilon_high=cfg.resolved_epsilon_high,
        is_cap=cfg.is_cap,
        tis_cap=cfg.tis_cap,
        aggregation=cfg.loss_aggregation,
        num_tokens=norm.tokens,
        num_sequences=norm.sequences,
        max_tokens=norm.max_tokens,
        importance_sampling_level=cfg.importance_sampling_level,
        is_correction=cfg.is_correction,
        kl_estimator=cfg.kl_estimator,
        entropy=entropy,
        entropy_coef=cfg.entropy_coef,
    )
    return loss, loss_metrics, entropy


def _autocast(ctx: UpdateContext) -> torch.autocast:
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.bf16)


def _run_prefixes(ctx: UpdateContext, segment: Segment) -> tuple[PrefixKV | None, PrefixKV | None]:
    """The segment's shared prompt through the policy (with grad) and the reference."""
    if segment.prefix is None:
        return None, None
    with _autocast(ctx):
        prefix = run_prefix(ctx.model, segment.prefix)
        ref_prefix = None
        if ctx.reference is not None:
            with torch.no_grad(), ctx.reference.module() as ref_model:
                ref_prefix = run_prefix(ref_model, segment.prefix, grad=False)
    return prefix, ref_prefix


def _gradient_step(ctx: UpdateContext, cfg: MultiTurnRLConfig, sharded: bool) -> float:
    """Sum the gradients over processes, clip them, step; the gradient norm before clipping."""
    if distributed() and not sharded:  # FSDP has reduce-scattered (summed) them already
        for p in ctx.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
    grad_norm = torch.nn.utils.clip_grad_norm_(ctx.params, cfg.max_grad_norm)
    if isinstance(grad_norm, DTensor):  # sharded gradients: the norm over all shards
        grad_norm = grad_norm.full_tensor()
    if not torch.isfinite(grad_norm):
        logger.warning("non-finite gradient norm: update skipped")
        ctx.optimizer.zero_grad(set_to_none=True)
    ctx.optimizer.step()
    ctx.scheduler.step()
    return float(grad_norm)


def _empty_step(ctx: UpdateContext, cfg: MultiTurnRLConfig) -> dict[str, float]:
    """Every group scored the same everywhere: nothing to learn. The step still counts (an
    optimizer step without gradients changes nothing and keeps the schedule in order)."""
    for _ in range(max(cfg.num_iterations, 1)):
        ctx.optimizer.step()
        ctx.scheduler.step()
    return {M.TRAIN_LOSS: 0.0, M.TRAIN_GRAD_NORM: 0.0, M.TRAIN_TOKENS: 0.0}


def update_policy(
    ctx: UpdateContext,
    cfg: MultiTurnRLConfig,
    trajectories: Sequence[Trajectory],
    advantages: Sequence[torch.Tensor],
) -> dict[str, float]:
    """``num_iterations`` optimizer steps over (this process's shard of) the batch; the
    ``train/*`` metrics (averaged over the iterations)."""
    examples = build_examples(
        trajectories, advantages, cfg.beta > 0, mask_truncated=cfg.mask_truncated
    )
    norm = _Normalisers(
        tokens=_all_sum(float(sum(e.n_loss_tokens for e in examples)), ctx.device),
        sequences=_all_sum(float(len(examples)), ctx.device),
        max_tokens=ctx.max_completion_tokens,
    )
    metrics = {M.TRAIN_LR: float(ctx.scheduler.get_last_lr()[0]), M.TRAIN_SEQUENCES: norm.sequences}
    if cfg.mask_truncated:
        cut = sum(not t.failed and cut_by_token_budget(t) for t in trajectories)
        metrics[M.TRAIN_MASKED_TRUNCATED] = _all_sum(float(cut), ctx.device)
    ctx.optimizer.zero_grad(set_to_none=True)
    if norm.tokens == 0:
        return {**metrics, **_empty_step(ctx, cfg)}
    ctx.model.train()
    sharded = is_sharded(ctx.model)
    share = cfg.share_prefix and not sharded
    # Collated once: every iteration runs the same micro-batches.
    segments = build_segments(examples, cfg, ctx.pad_id, ctx.device, share=share)
    if sharded:
        segments = pad_for_fsdp(segments, ctx.pad_id, ctx.device)
    iterations = max(cfg.num_iterations, 1)
    totals = _Totals(norm.tokens, iterations)
    old: dict[int, torch.Tensor] = {}
    for _ in range(iterations):
        ctx.optimizer.zero_grad(set_to_none=True)
        index = 0
        for segment in segments:
            if segment.prefix is not None:
                totals.tokens += segment.prefix.shape[1]
            prefixes = _run_prefixes(ctx, segment)
            for j, chunk in enumerate(segment.chunks):
                loss, loss_metrics, entropy = _chunk_loss(
                    ctx, cfg, chunk, prefixes, old, index, norm
                )
                index += 1
                if j >= segment.real:  # an FSDP stand-in: joins the collectives, weighs 0
                    (loss * 0.0).backward()
                    continue
                loss.backward()
                totals.add_chunk(chunk, loss_metrics, entropy)
            if prefixes[0] is not None:
                prefixes[0].backward()  # the suffixes' key/value gradients into the parameters
        totals.grad_norms.append(_gradient_step(ctx, cfg, sharded))
    ctx.model.eval()
    return {**metrics, **totals.metrics(ctx.device)}
