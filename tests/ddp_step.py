"""One update step on a fixed batch, on one process or under ``accelerate launch`` (gloo).

Usage: ``python tests/ddp_step.py MODEL_DIR OUT.pt [CONFIG_JSON]`` or
``accelerate launch --multi_gpu --num_processes 2 tests/ddp_step.py MODEL_DIR OUT.pt`` (on a
machine without CUDA this starts 2 CPU processes over gloo; ``--cpu`` would start only one).
Every process builds the same batch (scripted noisy expert through the real engine), keeps its
shard of the groups, and runs :func:`update_policy`; rank 0 saves the updated parameters.
``CONFIG_JSON`` overrides config fields (e.g. ``{"micro_batch_rows": 16}``; ``{"fsdp": true}``
shards the model over the processes first; ``"beta"`` > 0 adds a reference model that differs
from the policy, so the KL term is exercised).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(model_dir: str, out: str, overrides: str = "{}") -> None:
    from accelerate import PartialState

    from mtrl_local.advantages import compute_advantages, group_by
    from mtrl_local.config import load_config
    from mtrl_local.model_io import load_model
    from mtrl_local.plugins import load_task
    from mtrl_local.rollout.engine import RolloutEngine
    from mtrl_local.rollout.sampler import SamplingParams
    from mtrl_local.train.distributed import full_state_dict, shard_model
    from mtrl_local.train.policy import Reference
    from mtrl_local.train.update import UpdateContext, update_policy
    from rewards.dense import dense_reward
    from tests.trainer_fixtures import noisy_expert_sampler

    state = PartialState(cpu=True)  # initialises torch.distributed (gloo) under accelerate launch
    torch.manual_seed(0)
    model, tokenizer = load_model(model_dir)
    task = load_task("aircraft_inspection")
    engine = RolloutEngine(noisy_expert_sampler(tokenizer, task.name), tokenizer, progress=False)
    trajectories = engine.run(
        task,
        # Three groups: two processes get two and one (uneven shards; under FSDP the process
        # with fewer micro-batches runs stand-ins to keep the collectives in step).
        task.cases("train")[:3],
        n_samples=4,
        sampling=SamplingParams(max_tokens=256),
        reward_fn=dense_reward,
    )
    groups = group_by(trajectories)
    advantages = compute_advantages([t.reward for t in trajectories], groups).advantages
    mine = [i for g in groups[state.process_index :: state.num_processes] for i in g]
    cfg = load_config(
        None,
        {
            "model": model_dir,
            "learning_rate": 1e-2,
            "micro_batch_tokens": 4096,
            **json.loads(overrides),
        },
    )
    reference = None
    if cfg.beta > 0:
        # The reference is the model as loaded; the policy starts from it moved a little
        # (seeded), so the KL term and its gradient are not zero.
        reference = Reference(model, lora=False)
        noise = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=noise))
    if cfg.fsdp:  # sharded: each process holds half of every parameter
        shard_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ctx = UpdateContext(
        model,
        optimizer,
        scheduler,
        params,
        tokenizer.pad_token_id,
        torch.device("cpu"),
        reference=reference,
        max_completion_tokens=2048,  # the dr_grpo constant; unused by the other aggregations
    )
    metrics = update_policy(
        ctx, cfg, [trajectories[i] for i in mine], [advantages[i] for i in mine]
    )
    weights = full_state_dict(model)  # a collective under FSDP: every process gathers
    if state.is_main_process:
        torch.save({"params": weights, "metrics": metrics, "world": state.num_processes}, out)
    state.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:4])
