"""Our losses against TRL 1.16's own ``GRPOTrainer._compute_loss`` on random inputs (float64).

``_compute_loss`` is called on a stand-in for the trainer that holds only the attributes the loss
reads; the model forward is replaced by the random logprobs, so TRL's own arithmetic (ratios,
clip, KL, aggregation, entropy bonus) is what we compare with. Where TRL has the same option:
GSPO (``importance_sampling_level="sequence"``) under ``grpo`` (= our ``seq_mean_token_mean``) and
``dapo`` (= our ``token_mean``), ``dr_grpo``, ``cispo`` (its ``epsilon_high`` is the cap on the
weight, which ours now is too), the k3 KL term (TRL's without its bias correction, which we do
not apply) and the entropy bonus. TRL has no k1/k2 and computes its vLLM IS weights elsewhere.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from trl import GRPOTrainer

from mtrl_local.losses import policy_loss

B, T, L = 4, 7, 9  # sequences, completion width, TRL's max_completion_length


def _inputs(seed: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(zlib.crc32(seed.encode()))
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    mask = (torch.rand(B, T, generator=gen) > 0.3).double()
    mask[:, 0] = 1.0  # every sequence has a loss token (TRL's grpo averages over all rows)
    return {
        "logp": logp,
        "old": logp + 0.15 * torch.randn(B, T, generator=gen, dtype=torch.float64),
        "ref": logp + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64),
        "entropy": torch.rand(B, T, generator=gen, dtype=torch.float64) * 2,
        "adv": torch.randn(B, generator=gen, dtype=torch.float64),
        "mask": mask,
    }


def _trl_loss(x: dict[str, torch.Tensor], logp: torch.Tensor, entropy: torch.Tensor, **opts: Any):
    """TRL's loss on ``x``, its trainer reduced to what ``_compute_loss`` reads."""
    args = SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1)
    accelerator = SimpleNamespace(
        num_processes=1,
        sync_gradients=True,
        gather=lambda t: t,
        gather_for_metrics=lambda t: t,
        reduce=lambda t, reduction: t,
    )
    stand_in = SimpleNamespace(
        args=args,
        accelerator=accelerator,
        model=SimpleNamespace(training=True),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, entropy, None),
        _metrics=defaultdict(lambda: defaultdict(list)),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        current_gradient_accumulation_steps=1,
        max_completion_length=L,
        use_adaptive_entropy=False,
        importance_sampling_level=opts.get("level", "token"),
        loss_type=opts["loss_type"],
        epsilon_low=opts.get("epsilon_low", 0.2),
        epsilon_high=opts.get("epsilon_high", 0.2),
        beta=opts.get("beta", 0.0),
        entropy_coef=opts.get("entropy_coef", 0.0),
        _entropy_bonus_enabled=opts.get("entropy_coef", 0.0) != 0.0,
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 0, dtype=torch.long),
        "prompt_mask": torch.zeros(B, 0, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": x["mask"],
        "advantages": x["adv"],
        "old_per_token_logps": x["old"],
        "ref_per_token_logps": x["ref"],
        "num_items_in_batch": x["mask"].sum(),
    }
    return GRPOTrainer._compute_loss(stand_in, None, inputs)  # type: ignore[arg-type]


CASES = {
    # name: (TRL options, our options)
    "gspo-seq-mean": (
        {"loss_type": "grpo", "level": "sequence", "epsilon_low": 0.05, "epsilon_high": 0.08},
        {
            "importance_sampling_level": "sequence",
            "aggregation": "seq_mean_token_mean",
            "epsilon_low": 0.05,
            "epsilon_high": 0.08,
        },
    ),
    "gspo-token-mean": (
        {"loss_type": "dapo", "level": "sequence", "epsilon_low": 0.05, "epsilon_high": 0.08},
        {"importance_sampling_level": "sequence", "epsilon_low": 0.05, "epsilon_high": 0.08},
    ),
    "dr-grpo": (
        {"loss_type": "dr_grpo"},
        {"aggregation": "dr_grpo", "num_sequences": B, "max_tokens": L},
    ),
    "cispo-cap": (
        {"loss_type": "cispo", "epsilon_high": 1.1},
        {"name": "cispo", "epsilon_low": 1.0, "epsilon_high": 1.1},
    ),
    "k3-kl": (
        {"loss_type": "dapo", "beta": 0.04},
        {"beta": 0.04, "kl_estimator": "k3"},
    ),
    "entropy-bonus": (
        {"loss_type": "dapo", "entropy_coef": 0.05},
        {"entropy_coef": 0.05},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_loss_and_gradient_as_trl(case: str) -> None:
    trl_opts, ours = CASES[case]
    x = _inputs(case)
    results = []
    for side in ("ours", "trl"):
        logp = x["logp"].clone().requires_grad_()
        entropy = x["entropy"].clone().requires_grad_()
        if side == "trl":
            loss = _trl_loss(x, logp, entropy, **trl_opts)
        else:
            opts = dict(ours)
            name = str(opts.pop("name", "ppo"))
            adv = x["adv"][:, None].expand(B, T)  # one advantage per sequence, on its tokens
            loss, _ = policy_loss(
                name, logp, x["old"], adv, x["mask"], ref_logprobs=x["ref"], entropy=entropy, **opts
            )
        grads = torch.autograd.grad(loss, (logp, entropy), allow_unused=True)
        results.append(
            (loss.detach(), *(torch.zeros_like(logp) if g is None else g for g in grads))
        )
    for ours_t, trl_t, what in zip(*results, ("loss", "d/dlogp", "d/dentropy"), strict=True):
        torch.testing.assert_close(ours_t, trl_t, rtol=0, atol=1e-12, msg=f"{case}: {what}")
    # The comparison is not vacuous: the policy term has a gradient.
    assert results[0][1].abs().sum() > 1e-3
