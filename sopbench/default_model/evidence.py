"""The evidence stage of the default model: reference aircraft episodes whose decisions weigh more.

See :func:`train_evidence` for why it exists and what it trains.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mtrl_local.env.actions import FINAL_OPEN
from mtrl_local.plugins import load_task
from mtrl_local.rollout.shared_prefix import common_prefix_len
from mtrl_local.train.prefix import PrefixKV, run_prefix
from sopbench.aircraft_inspection.rules import OUTPUT_FIELDS as AIRCRAFT_FIELDS
from sopbench.base import ExpertEpisode, Task
from sopbench.default_model.data import jsonable_messages
from sopbench.default_model.phase import PhaseResult, warmup_cosine

logger = logging.getLogger(__name__)


#: Answer fields whose values the evidence stage weights: each is decided by tool results (all
#: aircraft answer fields but the copied tail number).
EVIDENCE_FIELDS = tuple(f for f in AIRCRAFT_FIELDS if f != "tail_number")


def evidence_example(
    tokenizer: PreTrainedTokenizerBase, episode: ExpertEpisode, weight: float
) -> tuple[list[int], list[float]]:
    """One reference episode as ``(ids, loss weights)``: 1 on the model's own tokens (the chat
    template's generation mask), ``weight`` on the values of :data:`EVIDENCE_FIELDS` in its final
    answer, 0 elsewhere (prompt, tool results)."""
    messages = jsonable_messages(episode.messages)
    tools: Any = episode.tools
    out: Any = tokenizer.apply_chat_template(
        messages,
        tools=tools,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids = list(out["input_ids"])
    weights = [float(m) for m in out["assistant_masks"]]
    text = str(tokenizer.apply_chat_template(messages, tools=tools, tokenize=False))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != ids:
        raise RuntimeError("the chat template's tokens differ from its text's tokens")
    answer_at = text.rfind(FINAL_OPEN)
    spans = []
    for field in EVIDENCE_FIELDS if answer_at >= 0 else ():
        key = text.find(f'"{field}": ', answer_at)
        if key < 0:
            continue
        start = key + len(f'"{field}": ')
        end = min(i for i in (text.find(",", start), text.find("}", start)) if i >= 0)
        spans.append((start, end))
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        if weights[t] and any(a < e and b > s for s, e in spans):
            weights[t] = weight
    return ids, weights


def evidence_loss(
    model: PreTrainedModel, batch: Sequence[tuple[list[int], list[float]]], pad_id: int
) -> tuple[torch.Tensor, PrefixKV | None, int]:
    """The weighted next-token loss of ``batch`` (``(ids, weights)`` rows) with the rows' common
    prefix run once: ``(loss, prefix, prefix length)``; no prefix when the rows share none. After
    ``loss.backward()`` the caller runs ``prefix.backward()`` to carry the rows' gradients through
    the prefix (exact gradients)."""
    # The shared prefix ends before the token that predicts the first trained one, so no loss
    # position lies in it.
    shared = common_prefix_len([ids for ids, _ in batch])
    shared = min(shared, *(next(i for i, x in enumerate(wt) if x) - 1 for _, wt in batch))
    shared = max(shared, 0)
    width = max(len(ids) for ids, _ in batch) - shared
    x = torch.tensor([ids[shared:] + [pad_id] * (width - len(ids) + shared) for ids, _ in batch])
    w = torch.tensor([wt[shared:] + [0.0] * (width - len(wt) + shared) for _, wt in batch])
    kv = run_prefix(model, torch.tensor([batch[0][0][:shared]])) if shared else None
    extra = kv.forward_kwargs(model, len(batch), width) if kv is not None else {}
    # Right padding needs no attention mask: causal attention never looks at later pads.
    logits = model(input_ids=x, **extra).logits
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
    )
    target_w = w[:, 1:].reshape(-1)
    return (token_loss * target_w).sum() / target_w.sum(), kv, shared


def train_evidence(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    task_name: str,
    steps: int,
    batch_size: int,
    weight: float,
    recombined: float,
    learning_rate: float,
    seed: int,
    max_cases: int | None = None,
    warmup_steps: int = 10,
) -> PhaseResult:
    """Evidence stage: reference episodes whose answer fields weigh ``weight`` times the rest.

    Why: after the earlier stages the model's verdicts ignore the tool results (sampled on aircraft
    test, "fail" was written as often when the check failed as when it passed, ~0.3 each) and
    RL had nothing to reinforce on the 58 % of aircraft that are not ready (strict TSR there
    stayed ~0.03 in six runs while the ready ones rose to ~0.5). The demonstrations hold one
    such decision per ~2k-token trajectory among ~280 trained tokens. Here each step trains
    ``batch_size`` whole reference episodes of the **train** split with the decision tokens
    weighted; a share ``recombined`` of them are recombined aircraft (evidence groups of three
    train cases, ``recombined_case``) so that a verdict cannot be recalled from the aircraft id.

    The task's system turn is the same in every episode: it runs once per step and its keys and
    values serve every row (:mod:`mtrl_local.train.prefix`, exact gradients), so a step costs
    the ~700-token tails, not ``batch_size`` × ~2.1k tokens. Deterministic given ``seed``.
    """
    example = _example_source(tokenizer, task_name, weight, recombined, seed, max_cases)
    pad = int(tokenizer.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, warmup_steps))
    model.train()
    losses: list[float] = []
    recent: list[float] = []
    n_tok, rows = 0, 0
    t0 = time.perf_counter()
    for step in range(steps):
        batch = [example() for _ in range(batch_size)]
        loss, tokens = _evidence_step(model, opt, sched, batch, pad)
        rows += len(batch)
        n_tok += tokens
        recent = [*recent[-19:], loss]
        if step == 0 or (step + 1) % 25 == 0:
            losses.append(recent[-1])
            logger.info("evidence step %d/%d loss %.4f", step + 1, steps, recent[-1])
    model.eval()
    return PhaseResult(
        name="evidence",
        steps=steps,
        rows=rows,
        seconds=time.perf_counter() - t0,
        first_loss=losses[0] if losses else None,
        last_loss=recent[-1] if recent else None,
        losses=losses,
        train_tokens=n_tok,
    )


def _example_source(
    tokenizer: PreTrainedTokenizerBase,
    task_name: str,
    weight: float,
    recombined: float,
    seed: int,
    max_cases: int | None,
) -> Callable[[], tuple[list[int], list[float]]]:
    """A seeded stream of weighted reference episodes, a share ``recombined`` on recombined
    aircraft (when the task can recombine its cases)."""
    task = cast(Task, load_task(task_name))
    cases = task.cases("train")[:max_cases]
    recombine = getattr(task, "recombined_case", None)
    rng = random.Random(seed)
    counter = iter(range(1 << 62))

    def example() -> tuple[list[int], list[float]]:
        if recombine is not None and rng.random() < recombined:
            case = recombine(cases, rng, next(counter))
        else:
            case = rng.choice(cases)
        return evidence_example(
            tokenizer, task.run_expert(case, seed=rng.randrange(1 << 30)), weight
        )

    return example


def _evidence_step(
    model: PreTrainedModel,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    batch: list[tuple[list[int], list[float]]],
    pad: int,
) -> tuple[float, int]:
    """One clipped AdamW step on ``batch`` with its shared prefix run once; (loss, tokens run)."""
    loss, kv, shared = evidence_loss(model, batch, pad)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if kv is not None:
        kv.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return float(loss.item()), shared + sum(len(ids) - shared for ids, _ in batch)
