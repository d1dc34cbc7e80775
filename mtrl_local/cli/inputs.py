"""The names on a model command's line, checked and resolved before any model library loads.

``mtrl eval``, ``baseline`` and ``train`` load torch and transformers, which takes seconds; every
name they are given (task, reward, model, agent, recipe and overrides) is checked here first, so
a mistake is one line at once. Registered models (``default``) are only checked by name here;
they are located (and built on first use) when the command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtrl_local.config import MultiTurnRLConfig, load_config, parse_overrides
from mtrl_local.errors import UserError
from mtrl_local.jsonl import read_json
from mtrl_local.plugins import check_model, load_reward, load_task, resolve_agent
from mtrl_local.run_dir import RunDir
from mtrl_local.scoring import RewardFn
from mtrl_local.task import Task


@dataclass(frozen=True)
class EvalInputs:
    """What ``mtrl eval`` and ``baseline`` evaluate: checked names and resolved objects."""

    task: Task
    reward_fn: RewardFn
    model: str
    base_model: str | None = None


@dataclass(frozen=True)
class TrainInputs:
    """What ``mtrl train`` runs: the config, where, and the objects its names stand for."""

    cfg: MultiTurnRLConfig
    run_dir: Path | None
    task: Task
    reward_fn: RewardFn
    agent: list[str] | Callable[..., Any] | None


def eval_inputs(args: argparse.Namespace) -> EvalInputs:
    base = getattr(args, "base_model", None)
    for model in (base, args.model):
        if model is not None:
            check_model(model)
    return EvalInputs(load_task(args.task), load_reward(args.reward), args.model, base)


def train_config(args: argparse.Namespace) -> tuple[MultiTurnRLConfig, Path | None]:
    """The run's config (recipe, then ``KEY=VALUE`` overrides, then flags; a resumed run's own
    config, then what the command line changes) and the run directory when resuming."""
    overrides = parse_overrides(args.overrides)
    for key in ("task", "model", "max_steps", "run_name", "output_dir"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if not args.resume:
        return load_config(args.recipe, overrides), None
    run = RunDir(Path(args.resume))
    if not run.config.is_file():
        raise UserError(f"{args.resume}: not a run directory (no {run.config.name})")
    saved = read_json(run.config)
    if not isinstance(saved, dict):
        raise UserError(f"{run.config}: expected a JSON object")
    saved.update(overrides)
    return load_config(None, saved), run.path


def train_inputs(args: argparse.Namespace) -> TrainInputs:
    cfg, run_dir = train_config(args)
    if not cfg.task:
        raise UserError("train: name a task (--task NAME, or task = … in the recipe)")
    check_model(cfg.model)
    agent = resolve_agent(args.agent_cmd) if args.agent_cmd else None
    return TrainInputs(cfg, run_dir, load_task(cfg.task), load_reward(cfg.reward), agent)


def resolve_inputs(args: argparse.Namespace) -> EvalInputs | TrainInputs:
    """The inputs of the model command ``args.command``."""
    return train_inputs(args) if args.command == "train" else eval_inputs(args)
