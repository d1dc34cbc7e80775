"""The trainer's configuration: pydantic models, TOML recipes, command-line overrides.

:class:`MultiTurnRLConfig` (with :class:`SamplingConfig` and :class:`AsyncConfig` nested in it)
holds everything one training run needs; names follow TRL where TRL has one, the multi-turn knobs
are described in docs/design.md, and the docstring under each field is its description
(``model_fields[name].description``). :func:`load_config` applies defaults < recipe file <
command-line ``KEY=VALUE`` overrides, merging tables key by key; strings from the command line
are converted to the field's type. Every mistake is one :class:`UserError` line naming the file
or the command line and the field.

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

from mtrl_local.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LossType = Literal["ppo", "cispo", "is"]
AdvantageMethod = Literal["group_based", "rloo", "grpo_passk", "group_based_per_turn"]
Aggregation = Literal["token_mean", "seq_mean_token_mean"]

#: Accepted spellings → canonical field (TRL names and the design's names).
ALIASES = {"group_size": "num_generations", "batch_size": "per_device_train_batch_size"}

_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_EXPECTED: dict[Any, str] = {bool: "true or false", int: "an integer", float: "a number"}


class _Model(BaseModel):
    """Unknown keys refused, field docstrings as descriptions, raw values converted."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

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

    temperature: float = 1.0
    """Sampling temperature; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    sampling_max_tokens: int = 96
    """Per-turn token budget; a turn that reaches it ends with finish reason ``length``."""
    n_samples: int = 1
    """Samples per case (pass@k is computed for k ∈ {1, n_samples})."""


class AsyncConfig(_Model):
    """Rollouts produced by a background worker while the trainer updates."""

    max_steps_off_policy: int = 0
    """A rollout of policy version v is used at step s only if s − v ≤ this; 0 = synchronous."""


class MultiTurnRLConfig(_Model):
    """Everything one training run needs; logged whole with the run."""

    # -- what to train: names, resolved by the CLI (mtrl_local.plugins); the trainer is handed
    # the objects and records these names with the run --------------------------------------
    task: str | None = None
    """Task name (``mtrl tasks`` lists them) or ``package.module:Task``; required by ``mtrl
    train``."""
    model: str = "default"
    """A registered model name (``default``: the embedded model) or a local HF model
    directory."""
    reward: str = "rewards.dense:dense_reward"
    """Training reward as ``package.module:function`` (audited with ``make audit``)."""
    output_dir: str = "runs"
    """Where run directories are created."""
    run_name: str | None = None
    """Run directory name; default ``<task>-<timestamp>``."""
    seed: int = 0
    """Seed for sampling, case order and initialisation."""

    # -- batch shape ----------------------------------------------------------------------------
    num_generations: int = 8
    """Group size G: rollouts per case (TRL name; alias ``group_size``)."""
    per_device_train_batch_size: int = 32
    """Trajectories per optimizer step (a multiple of ``num_generations``; alias ``batch_size``)."""
    micro_batch_tokens: int = 16384
    """Token budget of one forward/backward micro-batch (gradient accumulation within a step)."""
    micro_batch_rows: int = 0
    """Most sequences per micro-batch; 0 = 1 on CPU (a padded batch takes the masked attention
    path there: 24 aircraft-length sequences took 19 s in padded batches of 6, 11 s one by one),
    no limit on CUDA."""
    share_prefix: bool = True
    """Run the prompt a group's trajectories share through the model once per update and reuse
    its keys/values, with their gradient, for each trajectory (:mod:`mtrl_local.train.prefix`):
    the same gradient for far fewer tokens (off under FSDP)."""
    max_steps: int = 50
    """Optimizer steps."""

    # -- rollouts ------------------------------------------------------------------------------
    max_turns: int | None = None
    """Turn limit per episode; ``None`` → the task's ``ceil(1.5 × reference turns)``."""
    sampling_max_tokens: int = 96
    """Per-turn token budget during rollouts."""
    temperature: float = 1.0
    """Rollout sampling temperature."""
    top_p: float = 1.0
    """Rollout nucleus sampling mass."""
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
    pass_k: int = 4
    """k of ``grpo_passk``."""
    success_threshold: float = 1.0
    """A trajectory with reward ≥ this counts as a success (pass@k, grpo_passk)."""
    loss_type: LossType = "ppo"
    """Policy loss (docs/design.md)."""
    loss_aggregation: Aggregation = "token_mean"
    """How token losses are averaged."""
    epsilon: float | None = None
    """Lower clip range ε_low (ratio ≥ 1 − ε); ``None`` → the loss's default (ppo 0.2, cispo 1)."""
    epsilon_high: float | None = None
    """Upper clip range ε_high; ``None`` → the loss's default (ppo 0.2, cispo 6.0)."""
    is_cap: float = 2.0
    """Cap of the ratio in the ``is`` loss."""
    tis_cap: float | None = 2.0
    """Cap C of the truncated IS weight min(π_old/μ, C) between trainer and sampler; None = off."""
    beta: float = 0.0
    """KL (k3) coefficient to the reference model (the adapter disabled); 0 = no reference pass."""
    num_iterations: int = 1
    """Optimizer steps per batch (TRL's μ). 1: ``π_old`` is the policy itself, detached, so the
    clip acts only through the sampler/trainer gap (and staleness); > 1: ``π_old`` is frozen at
    the first pass and the later steps on the same batch are clipped against it (PPO epochs)."""

    # -- optimiser ------------------------------------------------------------------------------
    learning_rate: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps, then constant."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""

    # -- model adaptation -------------------------------------------------------------------------
    lora_rank: int = 0
    """LoRA rank; 0 = full fine-tuning."""
    lora_alpha: int = 32
    """LoRA alpha (scaling = alpha / rank)."""
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    """Modules that get adapters."""
    load_in_4bit: bool = False
    """4-bit base weights (bitsandbytes; CUDA only)."""
    bf16: bool | None = None
    """bf16 autocast; ``None`` → on when CUDA is available."""
    fsdp: bool = False
    """Under ``accelerate launch`` with several processes: shard the parameters, gradients and
    optimizer state over them (PyTorch FSDP2) instead of replicating them, for a model whose
    training state does not fit one device; each process keeps a whole inference copy for
    sampling. Synchronous rollouts, no 4-bit weights."""

    # -- evaluation, checkpoints, logging -------------------------------------------------------
    eval_steps: int = 10
    """Strict evaluation on val every this many steps (0 = never during training)."""
    eval_cases: int | None = None
    """Limit the val cases evaluated during training (``None`` = all)."""
    save_steps: int = 10
    """Checkpoint every this many steps."""
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


