"""Tools as typed Python callables: JSON schema from the signature, checked dispatch.

A tool is any callable with type-hinted parameters and a docstring. The first paragraph of the
docstring is the tool's description; a Google-style ``Args:`` section gives per-argument
descriptions. Everything a model can get wrong about a call (unknown tool, arguments that are not a
JSON object, a missing / extra / mistyped argument, a tool that raises) becomes a short,
deterministic error string for the agent — never an exception out of the rollout.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

JSONDict = dict[str, Any]

_PY_TO_JSON: dict[type, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    dict: "object",
}


class ToolArgumentError(ValueError):
    """A call's arguments do not fit the tool's signature; the message goes to the agent."""


def _json_schema_for(annotation: Any) -> JSONDict:
    """JSON schema of one type hint (str/int/float/bool, list[...], dict, Literal, Optional)."""
    origin = get_origin(annotation)
    if annotation in _PY_TO_JSON:
        return {"type": _PY_TO_JSON[annotation]}
    if origin is Literal:
        values = list(get_args(annotation))
        schema = _json_schema_for(type(values[0]))
        schema["enum"] = values
        return schema
    if origin in (list, tuple, typing.List):  # noqa: UP006
        args = get_args(annotation)
        schema = {"type": "array"}
        if args:
            schema["items"] = _json_schema_for(args[0])
        return schema
    if origin in (dict, typing.Dict):  # noqa: UP006
        return {"type": "object"}
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _json_schema_for(members[0])
        return {"anyOf": [_json_schema_for(m) for m in members]}
    raise TypeError(f"unsupported tool parameter type: {annotation!r}")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Split a docstring into (description, {arg: description}) — Google style ``Args:``."""
    doc = inspect.cleandoc(doc or "")
    parts = re.split(r"\n\s*Args:\s*\n", doc, maxsplit=1)
    description = " ".join(parts[0].split("\n\n")[0].split())
    arg_docs: dict[str, str] = {}
    if len(parts) == 2:
        current = None
        for line in parts[1].splitlines():
            if re.match(r"^\S", line) and line.strip().endswith(":"):
                break  # next section (Returns:, Raises:)
            m = re.match(r"^\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
            if m:
                current = m.group(1)
                arg_docs[current] = m.group(2).strip()
            elif current and line.strip():
                arg_docs[current] += " " + line.strip()
    return description, arg_docs


def _type_name(schema: JSONDict) -> str:
    if "anyOf" in schema:
        return " or ".join(_type_name(s) for s in schema["anyOf"])
    return str(schema.get("type", "value"))


def _json_type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _matches(value: Any, schema: JSONDict) -> bool:
    if "anyOf" in schema:
        return any(_matches(value, s) for s in schema["anyOf"])
    kind = schema.get("type")
    actual = _json_type_of(value)
    ok = actual in ("integer", "number") if kind == "number" else actual == kind
    if ok and "enum" in schema:
        ok = value in schema["enum"]
    if ok and kind == "array" and "items" in schema:
        ok = all(_matches(v, schema["items"]) for v in value)
    return ok


@dataclass
class Tool:
    """A callable plus the JSON schema the model sees.

    Build with :meth:`from_callable`; call with :meth:`invoke`, which validates first.
    """

    name: str
    description: str
    parameters: JSONDict
    fn: Callable[..., Any]
    _optional: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_callable(cls, fn: Callable[..., Any], name: str | None = None) -> Tool:
        """Derive name, description and parameter schema from ``fn``'s signature and docstring."""
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
        description, arg_docs = _parse_docstring(fn.__doc__ or "")
        if not description:
            raise TypeError(f"tool {fn.__name__!r} needs a docstring: it is the tool description")
        properties: dict[str, JSONDict] = {}
        required: list[str] = []
        optional: set[str] = set()
        for pname, param in sig.parameters.items():
            if pname == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if pname not in hints:
                raise TypeError(f"tool {fn.__name__!r}: parameter {pname!r} needs a type hint")
            schema = _json_schema_for(hints[pname])
            if pname in arg_docs:
                schema["description"] = arg_docs[pname]
            properties[pname] = schema
            if param.default is inspect.Parameter.empty:
                required.append(pname)
            else:
                optional.add(pname)
        parameters: JSONDict = {"type": "object", "properties": properties, "required": required}
        return cls(
            name=name or fn.__name__,
            description=description,
            parameters=parameters,
            fn=fn,
            _optional=frozenset(optional),
        )

    def schema(self) -> JSONDict:
        """OpenAI-style function schema (what chat templates render in the system turn)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    def check_arguments(self, arguments: Any) -> None:
        """Raise :class:`ToolArgumentError` with a one-line message if ``arguments`` do not fit."""
        if not isinstance(arguments, Mapping):
            raise ToolArgumentError(
                f"arguments for {self.name} must be a JSON object, got {_json_type_of(arguments)}"
            )
        props = self.parameters["properties"]
        for key in arguments:
            if key not in props:
                raise ToolArgumentError(f"unexpected argument '{key}' for {self.name}")
        for key in self.parameters["required"]:
            if key not in arguments:
                raise ToolArgumentError(f"missing argument '{key}' for {self.name}")
        for key, value in arguments.items():
            schema = props[key]
            if not _matches(value, schema):
                if "enum" in schema and _json_type_of(value) == schema.get("type"):
                    allowed = ", ".join(json.dumps(v) for v in schema["enum"])
                    raise ToolArgumentError(
                        f"argument '{key}' for {self.name} must be one of {allowed}"
                    )
                raise ToolArgumentError(
                    f"argument '{key}' for {self.name} must be {_type_name(schema)}, "
                    f"got {_json_type_of(value)}"
                )

    def invoke(self, arguments: Any) -> Any:
        """Validate then call. Validation errors raise :class:`ToolArgumentError`."""
        self.check_arguments(arguments)
        return self.fn(**arguments)


def tool(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a method of an :class:`~mtrl_local.env.Environment` as a tool exposed to the agent."""
    fn.__mtrl_tool__ = True  # type: ignore[attr-defined]
    return fn
