"""What a build phase did (for ``mtrl_build.json``) and the optimizer step the plain-PyTorch
phases share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel


@dataclass
class PhaseResult:
    """What one training phase did, for ``mtrl_build.json``."""

    name: str
    steps: int
    rows: int
    seconds: float
    first_loss: float | None
    last_loss: float | None
    losses: list[float]
    train_tokens: int
    reached_target: bool | None = None
    """Phases with a stopping target (the induction stage): whether it was reached."""

    def to_json(self) -> dict[str, Any]:
        return {
            "reached_target": self.reached_target,
            "name": self.name,
            "steps": self.steps,
            "rows": self.rows,
            "seconds": round(self.seconds, 1),
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "losses": [round(x, 4) for x in self.losses],
            "train_tokens": self.train_tokens,
        }


def warmup_cosine(steps: int, warmup_steps: int) -> Any:
    """LR multiplier: linear warmup, then cosine to 0 within the phase (as the SFT phase)."""
    warm = min(warmup_steps, max(steps // 10, 1))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(steps - warm, 1)))

    return lr_at


def optimizer_step(
    model: PreTrainedModel,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    ids: torch.Tensor,
    labels: torch.Tensor,
) -> float:
    """One clipped AdamW step on ``(ids, labels)`` (labels -100 where untrained); the loss."""
    loss = model(input_ids=ids, labels=labels).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return float(loss.item())
