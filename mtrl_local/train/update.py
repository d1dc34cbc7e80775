"""One optimizer step over a batch of trajectories, on one process or several.

Sequence extension: each trajectory is one sequence; micro-batches are packed by a token budget
and their gradients accumulate. The loss of a micro-batch is normalised by the *global* number
of loss tokens (or sequences), so the accumulated gradient is exactly the full-batch gradient.

Several processes (``accelerate launch``, data parallelism over gloo or NCCL): each process holds
a shard of the batch; the normaliser is summed over processes first, and after the backward
passes the gradients are summed with one all-reduce per parameter. So a step on N processes gives
the same update as one process on the whole batch (a test checks it). With ``fsdp`` the model is
sharded (:func:`mtrl_local.train.distributed.shard_model`): its backward reduce-scatters (sums)
the gradients itself, and since every forward is a collective, a process with fewer
micro-batches than the busiest one runs weightless stand-ins until they are level.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from mtrl_local.config import MultiTurnRLConfig
from mtrl_local.losses import policy_loss
from mtrl_local.train.batching import (
    TrainExample,
    build_examples,
    collate,
    micro_batches,
    token_logprobs,
)
from mtrl_local.train.distributed import is_sharded
from mtrl_local.train.policy import Reference
from mtrl_local.train.prefix import prefix_groups, run_prefix
from mtrl_local.trajectory import Trajectory

logger = logging.getLogger(__name__)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_sum(value: float, device: torch.device) -> float:
    if not distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


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


def _all_max(value: int, device: torch.device) -> int:
    if not distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _idle_chunk(pad_id: int) -> dict[str, torch.Tensor]:
    """A two-token stand-in micro-batch (one loss position) for a process that has run out of
    its own under FSDP: its forward and backward join the others' collectives, with weight 0."""
    return collate([TrainExample(-1, [pad_id, pad_id], [0, 1], [0.0, 0.0], [0.0, 0.0])], pad_id)


@dataclass
class _Segment:
    """Micro-batches that run after one shared prefix (``None``: whole sequences)."""

    prefix: torch.Tensor | None  # (1, P)
    chunks: list[dict[str, torch.Tensor]]
    #: How many of ``chunks`` are real (the rest: FSDP stand-ins); ``None`` = all.
    n_real: int | None = None

    @property
    def real(self) -> int:
        return len(self.chunks) if self.n_real is None else self.n_real


def _segments(
    examples: list[TrainExample],
    cfg: MultiTurnRLConfig,
    pad_id: int,
    device: torch.device,
    share: bool,
) -> list[_Segment]:
    """The update's micro-batches, collated, grouped behind their shared prompt (``share``)."""
    rows = _max_rows(cfg, device)

    def chunked(items: list[TrainExample]) -> list[dict[str, torch.Tensor]]:
        return [
            {k: v.to(device) for k, v in collate([items[i] for i in idx], pad_id).items()}
            for idx in micro_batches(items, cfg.micro_batch_tokens, rows)
        ]

    if not share:
        return [_Segment(None, chunked(examples))] if examples else []
    segments: list[_Segment] = []
    whole: list[TrainExample] = []
    groups = prefix_groups([e.input_ids for e in examples], [e.loss_mask for e in examples])
    for length, members in groups:
        if length == 0:
            whole.extend(examples[i] for i in members)
            continue
        suffixes = [
            TrainExample(
                e.index,
                e.input_ids[length:],
                e.loss_mask[length:],
                e.behaviour_logprobs[length:],
                e.advantages[length:],
            )
            for e in (examples[i] for i in members)
        ]
        prefix = torch.tensor([examples[members[0]].input_ids[:length]], device=device)
        segments.append(_Segment(prefix, chunked(suffixes)))
    if whole:
        segments.append(_Segment(None, chunked(whole)))
    return segments


def _max_rows(cfg: MultiTurnRLConfig, device: torch.device) -> int | None:
    """Rows per micro-batch: ``micro_batch_rows``, or automatic (one sequence at a time on CPU,
    where padding forces the masked attention kernel; no limit on CUDA)."""
    if cfg.micro_batch_rows > 0:
        return cfg.micro_batch_rows
    return 1 if device.type == "cpu" else None


