"""What each config field accepts, and a refused value as one line naming the field and its rule.

The fields of :mod:`mtrl_local.config` are annotated with the types below, so pydantic refuses an
out-of-range value while a recipe or the command line is read — before a run directory exists and
before any model library loads. The models also set ``allow_inf_nan=False``: no float field takes
NaN or an infinity. A negative ``max_grad_norm`` would flip the sign of the clipped gradient
(gradient ascent) and a cap below 1 would shrink on-policy tokens too, so every range is the one
inside which the field means what its description says.

:func:`user_error` turns pydantic's first error into the :class:`UserError` a user sees, e.g.
``command line: field 'max_grad_norm' must be a finite number > 0, got '-1'``: the source, the
field as it was typed (alias or name), what the field accepts, and the value given.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import AfterValidator, BaseModel, Field, ValidationError
from pydantic.fields import FieldInfo

from mtrl_local.errors import UserError


class FieldRule(ValueError):
    """A value a field refuses; the message says what it accepts ("a directory name (…)")."""


def _directory_name(value: str) -> str:
    if value in ("", ".", "..") or "/" in value or "\\" in value:
        raise FieldRule("a directory name (not empty, no '/' or '\\', not '.' or '..')")
    return value


PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
#: Nucleus mass: 0 would leave no token to sample.
TopP = Annotated[float, Field(gt=0, le=1)]
#: An importance-weight cap: below 1 it would also shrink on-policy tokens (ratio 1).
Cap = Annotated[float, Field(ge=1)]
Count = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
#: The range every seeded generator takes (numpy's is the narrowest).
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
#: One path component: a run directory stays inside ``output_dir``.
DirectoryName = Annotated[str, AfterValidator(_directory_name)]

_EXPECTED: dict[Any, str] = {bool: "true or false", int: "an integer", float: "a finite number"}
_BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))


def user_error(
    exc: ValidationError, root: type[BaseModel], source: str, typed: Mapping[str, str]
) -> UserError:
    """The first error as one line naming ``source`` and the field as ``typed`` (alias or name)."""
    error = exc.errors()[0]
    loc = error["loc"]
    model, where = root, source
    for depth, part in enumerate(loc):
        field = model.model_fields.get(str(part))
        key = typed.get(str(part), str(part))
        if field is None:
            return UserError(f"{where}: unknown field '{key}'")
        nested = _model_class(field.annotation)
        if nested is None or depth == len(loc) - 1:
            rule = error.get("ctx", {}).get("error")
            expected = str(rule) if isinstance(rule, FieldRule) else describe(field)
            if isinstance(rule, FieldRule) and _optional(field.annotation):
                expected += " or none"
            return UserError(f"{where}: field '{key}' must be {expected}, got {error['input']!r}")
        model, where = nested, f"{where}: {key}"
    return UserError(f"{where}: {error['msg']}")


def describe(field: FieldInfo) -> str:
    """What ``field`` accepts, in words: its type and the bounds on it."""
    return _describe(field.annotation, field.metadata)


def _describe(tp: Any, metadata: Iterable[Any] = ()) -> str:
    if get_origin(tp) is Annotated:
        base, *extras = get_args(tp)
        inner = [m for e in extras for m in (e.metadata if isinstance(e, FieldInfo) else [e])]
        return _describe(base, [*metadata, *inner])
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
        return f"{_describe(inner, metadata)} or none"
    metadata = list(metadata)
    if any(getattr(m, "min_length", 0) for m in metadata):
        return "a non-empty string"
    bounds = [
        f"{sign} {_number(getattr(m, name))}"
        for m in metadata
        for name, sign in _BOUNDS
        if getattr(m, name, None) is not None
    ]
    return " ".join([_EXPECTED.get(tp, "a string"), " and ".join(bounds)]).strip()


def _number(bound: Any) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def _optional(tp: Any) -> bool:
    return type(None) in get_args(tp)


def _model_class(tp: Any) -> type[BaseModel] | None:
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None
