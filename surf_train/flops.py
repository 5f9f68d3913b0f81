"""`python -m surf_train.flops` (`surf-flops`): the cost model's table of baseline vs SURF runs (surf_train/cost;
its counting convention is in surf_train/cost/formulas.py); `--help` lists the options."""

from __future__ import annotations

import argparse
import json
from typing import Any

from surf_train import DATA_DIR
from surf_train.base.sampling import RULES
from surf_train.common.cli_args import add_fields, from_args
from surf_train.common.errors import ConfigError
from surf_train.cost import (
    ARCH,
    MEASURED,
    BaseArch,
    RunSettings,
    composed_speedups,
    default_settings,
    format_composed,
    format_table,
    measured_accel,
    paper_comparison,
    parse_size,
    run_costs,
)
from surf_train.models.windows import IMPLS, Size3


def _window(text: str) -> Size3:
    try:
        w = tuple(int(v) for v in text.split(","))
    except ValueError:
        w = ()
    if len(w) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} must be 3 comma-separated ints wt,wh,ww, e.g. 4,16,16")
    return w  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m surf_train.flops",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Analytic forward FLOPs (1 multiply-add = 2 FLOPs; matmuls, convolutions and attention "
        "only) of a baseline run (base model at the target size for all steps, x2 for CFG) and a "
        "SURF run (prefix steps at 480p, preview steps at 240p, Refiner steps at the target size). "
        "With no --model, prints the default table (Wan 2.1 14B and HunyuanVideo at 1280x720, "
        "baselines of 50 and 40 steps, SURF 10 + 30 steps); the run options apply with --model.",
        epilog="Sizes are WIDTHxHEIGHT in pixels. Text encoders are excluded; the VAE decode only with --vae.",
    )
    add_fields(
        ap,
        RunSettings,
        skip=("label",),
        model={"choices": sorted(ARCH), "default": None, "help": "base model (conf/base name); default: the table"},
        target={"default": "1280x720", "help": "target size (default 1280x720)"},
        frames={"default": None, "help": "frames (default: 81 Wan, 129 HunyuanVideo)"},
        prefix={"help": "prefix size (default 832x480 Wan, 848x480 HunyuanVideo)"},
        preview={"default": "416x240", "help": "preview size (default 416x240)"},
        window={"type": _window, "help": "Refiner window wt,wh,ww in tokens (default: the preset's)"},
        attn_impl={
            "flag": "--impl",
            "choices": [i for i in IMPLS if i != "auto"],
            "help": "window attention form counted: exact partition or padded windows",
        },
        rule={"choices": RULES},
        cfg={"type": str, "choices": ("auto", "on", "off"), "default": "auto"},
        cfg_low={"flag": "--no-low-cfg"},
    )
    ap.add_argument("--measured", help=f"toy accel results for the composed table (default {MEASURED})")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return ap


def toy_measurement(path: str | None) -> dict[str, Any]:
    """The --measured file; without one, the checkout's shipped measurement, or none where it is absent (a wheel)."""
    if path:
        return measured_accel(path)
    shipped = DATA_DIR / MEASURED
    return measured_accel(shipped) if shipped.is_file() else {}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.model is None:
            settings = default_settings()
            for st in settings:
                st.vae = args.vae
        else:
            fam = BaseArch.from_name(args.model).family
            settings = [
                from_args(
                    RunSettings,
                    args,
                    frames=args.frames or (81 if fam == "wan" else 129),
                    cfg=None if args.cfg == "auto" else args.cfg == "on",
                    target=parse_size(args.target),
                    prefix=parse_size(args.prefix) if args.prefix else None,
                    preview=parse_size(args.preview),
                )
            ]
        runs = [run_costs(st) for st in settings]
        measured = toy_measurement(args.measured)
        composed = composed_speedups(measured) if args.model is None else None
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if args.json:
        print(
            json.dumps(
                {
                    "convention": "1 multiply-add = 2 FLOPs; matmul/conv/attention only; forward only",
                    "runs": runs,
                    "paper": paper_comparison(runs),
                    "composed": composed,
                    "measured": measured,
                },
                indent=2,
            )
        )
    else:
        print(format_table(runs))
        if composed is not None:
            print(format_composed(composed, measured))


if __name__ == "__main__":
    main()
