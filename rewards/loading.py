"""Load a reward function named ``module:function`` (e.g. ``rewards.dense:dense_reward``)."""

from __future__ import annotations

import importlib
from typing import cast

from mtrl_local.errors import UserError
from rewards.types import RewardFn


def load_reward(spec: str) -> RewardFn:
    """Import ``module:function``; a :class:`UserError` with one clear line if that fails."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(
            f"reward '{spec}': expected module:function, e.g. rewards.dense:dense_reward"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"reward '{spec}': cannot import module '{module_name}' ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"reward '{spec}': module '{module_name}' has no function '{attr}'")
    return cast(RewardFn, fn)
