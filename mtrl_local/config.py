"""The trainer's configuration: one dataclass, recipes in TOML, command-line overrides.

Names follow TRL where TRL has one (``num_generations``, ``per_device_train_batch_size``,
``loss_type``, ``epsilon``, ``epsilon_high``, ``beta``, ``learning_rate``, ``max_grad_norm``);
the multi-turn knobs follow DESIGN.md (``advantage_method``, ``max_turns``,
``sampling_max_tokens``, ``val_sampling_params``, ``async_config.max_steps_off_policy``,
``lora_rank``, ``lora_alpha``, ``success_threshold``, ``eval_steps``, ``save_steps``).

Precedence: dataclass defaults < recipe file (``recipes/*.toml``) < command-line flags. Every
mistake (unknown key, wrong type, value outside its choices) is a :class:`UserError` naming the
file or flag and the field.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from mtrl_local.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LossType = Literal["ppo", "cispo", "is"]
AdvantageMethod = Literal["group_based", "rloo", "grpo_passk", "group_based_per_turn"]
Aggregation = Literal["token_mean", "seq_mean_token_mean"]


@dataclass
class SamplingConfig:
    """How a split is sampled (rollouts or evaluation)."""

    temperature: float = 1.0
    """Sampling temperature; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    sampling_max_tokens: int = 96
    """Per-turn token budget; a turn that reaches it ends with finish reason ``length``."""
    n_samples: int = 1
    """Samples per case (pass@k is computed for k ∈ {1, n_samples})."""


@dataclass
class AsyncConfig:
    """Rollouts produced by a background worker while the trainer updates (DESIGN.md §7)."""

    max_steps_off_policy: int = 0
    """A rollout of policy version v is used at step s only if s − v ≤ this; 0 = synchronous."""


@dataclass
class MultiTurnRLConfig:
    """Everything one training run needs; logged whole with the run."""

    # -- what to train ----------------------------------------------------------------------
    task: str = "aircraft_inspection"
    """Task from the suite (``mtrl tasks``)."""
    model: str = "default"
    """``default`` (the embedded model, built on first use) or a local HF model directory."""
    reward: str = "rewards.dense:dense_reward"
    """Training reward as ``module:function`` (audited with ``make audit``)."""
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
    """Trajectories per optimizer step (a multiple of ``num_generations``)."""
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
    val_sampling_params: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.0, n_samples=1)
    )
    """Sampling for the periodic validation evaluation."""
    async_config: AsyncConfig = field(default_factory=AsyncConfig)
    """Bounded-staleness asynchronous rollouts."""

    # -- objective ------------------------------------------------------------------------------
    advantage_method: AdvantageMethod = "group_based"
    """Advantage estimator (DESIGN.md §5)."""
    scale_rewards: Literal["group", "none"] = "group"
    """``group``: divide by the group std (GRPO); ``none``: do not (Dr. GRPO)."""
    pass_k: int = 4
    """k of ``grpo_passk``."""
    success_threshold: float = 1.0
    """A trajectory with reward ≥ this counts as a success (pass@k, grpo_passk)."""
    loss_type: LossType = "ppo"
    """Policy loss (DESIGN.md §6)."""
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
    lora_target_modules: list[str] = field(
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

    def __post_init__(self) -> None:
        check_config(self)

    @property
    def epsilon_low(self) -> float:
        """ε_low actually used: the field, or the loss's recipe default (DESIGN.md §6)."""
        return LOSS_EPSILONS[self.loss_type][0] if self.epsilon is None else self.epsilon

    @property
    def resolved_epsilon_high(self) -> float:
        """ε_high actually used: the field, or the loss's recipe default (DESIGN.md §6)."""
        if self.epsilon_high is not None:
            return self.epsilon_high
        return LOSS_EPSILONS[self.loss_type][1]

    @property
    def prompts_per_step(self) -> int:
        return self.per_device_train_batch_size // self.num_generations

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Recipe defaults (ε_low, ε_high) per loss: PPO's ratio in 0.8–1.2; CISPO wide and asymmetric.
LOSS_EPSILONS: dict[str, tuple[float, float]] = {
    "ppo": (0.2, 0.2),
    "cispo": (1.0, 6.0),
    "is": (0.2, 0.2),
}

#: Accepted spellings → canonical field (TRL vs DESIGN names).
ALIASES = {"group_size": "num_generations", "batch_size": "per_device_train_batch_size"}


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


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` converted to type ``tp`` (from TOML or a command-line string), or a UserError."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = get_args(tp)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in members:
            return None
        for member in members:
            if member is type(None):
                continue
            try:
                return _coerce(value, member, where)
            except UserError:
                continue
        raise UserError(f"{where} must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise UserError(f"{where} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"{where} must be a list, got {value!r}")
        (item,) = get_args(tp)
        return [_coerce(v, item, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"{where} must be an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise UserError(f"{where} must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where} must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where} must be a string, got {value!r}")
        return value
    raise UserError(f"{where}: unsupported type {tp!r}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(target: dict[str, Any], cls: type, values: Mapping[str, Any], source: str) -> None:
    """Merge ``values`` (possibly nested) into the kwargs dict ``target`` for dataclass ``cls``."""
    hints = _hints(cls)
    names = {f.name for f in fields(cls)}
    for raw_key, value in values.items():
        key = ALIASES.get(raw_key, raw_key)
        if key not in names:
            raise UserError(f"{source}: unknown field '{raw_key}'")
        tp = hints[key]
        where = f"{source}: field '{raw_key}'"
        if _is_dataclass_type(tp):
            if not isinstance(value, Mapping):
                raise UserError(f"{where} must be a table of {', '.join(_field_names(tp))}")
            sub = dict(target.get(key) or {})
            _apply(sub, tp, value, f"{source}: {key}")
            target[key] = sub
        else:
            target[key] = _coerce(value, tp, where)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_names(cls: Any) -> list[str]:
    return [f.name for f in fields(cls)]


def _build(cls: type, kwargs: Mapping[str, Any]) -> Any:
    """Instantiate ``cls``; a nested table updates that field's *default*, not a blank instance."""
    hints = _hints(cls)
    defaults = {f.name: f for f in fields(cls)}
    built = {}
    for key, value in kwargs.items():
        tp = hints[key]
        if _is_dataclass_type(tp):
            f = defaults[key]
            base = f.default_factory() if f.default_factory is not dataclasses.MISSING else tp()
            built[key] = dataclasses.replace(base, **value)
        else:
            built[key] = value
    return cls(**built)


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
    kwargs: dict[str, Any] = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise UserError(f"{recipe}: no such recipe file")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{recipe}: not valid TOML ({exc})") from None
        _apply(kwargs, MultiTurnRLConfig, data, str(recipe))
    if overrides:
        _apply(kwargs, MultiTurnRLConfig, overrides, "command line")
    return typing.cast(MultiTurnRLConfig, _build(MultiTurnRLConfig, kwargs))


def field_docs(cls: type = MultiTurnRLConfig) -> dict[str, str]:
    """Field → its docstring (the string literal under it), for ``--help`` and the README."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
