"""The command-line shell the evaluation commands share: settings from flags, and a bad setting as one line."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from surf_train.common.cli_args import add_fields, from_args
from surf_train.common.errors import ConfigError


def parse_settings(cls, prog: str, doc: str, argv: list[str] | None, **options):
    """A `cls` settings dataclass from the command line: one flag per field (add_fields' `options`), `doc` as help."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fields(ap, cls, **options)
    return from_args(cls, ap.parse_args(argv))


def run_or_exit(run: Callable[..., dict], cfg) -> dict:
    """run(cfg); a ConfigError exits with `error: ...` instead of a traceback."""
    try:
        return run(cfg)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
