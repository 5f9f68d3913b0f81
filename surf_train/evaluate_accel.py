"""Fidelity versus cost of SURF composed with acceleration plug-ins, on the toy world (issue 15).

Every method runs on the same (caption, seed) clips in one process, batch by batch, in an order rotated per
batch, so the measured wall times compare (the machine is shared: only ratios within this run mean anything).
The reference is the base model's own plain native run (its pipeline's scheduler, every step, CFG).
Methods: `baseline` (that run, timed), `baseline+cache` (diffusers' FirstBlockCache on the base model),
`surf` (pool@switch preview + Refiner), `surf+cache`, `surf+cfg-low` (no CFG in the low-resolution steps),
`surf+cache+cfg-low`, `surf+cfg-stop` (no CFG from step --cfg-stop on), `surf+cache+cfg-stop`, `surf@<steps>`
(fewer base-model steps, the switch scaled). Metrics per clip as in
surf_train.evaluate (caption match of colour, shape and direction, object position error against the
reference, PSNR on the preview grid); paired differences against `surf` get 95% bootstrap intervals over clips,
the wall-time ratio `surf / method` one over batches. GFLOPs are those of the work actually done (the Meter:
forwards made, blocks the cache skipped left out). Writes accel.json, accel.md and accel.png to --out-dir.

    python -m surf_train.evaluate_accel --n 128 --out-dir benchmarks/results/accel   # the shipped table
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from surf_train import TOY_REFINER
from surf_train.common.errors import ConfigError
from surf_train.evaluation.accel import evaluate_accel, format_table
from surf_train.evaluation.command import parse_settings, run_or_exit


@dataclass
class AccelEvalConfig:
    base: str = "toy"  # base model in conf/base with a toy-world caption grammar
    refiner: str = str(TOY_REFINER)  # exported Refiner directory (default: the shipped toy-world one)
    n: int = 64  # (caption, seed) pairs
    seed: int = 0  # noise seed of the first clip
    steps: int = 20  # base-model sampling steps
    switch: int = 5  # switch step of SURF's preview
    rule: str = "pool"  # re-noise rule of SURF's preview
    cache_threshold: float = 0.2  # from 16- and 32-clip trials: 0.1 skips 19% of blocks, 0.3 moves the object
    cfg_stop: int = 8  # CFG truncation by step: no CFG from this step on (16-clip trials of 8 and 12)
    fewer_steps: int = 10  # steps of the fewer-steps baseline
    batch: int = 8  # clips per batch
    bootstrap: int = 2000  # bootstrap resamples for the intervals
    out_dir: str = "outputs/evaluate_accel"  # where accel.json, accel.md and the plot go
    progress: bool = True
    methods: list[str] = field(default_factory=list)  # a subset (baseline and surf always run); empty: all

    def check(self) -> None:
        if self.n < 2 or self.batch < 1:
            raise ConfigError(f"--n must be at least 2 (got {self.n}) and --batch at least 1 (got {self.batch})")
        if (
            not 0 < self.switch < self.steps
            or not 1 <= self.fewer_steps <= self.steps
            or not 0 <= self.cfg_stop <= self.steps
        ):
            raise ConfigError(
                f"need 0 < switch < steps, 1 <= fewer-steps <= steps and 0 <= cfg-stop <= steps; got "
                f"switch {self.switch}, steps {self.steps}, fewer-steps {self.fewer_steps}, "
                f"cfg-stop {self.cfg_stop}"
            )
        if not Path(self.refiner).is_dir():
            raise ConfigError(f"--refiner {self.refiner}: no exported Refiner there; run `make demo` first")


def parse_args(argv: list[str] | None = None) -> AccelEvalConfig:
    return parse_settings(AccelEvalConfig, "python -m surf_train.evaluate_accel", __doc__, argv, methods={"nargs": "*"})


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    result = run_or_exit(evaluate_accel, cfg)
    print(format_table(result))
    print(f"wrote {cfg.out_dir}/accel.md, accel.json and accel.png")


if __name__ == "__main__":
    main()
