"""One update step on a fixed batch, on one process or under ``accelerate launch`` (gloo).

Usage: ``python tests/ddp_step.py MODEL_DIR OUT.pt [CONFIG_JSON]`` or
``accelerate launch --multi_gpu --num_processes 2 tests/ddp_step.py MODEL_DIR OUT.pt`` (on a
machine without CUDA this starts 2 CPU processes over gloo; ``--cpu`` would start only one).
Every process builds the same batch (scripted noisy expert through the real engine), keeps its
shard of the groups, and runs :func:`update_policy`; rank 0 saves the updated parameters.
``CONFIG_JSON`` overrides config fields (e.g. ``{"micro_batch_rows": 16}``).
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
    from mtrl_local.models.default import load_model
    from mtrl_local.rollout.backend import SamplingParams
    from mtrl_local.rollout.engine import RolloutEngine
    from mtrl_local.train.update import UpdateContext, update_policy
    from rewards.dense import dense_reward
    from sopbench import get_task
    from tests.trainer_fixtures import noisy_expert_backend

    state = PartialState(cpu=True)  # initialises torch.distributed (gloo) under accelerate launch
    torch.manual_seed(0)
    model, tokenizer = load_model(model_dir)
    task = get_task("aircraft_inspection")
    engine = RolloutEngine(noisy_expert_backend(tokenizer, task.name), tokenizer, progress=False)
    trajectories = engine.run(
        task,
        task.cases("train")[:4],
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
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ctx = UpdateContext(
        model, optimizer, scheduler, params, tokenizer.pad_token_id, torch.device("cpu")
    )
    metrics = update_policy(
        ctx, cfg, [trajectories[i] for i in mine], [advantages[i] for i in mine]
    )
    if state.is_main_process:
        torch.save(
            {"params": model.state_dict(), "metrics": metrics, "world": state.num_processes}, out
        )
    state.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:4])
