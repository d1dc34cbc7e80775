"""One optimizer step over a batch of trajectories, on one process or several.

Sequence extension: each trajectory is one sequence; micro-batches are packed by a token budget
and their gradients accumulate. The loss of a micro-batch is normalised by the *global* number
of loss tokens (or sequences), so the accumulated gradient is exactly the full-batch gradient.

Several processes (``accelerate launch``, DDP-style data parallelism over gloo or NCCL): each
process holds a shard of the batch; the normaliser is summed over processes first, and after the
backward passes the gradients are summed with one all-reduce per parameter. So a step on N
processes gives the same update as one process on the whole batch (a test checks it). The
gradients are reduced by hand rather than through the ``DistributedDataParallel`` wrapper because
the loss runs only the masked positions through the LM head (``token_logprobs``), which goes
around the wrapper's ``forward``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mtrl_local.config import MultiTurnRLConfig
from mtrl_local.losses import policy_loss
from mtrl_local.train.batching import build_examples, collate, micro_batches, token_logprobs
from mtrl_local.train.policy import Reference
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
    # Collated once: every iteration runs the same micro-batches.
    chunks = [
        {
            k: v.to(ctx.device)
            for k, v in collate([examples[i] for i in indices], ctx.pad_id).items()
        }
        for indices in micro_batches(examples, cfg.micro_batch_tokens, _max_rows(cfg, ctx.device))
    ]
    #: π_old per micro-batch: the policy's logprobs on the first pass, frozen for later passes.
    frozen: dict[int, torch.Tensor] = {}
    iterations = max(cfg.num_iterations, 1)
    for iteration in range(iterations):
        ctx.optimizer.zero_grad(set_to_none=True)
        for chunk, batch in enumerate(chunks):
            total_tokens += int(batch["attention_mask"].sum())
            with autocast:
                logprobs, entropy = token_logprobs(
                    ctx.model,
                    batch["input_ids"],
                    batch["attention_mask"],
                    batch["loss_mask"],
                    with_entropy=True,
                )
                ref = None
                if ctx.reference is not None:
                    with torch.no_grad(), ctx.reference.module() as ref_model:
                        ref, _ = token_logprobs(
                            ref_model,
                            batch["input_ids"],
                            batch["attention_mask"],
                            batch["loss_mask"],
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
            loss.backward()
            # This micro-batch's token weight, averaged over the iterations.
            share = float(batch["loss_mask"].sum()) / num_tokens / iterations
            for name, value in loss_metrics.items():
                key = f"train/{name}"
                weight = 1.0 / iterations if name == "loss" else share  # loss: globally normalised
                sums[key] = sums.get(key, 0.0) + float(value) * weight
            if entropy is not None:
                mask = batch["loss_mask"]
                ent = float((entropy * mask).sum() / mask.sum().clamp(min=1))
                sums["train/entropy"] = sums.get("train/entropy", 0.0) + ent * share
        if distributed():
            for p in ctx.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
        grad_norm = torch.nn.utils.clip_grad_norm_(ctx.params, cfg.max_grad_norm)
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
