"""The trainer's configuration: pydantic models, TOML recipes, command-line overrides.

:class:`MultiTurnRLConfig` (with :class:`SamplingConfig` and :class:`AsyncConfig` nested in it)
holds everything one training run needs; names follow TRL where TRL has one, the multi-turn knobs
are described in docs/design.md, and the docstring under each field is its description
(``model_fields[name].description``). :func:`load_config` applies defaults < recipe file <
command-line ``KEY=VALUE`` overrides, merging tables key by key; strings from the command line
are converted to the field's type. Every field has a range (:mod:`mtrl_local.config_values`) and
:func:`check_config` ties fields together, so a config that loads is one the trainer can run; every
mistake is one :class:`UserError` line naming the file or the command line and the field.

Why pydantic: it is already a dependency through FastAPI, and the same models validate typed TOML
values and string overrides, with ``Literal`` choices, nested models, unknown keys forbidden and
attribute docstrings as field descriptions. cattrs would only structure the data, without these
checks; tyro builds a command line from a dataclass, but our recipes are TOML files plus
``KEY=VALUE`` overrides.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mtrl_local.config_values import (
    Cap,
    Count,
    DirectoryName,
    Fraction,
    NonEmptyStr,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    Seed,
    TopP,
    user_error,
)
from mtrl_local.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LossType = Literal["ppo", "cispo", "is"]
ChatFormatName = Literal["auto", "hermes", "tool_call_list", "llama3_json", "mistral"]
AdvantageMethod = Literal["group_based", "rloo", "grpo_passk", "group_based_per_turn"]
Aggregation = Literal["token_mean", "seq_mean_token_mean", "dr_grpo"]
ImportanceSamplingLevel = Literal["token", "sequence"]
KLEstimator = Literal["k1", "k2", "k3"]
ISCorrection = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]

#: Accepted spellings → canonical field (TRL names and the design's names).
ALIASES = {"group_size": "num_generations", "batch_size": "per_device_train_batch_size"}

_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class _Model(BaseModel):
    """Unknown keys refused, NaN and infinities refused, field docstrings as descriptions, raw
    values converted."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _convert(cls, value: Any, info: ValidationInfo) -> Any:
        """A TOML or command-line ``value`` in the form pydantic validates for the field."""
        field = cls.model_fields[str(info.field_name)]
        kinds = get_args(field.annotation) or (field.annotation,)
        if type(None) in kinds and isinstance(value, str) and value.lower() in ("none", "null"):
            return None
        if isinstance(value, Mapping):
            # A table updates the field's default (greedy validation sampling stays greedy).
            default = field.get_default(call_default_factory=True)
            return {**default.model_dump(), **value} if isinstance(default, BaseModel) else value
        if get_origin(field.annotation) is list and isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        if bool in kinds and value is not None and not isinstance(value, bool):
            flag = _BOOLS.get(value.strip().lower()) if isinstance(value, str) else None
            if flag is None:
                raise ValueError("not true or false")
            return flag
        if isinstance(value, bool) and bool not in kinds:
            raise ValueError("a bool is not accepted here")
        return value

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON-ready values, nested configs as dicts."""
        return self.model_dump()


class SamplingConfig(_Model):
    """How a split is sampled (rollouts or evaluation)."""

    temperature: NonNegativeFloat = 1.0
    """Sampling temperature; 0 is greedy."""
    top_p: TopP = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    sampling_max_tokens: Count = 96
    """Per-turn token budget; a turn that reaches it ends with finish reason ``length``."""
    n_samples: Count = 1
    """Samples per case (pass@k is computed for k ∈ {1, n_samples})."""


class AsyncConfig(_Model):
    """Rollouts produced by a background worker while the trainer updates."""

    max_steps_off_policy: NonNegativeInt = 0
    """A rollout of policy version v is used at step s only if s − v ≤ this; 0 = synchronous."""


class MultiTurnRLConfig(_Model):
    """Everything one training run needs; logged whole with the run."""

    # -- what to train: names, resolved by the CLI (mtrl_local.plugins); the trainer is handed
    # the objects and records these names with the run --------------------------------------
    task: str | None = None
    """Task name (``mtrl tasks`` lists them) or ``package.module:Task``; required by ``mtrl
    train``."""
    model: NonEmptyStr = "default"
    """A registered model name (``default``: the embedded model) or a local HF model
    directory."""
    reward: NonEmptyStr = "rewards.dense:dense_reward"
    """Training reward as ``package.module:function`` (audited with ``make audit``)."""
    output_dir: NonEmptyStr = "runs"
    """Where run directories are created."""
    run_name: DirectoryName | None = None
    """Run directory name (one path component, inside ``output_dir``); default
    ``<task>-<timestamp>``."""
    seed: Seed = 0
    """Seed for sampling, case order and initialisation, in [0, 2³² − 1]."""

    # -- batch shape ----------------------------------------------------------------------------
    num_generations: Count = 8
    """Group size G: rollouts per case (TRL name; alias ``group_size``)."""
    per_device_train_batch_size: Count = 32
    """Trajectories per optimizer step (a multiple of ``num_generations``; alias ``batch_size``)."""
    micro_batch_tokens: Count = 16384
    """Token budget of one forward/backward micro-batch (gradient accumulation within a step)."""
    micro_batch_rows: NonNegativeInt = 0
    """Most sequences per micro-batch; 0 = 1 on CPU (a padded batch takes the masked attention
    path there: 24 aircraft-length sequences took 19 s in padded batches of 6, 11 s one by one),
    no limit on CUDA."""
    share_prefix: bool = True
    """Run the prompt a group's trajectories share through the model once per update and reuse
    its keys/values, with their gradient, for each trajectory (:mod:`mtrl_local.train.prefix`):
    the same gradient for far fewer tokens (off under FSDP)."""
    max_steps: Count = 50
    """Optimizer steps."""

    # -- rollouts ------------------------------------------------------------------------------
    max_turns: Count | None = None
    """Turn limit per episode; ``None`` → the task's ``ceil(1.5 × reference turns)``."""
    sampling_max_tokens: Count = 96
    """Per-turn token budget during rollouts."""
    temperature: NonNegativeFloat = 1.0
    """Rollout sampling temperature."""
    top_p: TopP = 1.0
    """Rollout nucleus sampling mass, in (0, 1]."""
    tool_timeout_s: NonNegativeFloat | None = None
    """Seconds one tool call may run before the agent gets an error and the episode's environment
    is abandoned (0: tools run inline, no timeout); ``None`` keeps the environment's (30 s)."""
    max_tool_output_chars: Count | None = None
    """Longest tool result the agent sees (cut with a marker); ``None`` keeps the environment's."""
    chat_format: ChatFormatName = "auto"
    """How the model writes tool calls and gets results (:mod:`mtrl_local.chat_formats`):
    ``hermes``, ``tool_call_list``, ``llama3_json``, ``mistral``; ``auto`` reads it from the
    chat template (Mistral's or Llama 3's markers, else ``hermes``)."""
    val_sampling_params: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.0, n_samples=1)
    )
    """Sampling for the periodic validation evaluation."""
    async_config: AsyncConfig = Field(default_factory=AsyncConfig)
    """Bounded-staleness asynchronous rollouts."""

    # -- objective ------------------------------------------------------------------------------
    advantage_method: AdvantageMethod = "group_based"
    """Advantage estimator (docs/design.md)."""
    scale_rewards: Literal["group", "none"] = "group"
    """``group``: divide by the group std (GRPO); ``none``: do not (Dr. GRPO)."""
    pass_k: Count = 4
    """k of ``grpo_passk`` (at most ``num_generations``)."""
    success_threshold: float = 1.0
    """A trajectory with reward ≥ this counts as a success (pass@k, grpo_passk)."""
    loss_type: LossType = "ppo"
    """Policy loss (docs/design.md)."""
    loss_aggregation: Aggregation = "token_mean"
    """How token losses are averaged: ``token_mean`` (over every loss token of the step),
    ``seq_mean_token_mean`` (per sequence, then over sequences) or ``dr_grpo`` (summed, divided
    by the constant sequences × max_turns × sampling_max_tokens; Dr. GRPO, TRL's ``dr_grpo``)."""
    epsilon: Fraction | None = None
    """Lower clip range ε_low in [0, 1] (ratio ≥ 1 − ε); ``None`` → the loss's default (ppo 0.2,
    cispo 1)."""
    epsilon_high: NonNegativeFloat | None = None
    """ppo: upper clip range ε_high ≥ 0 (ratio ≤ 1 + ε_high); cispo: the cap on the IS
    weight itself (≥ 1), as in TRL; ``None`` → the loss's default (ppo 0.2, cispo 7.0)."""
    importance_sampling_level: ImportanceSamplingLevel = "token"
    """``token``: one ratio πθ/π_old per token; ``sequence``: GSPO's per-trajectory ratio (the
    geometric mean over its loss tokens), clipped whole (GSPO's ε are ~3e-4 / 4e-4)."""
    is_cap: Cap = 2.0
    """Cap (≥ 1) of the ratio in the ``is`` loss."""
    tis_cap: Cap | None = 2.0
    """Cap C ≥ 1 of the truncated IS weight min(π_old/μ, C) between trainer and sampler; None =
    off."""
    is_correction: ISCorrection = "token_truncate"
    """How ``tis_cap`` corrects the sampler/trainer gap ρ = π_old/μ: ``token_truncate``
    (min(ρ_t, C)), ``token_mask`` (tokens with ρ_t outside [1/C, C] get weight 0),
    ``sequence_truncate`` / ``sequence_mask`` (the same with the trajectory's geometric-mean ρ)."""
    beta: NonNegativeFloat = 0.0
    """KL coefficient to the reference model (the adapter disabled); 0 = no reference pass."""
    kl_estimator: KLEstimator = "k3"
    """Per-token KL estimator, δ = logπ_ref − logπθ: ``k1`` = −δ, ``k2`` = δ²/2, ``k3`` =
    exp(δ) − 1 − δ."""
    entropy_coef: NonNegativeFloat = 0.0
    """Entropy bonus: the loss minus this × the mean policy entropy over loss tokens; 0 = off."""
    num_iterations: Count = 1
    """Optimizer steps per batch (TRL's μ). 1: ``π_old`` is the policy itself, detached, so the
    clip acts only through the sampler/trainer gap (and staleness); > 1: ``π_old`` is frozen at
    the first pass and the later steps on the same batch are clipped against it (PPO epochs)."""
    mask_truncated: bool = False
    """Leave out of the loss the trajectories cut by the token budget (a turn that reached
    ``sampling_max_tokens``, or the context window): DAPO's overlong filtering."""
    dynamic_sampling: bool = False
    """Drop the groups whose advantages are all zero and sample more cases to fill the batch
    (DAPO's dynamic sampling), at most ``max_refill_rounds`` extra rounds per step."""
    max_refill_rounds: NonNegativeInt = 3
    """Bound on the extra rollout rounds of ``dynamic_sampling``; still short, the batch is
    topped up with dropped groups."""

    # -- optimiser ------------------------------------------------------------------------------
    learning_rate: PositiveFloat = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: NonNegativeFloat = 0.0
    """AdamW weight decay."""
    warmup_steps: NonNegativeInt = 0
    """Linear warm-up steps, then constant."""
    max_grad_norm: PositiveFloat = 1.0
    """Gradient clipping norm (> 0: the global gradient norm is scaled down to at most this)."""

    # -- model adaptation -------------------------------------------------------------------------
    lora_rank: NonNegativeInt = 0
    """LoRA rank; 0 = full fine-tuning."""
    lora_alpha: Count = 32
    """LoRA alpha (scaling = alpha / rank)."""
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    """Modules that get adapters (at least one when ``lora_rank > 0``)."""
    load_in_4bit: bool = False
    """4-bit base weights (bitsandbytes; CUDA only; frozen, so ``lora_rank > 0``)."""
    bf16: bool | None = None
    """bf16 autocast; ``None`` → on when CUDA is available."""
    fsdp: bool = False
    """Under ``accelerate launch`` with several processes: shard the parameters, gradients and
    optimizer state over them (PyTorch FSDP2) instead of replicating them, for a model whose
    training state does not fit one device; each process keeps a whole inference copy for
    sampling. Synchronous rollouts, no 4-bit weights."""

    # -- evaluation, checkpoints, logging -------------------------------------------------------
    eval_steps: NonNegativeInt = 10
    """Strict evaluation on val every this many steps (0 = never during training)."""
    eval_cases: Count | None = None
    """Limit the val cases evaluated during training (``None`` = all)."""
    test_cases: Count | None = None
    """Limit the test cases of the baseline and final evaluations (``None`` = all: the numbers to
    report; fewer for a quick look at a slow model)."""
    save_steps: NonNegativeInt = 10
    """Checkpoint every this many steps, and after the last (0 = never)."""
    mlflow: bool = True
    """Log to MLflow."""
    tracking_uri: str | None = None
    """MLflow tracking URI; ``None`` → a local store inside the run directory."""

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> MultiTurnRLConfig:
        if (info.context or {}).get("checks", True):
            check_config(self)
        return self

    @property
    def epsilon_low(self) -> float:
        """ε_low actually used: the field, or the loss's default in :data:`LOSS_EPSILONS`."""
        return LOSS_EPSILONS[self.loss_type][0] if self.epsilon is None else self.epsilon

    @property
    def resolved_epsilon_high(self) -> float:
        """ε_high actually used: the field, or the loss's default in :data:`LOSS_EPSILONS`."""
        if self.epsilon_high is not None:
            return self.epsilon_high
        return LOSS_EPSILONS[self.loss_type][1]

    @property
    def prompts_per_step(self) -> int:
        return self.per_device_train_batch_size // self.num_generations


