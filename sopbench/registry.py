"""The task registry: ``register`` a :class:`~sopbench.base.Task` subclass, ``get_task`` by name."""

from __future__ import annotations

import importlib

from mtrl_local.errors import UserError
from sopbench.base import Task

#: Modules of the bundled suite, imported on first use of the registry.
BUILTIN_TASKS = ("aircraft_inspection", "customer_service", "inventory_reconciliation")

_REGISTRY: dict[str, type[Task]] = {}
_INSTANCES: dict[str, Task] = {}
_loaded = False


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available as ``get_task(cls.name)``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"task '{cls.name}' is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTIN_TASKS:
        importlib.import_module(f"sopbench.{name}")


def task_names() -> list[str]:
    """Registered task names, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_task(name: str) -> Task:
    """The (cached) task instance called ``name``; a :class:`UserError` listing the known ones."""
    _load_builtins()
    if name not in _REGISTRY:
        known = ", ".join(task_names()) or "none"
        raise UserError(f"unknown task '{name}' (known tasks: {known})")
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name]()
    return _INSTANCES[name]
