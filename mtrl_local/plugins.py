"""Names → objects, at the edge: where ``mtrl``, recipes and other clients resolve a name.

The library's engine, trainer and evaluation are handed objects (a task, a reward function, a
model directory) and never look anything up. This module is what turns the names a person types
into those objects:

* **tasks**: a name in the ``mtrl_local.tasks`` entry-point group (the bundled suite registers
  its tasks in ``pyproject.toml``; any installed package can add its own), or
  ``package.module:Attr`` — a task class (instantiated), a function returning a task, or a task;
* **models**: a name in the ``mtrl_local.models`` group (``default``, the embedded model, whose
  entry point returns its directory and builds it on first use), or a local model directory;
* **rewards**: ``package.module:function``;
* **agents** (``mtrl train --agent-cmd``): ``package.module:function``, or a command line;
* **commands**: the ``mtrl_local.commands`` group adds subcommands to ``mtrl`` (the dashboard).

Every mistake is one :class:`UserError` line naming what was asked for.
"""

from __future__ import annotations

import functools
import importlib
import os
import shlex
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, cast

from mtrl_local.errors import UserError
from mtrl_local.model_files import check_model_files
from mtrl_local.scoring import RewardFn
from mtrl_local.task import Task

TASK_GROUP = "mtrl_local.tasks"
MODEL_GROUP = "mtrl_local.models"
COMMAND_GROUP = "mtrl_local.commands"


def load_object(
    spec: str, what: str, kind: str = "attribute", example: str = "package.module:name"
) -> Any:
    """The ``kind`` (attribute, function, class…) named by ``package.module:name``; ``what``
    names it in errors."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"{what} '{spec}': expected module:{kind}, e.g. {example}")
    try:
        module = _import_from_here(module_name)
    except ImportError as exc:
        raise UserError(f"{what} '{spec}': cannot import module '{module_name}' ({exc})") from None
    except (Exception, SystemExit) as exc:  # the module breaks (or exits): the user's file
        why = f"{type(exc).__name__}: {exc}"
        raise UserError(f"{what} '{spec}': importing '{module_name}' failed ({why})") from None
    if not hasattr(module, attr):
        raise UserError(f"{what} '{spec}': module '{module_name}' has no {kind} '{attr}'")
    return getattr(module, attr)


def _import_from_here(module_name: str) -> Any:
    """Import ``module_name``, also from the current directory when nothing installed has it.

    ``module:function`` usually names the user's own file, as with ``python -m``; the ``mtrl``
    console script does not put the current directory on ``sys.path``, and adding it for good
    would let any file there (a ``datasets.py``) shadow a library imported later.
    """
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        if exc.name != module_name.partition(".")[0] or here in sys.path or "" in sys.path:
            raise
        sys.path.insert(0, here)
        try:
            return importlib.import_module(module_name)
        finally:
            sys.path.remove(here)


def _group(name: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=name)}


def _load_entry_point(ep: EntryPoint, what: str) -> Any:
    try:
        return ep.load()
    except Exception as exc:
        why = f"its entry point {ep.value} failed to load ({exc})"
        raise UserError(f"{what} '{ep.name}': {why}") from None


# -- tasks -----------------------------------------------------------------------------------------
def task_names() -> list[str]:
    """The registered task names, sorted."""
    return sorted(_group(TASK_GROUP))


@functools.cache
def load_task(name: str) -> Task:
    """The task called ``name`` (one instance per name and process: its cases are made once)."""
    registered = _group(TASK_GROUP)
    if name in registered:
        target = _load_entry_point(registered[name], "task")
    elif ":" in name:
        target = load_object(name, "task")
    else:
        known = ", ".join(sorted(registered)) or "none installed"
        raise UserError(f"unknown task '{name}' (known tasks: {known})")
    task = target() if callable(target) else target
    if not all(hasattr(task, m) for m in ("name", "make_env", "cases", "max_turns")):
        raise UserError(f"task '{name}': {type(task).__name__} is not a task (see mtrl_local.task)")
    return cast(Task, task)


# -- rewards ---------------------------------------------------------------------------------------
def load_reward(spec: str) -> RewardFn:
    """The reward function named ``package.module:function``."""
    fn = load_object(spec, "reward", "function", example="rewards.dense:dense_reward")
    if not callable(fn):
        raise UserError(f"reward '{spec}' is not a function")
    return cast(RewardFn, fn)


# -- models ----------------------------------------------------------------------------------------
def model_names() -> list[str]:
    """The registered model names (``default``: the embedded model), sorted."""
    return sorted(_group(MODEL_GROUP))


def check_model(spec: str | Path) -> str:
    """``spec`` if it names a model (a registered name or a model directory), else a UserError.

    Cheap on purpose (nothing is loaded or built): the CLI calls it first, so a typo is one
    line, not a traceback after minutes of loading.
    """
    if str(spec) in _group(MODEL_GROUP):
        return str(spec)
    if not Path(spec).exists():
        raise UserError(f"model '{spec}': no such directory (registered: {_known_models()})")
    return str(check_model_dir(spec))


def resolve_model(spec: str | Path, progress: bool = True) -> Path:
    """The directory of the model ``spec`` names (a registered model is built on first use)."""
    name = check_model(spec)
    registered = _group(MODEL_GROUP)
    if name not in registered:
        return Path(name)
    locate = _load_entry_point(registered[name], "model")
    return Path(locate(progress=progress))


def check_model_dir(path: str | Path) -> Path:
    """``path`` if it is a model directory: a readable ``config.json`` (or a LoRA
    ``adapter_config.json``), a tokenizer and whole weights (see :mod:`mtrl_local.model_files`)."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"model '{path}': no such directory")
    check_model_files(p)
    return p


def _known_models() -> str:
    return ", ".join(model_names()) or "none"


# -- agents ----------------------------------------------------------------------------------------
def resolve_agent(agent: str | Callable[..., Any]) -> list[str] | Callable[..., Any]:
    """``package.module:function`` → that function; anything else is a command line."""
    if callable(agent):
        return agent
    module, sep, _ = agent.partition(":")
    if sep and " " not in agent and "/" not in module and not module.endswith(".py"):
        fn = load_object(agent, "agent", "function")
        if not callable(fn):
            raise UserError(f"agent '{agent}' is not callable")
        return cast(Callable[..., Any], fn)
    argv = shlex.split(agent)
    if not argv:
        raise UserError("agent command is empty")
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable  # the trainer's interpreter: same venv, same packages
    return argv


# -- commands --------------------------------------------------------------------------------------
def command_plugins() -> list[EntryPoint]:
    """Entry points that add subcommands to ``mtrl``: each is ``register(subparsers)``."""
    return sorted(entry_points(group=COMMAND_GROUP), key=lambda ep: ep.name)
