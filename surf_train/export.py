"""Training checkpoint -> a diffusers model directory of the Refiner, and loading it back.

    python -m surf_train.export runs/tiny/checkpoints/last.ckpt exported/tiny [--weights ema|raw] [--dtype ...]
    python -m surf_train.export --convert OLD_EXPORT NEW_DIR   # an export of the first format -> this one

The directory is Refiner.save_pretrained's (config.json + diffusion_pytorch_model.safetensors: load it with
`Refiner.from_pretrained(path, subfolder=..., torch_dtype=...)`), plus surf.json (what sampling needs beside
the weights: bridge settings, the base model it was trained on, step, which weights) and a model card
README.md. Checkpoints are read with `weights_only=True` (nothing is unpickled); loading needs no Hydra,
Lightning, DeepSpeed or W&B. Exports of the first format (refiner.safetensors + config.json) still load.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Literal

from surf_train.common.cli_args import add_fields, from_args
from surf_train.common.config import check
from surf_train.common.dtypes import DType
from surf_train.common.errors import ConfigError
from surf_train.models.loading import META
from surf_train.training.export import convert, export


@dataclass
class ExportSettings:
    """The command line of one export (or --convert)."""

    checkpoint: str  # Lightning .ckpt file or DeepSpeed checkpoint directory (e.g. runs/tiny/checkpoints/last.ckpt);
    #                  with --convert: an earlier export
    out_dir: str  # output directory: new, empty, or an earlier export (which is replaced)
    weights: Literal["auto", "ema", "raw"] = "auto"  # EMA or raw weights (auto: EMA when the checkpoint has it)
    dtype: DType = "float32"  # storage dtype of the weights (norms, adaLN tables and the time MLP stay float32)
    steps: int | None = None  # Refiner steps K that generation and evaluation default to (default: the run's
    #                           validation K)
    start_noise: float | None = None  # start-point noise of the sampler (bridge sigma_aug_eval; default: the run's
    #                                   validation value)
    consistency: Literal["on", "off"] | None = None  # on: the sampler projects its output onto the preview (bridge
    #                                                  consistency; default: the run's)
    convert: bool = False  # rewrite an export of the first format (refiner.safetensors + config.json) in this one

    def __post_init__(self):
        check(self, "--")


def parse_args(argv: list[str] | None = None) -> ExportSettings:
    ap = argparse.ArgumentParser(
        prog="python -m surf_train.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_fields(ap, ExportSettings)
    return from_args(ExportSettings, ap.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    try:
        a = parse_args(argv)
        out = (
            convert(a.checkpoint, a.out_dir)
            if a.convert
            else export(
                a.checkpoint,
                a.out_dir,
                a.weights,
                a.dtype,
                a.steps,
                a.start_noise,
                None if a.consistency is None else a.consistency == "on",
            )
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    meta = json.loads((out / META).read_text())
    print(f"exported {meta.get('weights', 'given')} weights of step {meta.get('step')} ({meta['dtype']}) -> {out}")


if __name__ == "__main__":
    main()