#: Recipe defaults (ε_low, ε_high) per loss: PPO's ratio in 0.8–1.2; CISPO wide and asymmetric.
LOSS_EPSILONS: dict[str, tuple[float, float]] = {
    "ppo": (0.2, 0.2),
    "cispo": (1.0, 6.0),
    "is": (0.2, 0.2),
}


def check_config(cfg: MultiTurnRLConfig) -> None:
    """Cross-field rules; a :class:`UserError` naming the field."""
    if cfg.num_iterations < 1:
        raise UserError("config: num_iterations must be ≥ 1")
    if cfg.num_generations < 1:
        raise UserError("config: num_generations must be ≥ 1")
    if cfg.per_device_train_batch_size % cfg.num_generations:
        raise UserError(
            f"config: per_device_train_batch_size ({cfg.per_device_train_batch_size}) must be a "
            f"multiple of num_generations ({cfg.num_generations})"
        )
    if cfg.advantage_method == "grpo_passk" and not 1 <= cfg.pass_k <= cfg.num_generations:
        raise UserError("config: pass_k must be between 1 and num_generations")
    if cfg.micro_batch_rows < 0:
        raise UserError("config: micro_batch_rows must be ≥ 0 (0: automatic)")
    for name in ("sampling_max_tokens", "max_steps", "micro_batch_tokens"):
        if getattr(cfg, name) < 1:
            raise UserError(f"config: {name} must be ≥ 1")
    if cfg.async_config.max_steps_off_policy < 0:
        raise UserError("config: async_config.max_steps_off_policy must be ≥ 0")
    if cfg.lora_rank < 0:
        raise UserError("config: lora_rank must be ≥ 0 (0 = full fine-tuning)")
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
    except tomllib.TOMLDecodeError as exc:
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
        raise _user_error(exc, source, typed) from None


def _user_error(exc: ValidationError, source: str, typed: Mapping[str, str]) -> UserError:
    """The first error as one line naming ``source`` and the field as ``typed`` (alias or name)."""
    error = exc.errors()[0]
    loc = error["loc"]
    model: type[BaseModel] = MultiTurnRLConfig
    where = source
    for depth, part in enumerate(loc):
        field = model.model_fields.get(str(part))
        key = typed.get(str(part), str(part))
        if field is None:
            return UserError(f"{where}: unknown field '{key}'")
        nested = _model_class(field.annotation)
        if nested is None or depth == len(loc) - 1:
            expected = _expected(field.annotation)
            return UserError(f"{where}: field '{key}' must be {expected}, got {error['input']!r}")
        model, where = nested, f"{where}: {key}"
    return UserError(f"{where}: {error['msg']}")


def _model_class(tp: Any) -> type[BaseModel] | None:
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _expected(tp: Any) -> str:
    """What a field of type ``tp`` accepts, in words."""
    nested = _model_class(tp)
    if nested is not None:
        return "a table of " + ", ".join(nested.model_fields)
    args = get_args(tp)
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, args))
    if get_origin(tp) is list:
        return "a list of strings"
    if type(None) in args:
        (inner,) = (arg for arg in args if arg is not type(None))
        return f"{_expected(inner)} or none"
    return _EXPECTED.get(tp, "a string")
