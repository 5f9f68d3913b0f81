"""Settings dataclasses as the one source of defaults and choices, for Hydra and for plain command lines.

A dataclass states each setting once: its type (`Literal[...]` for choices), its default and, in the comment at
the end of its line, what it means. `check` (called from `__post_init__`) refuses a wrong type or choice with one
ConfigError; `schema` is the dataclass's twin that Hydra's ConfigStore holds (OmegaConf knows neither `Literal`
nor unions, so every leaf is `Any` there and the dataclass checks it), so the YAML under conf/ only overrides.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from surf_train.common.errors import ConfigError


def field_default(f: dataclasses.Field) -> Any:
    """A field's default (its factory's value), or dataclasses.MISSING."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def defaults(cls) -> dict[str, Any]:
    """Field -> default of the fields of `cls` that have one."""
    return {f.name: d for f in dataclasses.fields(cls) if (d := field_default(f)) is not dataclasses.MISSING}


def _optional(tp) -> tuple[Any, bool]:
    """(T, True) for T | None, else (tp, False)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else Any), True  # a union of several: checked by its owner
    return tp, False


def choices(tp) -> tuple | None:
    """The values of a `Literal[...]` annotation (also inside `| None`, `list[...]` or `tuple[..., ...]`)."""
    tp, _ = _optional(tp)
    if typing.get_origin(tp) in (list, tuple):
        tp = typing.get_args(tp)[0]
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _type_ok(v: Any, tp) -> bool:
    tp, opt = _optional(tp)
    if v is None:
        return opt or tp is Any
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is str:
        return isinstance(v, str)
    if typing.get_origin(tp) in (list, tuple):
        return isinstance(v, (list, tuple))
    return True  # Literal (checked by its choices), unions, dicts, nested settings: their own checks


def check(obj, where: str = "") -> None:
    """ConfigError naming the field when a value of dataclass `obj` has the wrong type or is not one of its
    `Literal` choices; `where`: the key prefix in messages (e.g. "optim."; "--": command-line flags)."""
    for name, tp in typing.get_type_hints(type(obj)).items():
        if name not in {f.name for f in dataclasses.fields(obj)}:
            continue
        v, allowed = getattr(obj, name), choices(tp)
        said = f"--{name.replace('_', '-')} {v!r}" if where == "--" else f"{where}{name}={v!r}"
        if not _type_ok(v, tp):
            raise ConfigError(f"{said}: expected {_describe(tp)}")
        if allowed is None or v is None:
            continue
        bad = [x for x in (v if isinstance(v, (list, tuple)) else [v]) if x not in allowed]
        if bad:
            raise ConfigError(f"{said} must be one of {' | '.join(map(str, allowed))}")


def _describe(tp) -> str:
    tp, opt = _optional(tp)
    name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    return f"{name} or null" if opt else name


def schema(cls, **fixed: Any) -> type:
    """The twin of settings dataclass `cls` for Hydra's ConfigStore: the same keys and defaults, every leaf `Any`
    (a nested settings dataclass: its own twin); `fixed`: extra keys first, with their defaults."""
    hints, out = typing.get_type_hints(cls), [(k, Any, dataclasses.field(default=v)) for k, v in fixed.items()]
    for f in dataclasses.fields(cls):
        tp, d = hints[f.name], field_default(f)
        if d is dataclasses.MISSING:  # set by a config group (make_pairs' `base`) or the YAML
            out.append((f.name, Any, dataclasses.field(default="???")))
        elif dataclasses.is_dataclass(tp):
            twin = schema(tp)
            out.append((f.name, twin, dataclasses.field(default_factory=twin)))
        elif isinstance(d, (list, tuple, dict)):
            out.append((f.name, Any, dataclasses.field(default_factory=lambda d=d: _plain(d))))
        else:
            out.append((f.name, Any, dataclasses.field(default=d)))
    return dataclasses.make_dataclass(cls.__name__, out)


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v
