"""Training state as JSON plus safetensors: nothing a checkpoint holds can run code when read.

Optimizer, scheduler and RNG states are nested dicts, lists and tuples of numbers, strings and
tensors. :func:`encode` splits such a tree into a JSON document and a flat ``{name: tensor}``
dict (written with safetensors); :func:`decode` puts it back together exactly. Pickle, which
``torch.save`` uses, rebuilds arbitrary objects and so runs whatever a crafted file asks for;
these two formats hold only data.

The JSON keeps what plain JSON would lose: every container is tagged (``{"dict": [[key, value],
…]}``, ``{"list": […]}``, ``{"tuple": […]}``), so integer dict keys stay integers and tuples stay
tuples; a tensor is ``{"tensor": name}``. Numbers, strings, booleans and ``None`` are bare (JSON
writes floats with enough digits to read back the same value, ``NaN`` and infinities included).
"""

from __future__ import annotations

from typing import Any

import torch

Tree = Any
_SCALARS = (bool, int, float, str, type(None))


def encode(tree: Tree) -> tuple[Tree, dict[str, torch.Tensor]]:
    """``tree`` as a JSON-ready document and the tensors it refers to (on the CPU)."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(tree, tensors, "state"), tensors


def _encode(node: Tree, tensors: dict[str, torch.Tensor], where: str) -> Tree:
    if isinstance(node, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = node.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(node, _SCALARS):
        return node
    if isinstance(node, dict):
        items = [
            [_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
            for k, v in node.items()
        ]
        return {"dict": items}
    if isinstance(node, list | tuple):
        kind = "tuple" if isinstance(node, tuple) else "list"
        return {kind: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(node)]}
    raise TypeError(f"{where}: cannot store a {type(node).__name__} in a checkpoint")


def decode(document: Tree, tensors: dict[str, torch.Tensor]) -> Tree:
    """Inverse of :func:`encode`; ``ValueError`` for a document :func:`encode` cannot write."""
    if isinstance(document, _SCALARS):
        return document
    if not isinstance(document, dict) or len(document) != 1:
        raise ValueError(f"not an encoded value: {str(document)[:60]}")
    [(kind, body)] = document.items()
    if kind == "tensor":
        if body not in tensors:
            raise ValueError(f"tensor {body!r} is not in the checkpoint")
        return tensors[body]
    if kind == "dict" and isinstance(body, list):
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in _pairs(body)}
    if kind in ("list", "tuple") and isinstance(body, list):
        values = [decode(v, tensors) for v in body]
        return tuple(values) if kind == "tuple" else values
    raise ValueError(f"not an encoded value: {str(document)[:60]}")


def _pairs(body: list[Any]) -> list[tuple[Any, Any]]:
    if not all(isinstance(p, list) and len(p) == 2 for p in body):
        raise ValueError("a dict's items must be [key, value] pairs")
    return [(p[0], p[1]) for p in body]


def _hashable(key: Any) -> Any:
    if isinstance(key, list | dict | torch.Tensor):
        raise ValueError(f"a dict key must be a number, string or tuple, not {key!r}")
    return key


__all__ = ["decode", "encode"]