#: Recipe defaults (ε_low, ε_high) per loss: PPO's ratio in 0.8–1.2; CISPO wide and asymmetric,
#: its ε_high being the cap on the weight (TRL's meaning): 7.0 = the 1 + 6.0 it was as a distance.
LOSS_EPSILONS: dict[str, tuple[float, float]] = {
    "ppo": (0.2, 0.2),
    "cispo": (1.0, 7.0),
    "is": (0.2, 0.2),
}


def check_config(cfg: MultiTurnRLConfig) -> None:
    """The rules between fields (each field's own range is in its type); a :class:`UserError`
    naming the fields."""
    if cfg.per_device_train_batch_size % cfg.num_generations:
        raise UserError(
            f"config: per_device_train_batch_size ({cfg.per_device_train_batch_size}) must be a "
            f"multiple of num_generations ({cfg.num_generations})"
        )
    if cfg.advantage_method == "grpo_passk" and cfg.pass_k > cfg.num_generations:
        raise UserError(
            f"config: pass_k ({cfg.pass_k}) must be between 1 and num_generations "
            f"({cfg.num_generations}) for grpo_passk"
        )
    if cfg.lora_rank > 0 and not all(cfg.lora_target_modules or [""]):
        raise UserError(
            "config: lora_rank > 0 needs lora_target_modules: at least one module name, none empty"
        )
    if cfg.load_in_4bit and cfg.lora_rank == 0:
        raise UserError("config: load_in_4bit needs lora_rank > 0 (4-bit weights are frozen)")
    if cfg.loss_type == "cispo" and cfg.resolved_epsilon_high < 1:
        raise UserError(
            f"config: epsilon_high ({cfg.epsilon_high}) is the cap on cispo's IS weight (TRL's "
            "meaning, not a distance from 1) and must be ≥ 1: below 1 it would shrink on-policy "
            "tokens too"
        )
    if cfg.fsdp and cfg.async_config.max_steps_off_policy > 0:
        raise UserError(
            "config: fsdp needs synchronous rollouts (async_config.max_steps_off_policy = 0)"
        )
    if cfg.fsdp and cfg.load_in_4bit:
        raise UserError("config: fsdp and load_in_4bit cannot be combined (no sharded 4-bit)")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["a=1", "async_config.max_steps_off_policy=1"]`` → a nested dict of strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"override '{pair}': expected key=value")
        node = out
        parts = key.strip().lstrip("-").replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value.strip()
    return out


