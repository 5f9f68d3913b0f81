"""Command-line flags from a settings dataclass (the non-Hydra CLIs): one flag a field, its help the field's comment.

`--name-with-dashes` sets field `name_with_dashes`; the default is the field's; `T | None` parses as T; a bool that
defaults to True is turned off by `--no-name` (help: "off: <comment>"), one that defaults to False on by `--name`;
`list[T]` takes one or
more values. Per-field keyword arguments of `add_argument` override any of this (`flag=` renames the flag).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import tokenize
import types
import typing
from typing import Any


def field_comments(cls) -> dict[str, str]:
    """Field name -> the comment at the end of its line in the class body."""
    out, name = {}, None
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and name is None:
            name = tok.string  # first name of a class-body line (4-space indent)
        elif tok.type == tokenize.COMMENT and name is not None:
            out[name] = tok.string.lstrip("# ").strip()
        if tok.type in (tokenize.NEWLINE, tokenize.NL):
            name = None
    fields = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in out.items() if k in fields}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _inner(tp) -> tuple[Any, bool]:
    """(T, is_list) of an annotation T, T | None or list[T]."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def add_fields(ap: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), **custom: dict) -> None:
    """One flag per field of `cls` not in `skip`; `custom[name]`: add_argument keyword arguments for that field."""
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kw = dict(custom.get(f.name, {}))
        default, (tp, is_list) = kw.pop("default", _default(f)), _inner(hints[f.name])
        flag = f"--{f.name.replace('_', '-')}"
        if tp is bool and "action" not in kw and "type" not in kw and isinstance(default, bool):
            kw.setdefault("action", "store_false" if default else "store_true")
            flag = f"--no-{f.name.replace('_', '-')}" if default else flag
        elif "action" not in kw:
            kw.setdefault("type", tp if tp in (int, float) else str)
            if is_list:
                kw.setdefault("nargs", "+")
        help_text = kw.pop("help", comments.get(f.name, "")).replace("%", "%%")
        if kw.get("action") == "store_false" and help_text:
            help_text = f"off: {help_text}"
        if default not in (None, [], "") and not isinstance(default, bool) and "(default" not in help_text:
            help_text += f"{' ' if help_text else ''}(default {' '.join(map(str, default)) if is_list else default})"
        ap.add_argument(kw.pop("flag", flag), dest=f.name, default=default, help=help_text, **kw)


def from_args(cls, ns: argparse.Namespace | dict, **extra: Any):
    """`cls` from the parsed flags that are its fields (None: the field's default), `extra` on top."""
    a = vars(ns) if isinstance(ns, argparse.Namespace) else ns
    kw = {f.name: a[f.name] for f in dataclasses.fields(cls) if a.get(f.name) is not None}
    return cls(**{**kw, **extra})
