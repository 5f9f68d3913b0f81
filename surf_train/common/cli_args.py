"""Command-line flags from a settings dataclass (the non-Hydra CLIs): one flag a field, its help the field's comment.

`--name-with-dashes` sets field `name_with_dashes`; the default is the field's; a field without a default is a
positional argument; `T | None` parses as T; `Literal[...]` gives the choices; a bool that defaults to True is
turned off by `--no-name` (help: "off: <comment>"), one that defaults to False on by `--name`; `list[T]` takes one
or more values. A comment continues on the comment lines right below it whose text is indented (`#   more`).
Per-field keyword arguments of `add_argument` override any of this (`flag=` renames the flag).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import tokenize
import types
import typing
from typing import Any, Literal

from surf_train.common.config import choices, field_default


def field_comments(cls) -> dict[str, str]:
    """Field name -> the comment at the end of its line in the class body (with its continuation lines)."""
    out, name, last = {}, None, None
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and name is None:
            name, last = tok.string, None  # first name of a class-body line (4-space indent)
        elif tok.type == tokenize.COMMENT and name is not None:
            out[name] = tok.string.lstrip("# ").strip()
            last = name
        elif tok.type == tokenize.COMMENT and last is not None and tok.string.startswith("#  "):
            out[last] += " " + tok.string.lstrip("# ").strip()  # a continuation line below the comment
        elif tok.type == tokenize.COMMENT:
            last = None
        if tok.type in (tokenize.NEWLINE, tokenize.NL):
            name = None
    fields = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in out.items() if k in fields}


def _inner(tp) -> tuple[Any, bool]:
    """(T, is_list) of an annotation T, T | None or list[T]; a Literal's T is its first value's type."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    is_list = typing.get_origin(tp) is list
    tp = typing.get_args(tp)[0] if is_list else tp
    return (type(typing.get_args(tp)[0]) if typing.get_origin(tp) is Literal else tp), is_list


def add_fields(ap: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), **custom: dict) -> None:
    """One flag per field of `cls` not in `skip`; `custom[name]`: add_argument keyword arguments for that field."""
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kw = dict(custom.get(f.name, {}))
        default, (tp, is_list) = kw.pop("default", field_default(f)), _inner(hints[f.name])
        flag = f"--{f.name.replace('_', '-')}"
        if (allowed := choices(hints[f.name])) is not None:
            kw.setdefault("choices", list(allowed))
        if default is dataclasses.MISSING:  # positional
            ap.add_argument(f.name, help=kw.pop("help", comments.get(f.name, "")).replace("%", "%%"), **kw)
            continue
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
