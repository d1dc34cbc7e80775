"""Sequence-extension training batches (docs/design.md, "Trajectories").

A whole multi-turn trajectory is ONE training sequence: turn k's context is the prefix of turn
k+1, so the cost grows with the trajectory length L, not with turns × L. The loss mask is 1 only on
the tokens the sampler produced; per-turn advantages land on their turn's tokens.

Micro-batches are packed by a token budget (padded length × rows), longest first, so a step of
uneven trajectories needs few forward passes and never runs out of memory on a long one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mtrl_local.advantages import token_advantages
from mtrl_local.rollout.kv import forward_parameters
from mtrl_local.train.prefix import PrefixKV
from mtrl_local.trajectory import Trajectory


@dataclass
class TrainExample:
    """One trajectory ready for the loss; lists are aligned with ``input_ids``."""

    index: int
    input_ids: list[int]
    loss_mask: list[int]
    behaviour_logprobs: list[float]
    advantages: list[float]

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_loss_tokens(self) -> int:
        return int(sum(self.loss_mask))


def cut_by_token_budget(traj: Trajectory) -> bool:
    """The episode was cut by a token budget: a turn reached ``sampling_max_tokens`` (what
    ``rollout/truncated_frac`` counts) or the context window ended it (``done_reason`` length).
    Its reward judges an answer the policy was not allowed to finish."""
    return traj.truncated or traj.done_reason == "length"


def build_examples(
    trajectories: Sequence[Trajectory],
    advantages: Sequence[Tensor],
    keep_zero_advantage: bool = False,
    mask_truncated: bool = False,
) -> list[TrainExample]:
    """Training examples for ``trajectories`` with their (scalar or per-turn) advantages.

    Trajectories whose environment failed are left out (an environment bug is not the policy's
    doing). So are those whose advantage is zero on every token, unless ``keep_zero_advantage``
    (needed when a KL term gives them a gradient): they would cost a forward and backward pass and
    add nothing to a policy-gradient loss. With ``mask_truncated`` (DAPO's overlong filtering)
    so are those :func:`cut_by_token_budget`: their loss mask is all 0, KL term included; their
    rewards still counted in their group's advantages.
    """
    out: list[TrainExample] = []
    for i, (traj, adv) in enumerate(zip(trajectories, advantages, strict=True)):
        if traj.failed or not traj.turns or (mask_truncated and cut_by_token_budget(traj)):
            continue
        value = adv.tolist() if adv.dim() else float(adv)
        per_token = token_advantages(value, traj.turns, len(traj.input_ids))  # (T,)
        if not keep_zero_advantage and not bool(per_token.any()):
            continue
        out.append(
            TrainExample(
                index=i,
                input_ids=list(traj.input_ids),
                loss_mask=list(traj.loss_mask),
                behaviour_logprobs=list(traj.behaviour_logprobs),
                advantages=per_token.tolist(),
            )
        )
    return out


def micro_batches(
    examples: Sequence[TrainExample], token_budget: int, max_rows: int | None = None
) -> list[list[int]]:
    """Indices of ``examples`` packed so that rows × longest row ≤ ``token_budget`` and at most
    ``max_rows`` rows (``None``: no row limit).

    Longest first: rows of similar length share a batch, so little compute goes to padding. A
    single example longer than the budget gets a micro-batch of its own.
    """
    order = sorted(range(len(examples)), key=lambda i: -examples[i].n_tokens)
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = examples[i].n_tokens
        width = max(longest, n)
        full = max_rows is not None and len(current) >= max_rows
        if current and (full or width * (len(current) + 1) > token_budget):
            batches.append(current)
            current, width = [], n
        current.append(i)
        longest = width
    if current:
        batches.append(current)
    return batches


def collate(examples: Sequence[TrainExample], pad_id: int) -> dict[str, Tensor]:
    """Right-padded (B, T) tensors: input_ids, attention_mask, loss_mask, behaviour, advantages."""
    width = max(e.n_tokens for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)  # (B, T)
    attention = torch.zeros((batch, width), dtype=torch.long)  # (B, T)
    mask = torch.zeros((batch, width), dtype=torch.float32)  # (B, T)
    behaviour = torch.zeros((batch, width), dtype=torch.float32)  # (B, T)
    advantages = torch.zeros((batch, width), dtype=torch.float32)  # (B, T)
    for row, e in enumerate(examples):
        n = e.n_tokens
        input_ids[row, :n] = torch.tensor(e.input_ids)
        attention[row, :n] = 1
        mask[row, :n] = torch.tensor(e.loss_mask, dtype=torch.float32)
        behaviour[row, :n] = torch.tensor(e.behaviour_logprobs, dtype=torch.float32)
        advantages[row, :n] = torch.tensor(e.advantages, dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "loss_mask": mask,
        "behaviour_logprobs": behaviour,
        "advantages": advantages,
    }


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (HF causal LMs since 4.50)."""
    return "logits_to_keep" in forward_parameters(model)


def token_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,  # (B, T)
    attention_mask: Tensor,  # (B, T)
    loss_mask: Tensor,  # (B, T)
    with_entropy: bool = False,
    prefix: PrefixKV | None = None,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log π(token_t | tokens_<t) at every position with ``loss_mask`` 1; zeros elsewhere.

    With ``prefix`` the tensors are the suffixes that follow it (:mod:`mtrl_local.train.prefix`):
    the model attends over the prefix's cached keys/values, positions continue after it.

    Returns ``(logprobs (B, T), entropy (B, T) or None)``; position t holds the logprob of token
    t (position 0 is always 0: nothing predicts the first token). The entropy has a gradient
    only with ``entropy_grad`` (an entropy bonus in the loss). Only the masked positions go
    through the LM head: the prompt and tool results are most of a trajectory, and their logits
    would be computed and thrown away.
    """
    targets = loss_mask[:, 1:].bool()  # (B, T-1): predict token t+1 from position t
    # No padding: without a mask SDPA keeps its causal kernel (no mask tensor is built).
    mask: Tensor | None = None if bool(attention_mask.all()) else attention_mask
    extra: dict[str, object] = {}
    if prefix is not None:
        rows, width = input_ids.shape
        extra = prefix.forward_kwargs(model, rows, width)
        if mask is not None:  # the padding mask covers the prefix too
            mask = torch.cat([mask.new_ones(rows, prefix.length), mask], dim=1)
    if _keeps_logits(model):
        # The positions any row trains on, through the model's own forward (so wrappers that
        # hook it, FSDP's all-gather among them, see the call): the LM head runs on those only.
        positions = targets.any(0).nonzero().squeeze(-1)  # (P,)
        kept = model(
            input_ids=input_ids, attention_mask=mask, logits_to_keep=positions, **extra
        ).logits
        logits = kept[targets[:, positions]].float()  # (N, V), row-major like targets
    else:  # a forward without ``logits_to_keep``: every position's logits
        logits = model(input_ids=input_ids, attention_mask=mask, **extra).logits
        logits = logits[:, :-1][targets].float()  # (N, V)
    log_norm = torch.logsumexp(logits, dim=-1)  # (N,)
    chosen = logits.gather(-1, input_ids[:, 1:][targets].unsqueeze(-1)).squeeze(-1)  # (N,)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)  # (B, T)
    out[:, 1:][targets] = chosen - log_norm
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            probs = torch.softmax(logits, dim=-1)  # (N, V)
            ent = log_norm - (probs * logits).sum(-1)  # (N,)
            entropy = torch.zeros_like(out)
            entropy[:, 1:][targets] = ent
    return out, entropy