def load_config(
    recipe: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> MultiTurnRLConfig:
    """Defaults, then the recipe file, then ``overrides`` (e.g. from the command line)."""
    sources: list[tuple[str, Mapping[str, Any]]] = []
    if recipe is not None:
        sources.append((str(recipe), _read_recipe(recipe)))
    if overrides:
        sources.append(("command line", overrides))
    merged: dict[str, Any] = {}
    for source, values in sources:
        typed = {ALIASES[key]: key for key in values if key in ALIASES}
        canonical = {ALIASES.get(key, key): value for key, value in values.items()}
        _validate(canonical, source, typed, checks=False)  # so that an error names its source
        merged = _merge(merged, canonical)
    return _validate(merged, "config", {}, checks=True)


def _read_recipe(recipe: str | Path) -> dict[str, Any]:
    path = Path(recipe)
    if not path.is_file():
        raise UserError(f"{recipe}: no such recipe file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{recipe}: not UTF-8 text ({exc.reason})") from None
    except ValueError as exc:  # TOMLDecodeError, or an integer beyond Python's digit limit
        raise UserError(f"{recipe}: not valid TOML ({exc})") from None


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``; tables present in both are merged key by key."""
    merged = dict(base)
    for key, value in extra.items():
        old = merged.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            value = _merge(old, value)
        merged[key] = value
    return merged


def _validate(
    values: Mapping[str, Any], source: str, typed: Mapping[str, str], *, checks: bool
) -> MultiTurnRLConfig:
    """``values`` as a config (cross-field rules only if ``checks``), or a UserError."""
    try:
        return MultiTurnRLConfig.model_validate(values, context={"checks": checks})
    except ValidationError as exc:
        raise user_error(exc, MultiTurnRLConfig, source, typed) from None
