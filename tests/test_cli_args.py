"""surf_train.common.cli_args: flags from a settings dataclass, help from the fields' comments."""

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from surf_train.common.cli_args import add_fields, field_comments, from_args


@dataclass
class Demo:
    out_dir: str = "out"  # where results go (100% of them)
    n: int = 3
    scale: float | None = None  # None: the model's
    ids: list[int] = field(default_factory=lambda: [1, 2])
    progress: bool = True  # a progress bar
    force: bool = False


def parser(**custom):
    ap = argparse.ArgumentParser()
    add_fields(ap, Demo, **custom)
    return ap


def test_field_comments():
    assert field_comments(Demo) == {
        "out_dir": "where results go (100% of them)",
        "scale": "None: the model's",
        "progress": "a progress bar",
    }


def test_flags_types_defaults_and_round_trip():
    assert from_args(Demo, parser().parse_args([])) == Demo()
    c = from_args(
        Demo,
        parser().parse_args(
            ["--out-dir", "x", "--n", "5", "--scale", "0.5", "--ids", "7", "8", "--no-progress", "--force"]
        ),
    )
    assert c == Demo(out_dir="x", n=5, scale=0.5, ids=[7, 8], progress=False, force=True)
    assert from_args(Demo, parser(out_dir={"flag": "--out"}).parse_args(["--out", "y"]), n=9) == Demo("y", 9)


def test_help_from_comments():
    text = parser().format_help()
    assert "where results go (100% of them) (default out)" in " ".join(text.split())
    assert "--no-progress" in text and "off: a progress bar" in text and "(default 1 2)" in text


@dataclass
class Positional:
    src: str  # input file; with --convert: an earlier
    #           export
    kind: Literal["a", "b"] | None = None  # which kind
    dtype: Literal["float32", "float16"] = "float32"


def test_positional_literal_choices_and_continued_comments():
    ap = argparse.ArgumentParser()
    add_fields(ap, Positional)
    assert field_comments(Positional)["src"] == "input file; with --convert: an earlier export"
    assert from_args(Positional, ap.parse_args(["x", "--kind", "b"])) == Positional("x", "b")
    with pytest.raises(SystemExit):
        ap.parse_args(["x", "--dtype", "float64"])  # argparse: invalid choice (exit status 2)
    assert "{float32,float16}" in ap.format_help() and "(default float32)" in ap.format_help()