def update_policy(
    ctx: UpdateContext,
    cfg: MultiTurnRLConfig,
    trajectories: Sequence[Trajectory],
    advantages: Sequence[torch.Tensor],
) -> dict[str, float]:
    """``num_iterations`` optimizer steps over (this process's shard of) the batch; the
    ``train/*`` metrics (averaged over the iterations)."""
    examples = build_examples(trajectories, advantages, keep_zero_advantage=cfg.beta > 0)
    lr = float(ctx.scheduler.get_last_lr()[0])
    local_tokens = float(sum(e.n_loss_tokens for e in examples))
    num_tokens = _all_sum(local_tokens, ctx.device)
    num_sequences = _all_sum(float(len(examples)), ctx.device)
    metrics: dict[str, float] = {"train/lr": lr, "train/sequences": num_sequences}
    ctx.optimizer.zero_grad(set_to_none=True)
    if num_tokens == 0:
        # Every group scored the same everywhere: nothing to learn; the step still counts (an
        # optimizer step without gradients changes nothing and keeps the schedule in order).
        for _ in range(max(cfg.num_iterations, 1)):
            ctx.optimizer.step()
            ctx.scheduler.step()
        metrics.update({"train/loss": 0.0, "train/grad_norm": 0.0, "train/tokens": 0.0})
        return metrics
    ctx.model.train()
    sums: dict[str, float] = {}
    total_tokens = 0
    grad_norms: list[float] = []
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.bf16)
    sharded = is_sharded(ctx.model)
    # Collated once: every iteration runs the same micro-batches.
    segments = _segments(
        examples, cfg, ctx.pad_id, ctx.device, share=cfg.share_prefix and not sharded
    )
    if sharded:
        # Under FSDP every forward and backward is a collective: all processes run as many
        # micro-batches as the busiest one, the others padded with weightless stand-ins.
        chunks = [c for seg in segments for c in seg.chunks]
        n_chunks = _all_max(len(chunks), ctx.device)
        idle = {k: v.to(ctx.device) for k, v in _idle_chunk(ctx.pad_id).items()}
        padded = chunks + [idle] * (n_chunks - len(chunks))
        segments = [_Segment(None, padded, n_real=len(chunks))]
    #: π_old per micro-batch: the policy's logprobs on the first pass, frozen for later passes.
    frozen: dict[int, torch.Tensor] = {}
    iterations = max(cfg.num_iterations, 1)
    for iteration in range(iterations):
        ctx.optimizer.zero_grad(set_to_none=True)
        chunk = -1
        for seg in segments:
            prefix = ref_prefix = None
            if seg.prefix is not None:
                total_tokens += seg.prefix.shape[1]
                with autocast:
                    prefix = run_prefix(ctx.model, seg.prefix)
                    if ctx.reference is not None:
                        with torch.no_grad(), ctx.reference.module() as ref_model:
                            ref_prefix = run_prefix(ref_model, seg.prefix, grad=False)
            for j, batch in enumerate(seg.chunks):
                chunk += 1
                real = j < seg.real
                with autocast:
                    logprobs, entropy = token_logprobs(
                        ctx.model,
                        batch["input_ids"],
                        batch["attention_mask"],
                        batch["loss_mask"],
                        with_entropy=True,
                        prefix=prefix,
                    )
                    ref = None
                    if ctx.reference is not None:
                        with torch.no_grad(), ctx.reference.module() as ref_model:
                            ref, _ = token_logprobs(
                                ref_model,
                                batch["input_ids"],
                                batch["attention_mask"],
                                batch["loss_mask"],
                                prefix=ref_prefix,
                            )
                old = frozen.setdefault(chunk, logprobs.detach())
                loss, loss_metrics = policy_loss(
                    cfg.loss_type,
                    logprobs,
                    old,
                    batch["advantages"],
                    batch["loss_mask"],
                    behaviour_logprobs=batch["behaviour_logprobs"],
                    ref_logprobs=ref,
                    beta=cfg.beta,
                    epsilon_low=cfg.epsilon_low,
                    epsilon_high=cfg.resolved_epsilon_high,
                    is_cap=cfg.is_cap,
                    tis_cap=cfg.tis_cap,
                    aggregation=cfg.loss_aggregation,
                    num_tokens=num_tokens,
                    num_sequences=num_sequences,
                )
                if not real:
                    (loss * 0.0).backward()
                    continue
                loss.backward()
                total_tokens += int(batch["attention_mask"].sum())
                # This micro-batch's token weight, averaged over the iterations.
                share = float(batch["loss_mask"].sum()) / num_tokens / iterations
                for name, value in loss_metrics.items():
                    key = f"train/{name}"
                    # the loss is globally normalised already; the rest are token averages
                    weight = 1.0 / iterations if name == "loss" else share
                    sums[key] = sums.get(key, 0.0) + float(value) * weight
                if entropy is not None:
                    mask = batch["loss_mask"]
                    ent = float((entropy * mask).sum() / mask.sum().clamp(min=1))
                    sums["train/entropy"] = sums.get("train/entropy", 0.0) + ent * share
            if prefix is not None:
                prefix.backward()  # the suffixes' key/value gradients into the parameters
        if distributed() and not sharded:  # FSDP has reduce-scattered (summed) them already
            for p in ctx.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
        grad_norm = torch.nn.utils.clip_grad_norm_(ctx.params, cfg.max_grad_norm)
        if isinstance(grad_norm, DTensor):  # sharded gradients: the norm over all shards
            grad_norm = grad_norm.full_tensor()
        grad_norms.append(float(grad_norm))
        if torch.isfinite(grad_norm):
            ctx.optimizer.step()
        else:
            logger.warning("non-finite gradient norm: update skipped (iteration %d)", iteration)
            ctx.optimizer.zero_grad(set_to_none=True)
            ctx.optimizer.step()
        ctx.scheduler.step()
    if distributed():
        for key in list(sums):
            sums[key] = _all_sum(sums[key], ctx.device)
    ctx.model.eval()
    metrics.update(sums)
    metrics["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
    metrics["train/tokens"] = _all_sum(float(total_tokens), ctx.device)
    metrics.setdefault("train/kl", 0.0)
    return metrics
