"""``make base-model``: build the embedded default model into ``--out`` or the cache.

.venv/bin/python -m sopbench.default_model [--out DIR] [--seed N] [--cache-dir DIR] [--force]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from sopbench.default_model.build import build_default_model
from sopbench.default_model.cache import default_model_path
from sopbench.default_model.spec import DefaultModelSpec

logger = logging.getLogger(__name__)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sopbench.default_model",
        description="Build the embedded default model (tokenizer + tiny decoder + warm start).",
    )
    p.add_argument("--out", type=Path, help="build into this directory instead of the cache")
    p.add_argument("--seed", type=int, default=DefaultModelSpec.seed, help="build seed")
    p.add_argument("--cache-dir", type=Path, help="cache root (default $MTRL_CACHE or ~/.cache)")
    p.add_argument(
        "--force",
        action="store_true",
        help="build from scratch even if a cached or shipped build exists",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a DefaultModelSpec field (experiments; changes the cache key)",
    )
    return p.parse_args(argv)


def _spec_from_args(args: argparse.Namespace) -> DefaultModelSpec:
    spec = DefaultModelSpec(seed=args.seed)
    types = {f.name: f.type for f in dataclasses.fields(spec)}
    overrides: dict[str, Any] = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in types:
            raise SystemExit(f"unknown spec field '{name}'")
        overrides[name] = json.loads(value)
        if name == "task_mix":
            overrides[name] = tuple(tuple(x) for x in overrides[name])
    return dataclasses.replace(spec, **overrides)


def main(argv: list[str] | None = None) -> int:
    """``make base-model``: build into ``--out`` or the cache; prints nothing but the path."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = _parse_args(argv)
    spec = _spec_from_args(args)
    if args.out is not None:
        if args.force and args.out.exists():
            shutil.rmtree(args.out)
        path = build_default_model(args.out, spec)
    else:
        path = default_model_path(args.cache_dir, build=True, spec=spec, force=args.force)
    logger.info("default model: %s", path)
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
