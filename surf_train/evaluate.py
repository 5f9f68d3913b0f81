"""Signature-fidelity evaluation on the toy world: how close each cheap method stays to the base model.

For N (caption, seed) pairs the base model's native-resolution generation is the reference. Against it:
  direct      low-resolution generation from the same (area-downsampled) noise
  <rule>@<k>  noise-reshifting previews: k native steps, then the rest at preview size (paper, snr, pool)
  upsampled   the SURF preview upsampled to native size in latent space (trilinear)
  surf        that preview refined by the exported Refiner (K steps)
Metrics per clip: PSNR and SSIM against the reference (low-resolution outputs against the reference
area-downsampled to their size; identical clips score 99 dB), object position error against the reference's detected
centres (mean
over frames, fractions of the frame; a frame where only one of the two shows the object counts 0.5), colour /
shape / direction / background match with the caption, speed error against the reference, measured
seconds and analytic FLOPs per clip, sharpness (mean squared Laplacian of the frames over the reference's:
1 = as sharp as the base model, blur < 1). Paired differences between methods get 95% bootstrap intervals
over clips. Writes results.json, table.md, fidelity_vs_cost.png and grid.png (reference | upsampled | surf,
6 clips) to --out-dir.

--mode sr (super-resolution check, where the answer is determined): the reference's latent area-pooled to the
preview grid, upsampled back by bilinear, bicubic and the Refiner at each K in --ks; PSNR (also inside the
reference's object mask grown by --mask-dilate px, and in the flat rest), SSIM, sharpness, gains over bilinear
with intervals, and a K table (fidelity, ms, GFLOPs). Writes results_sr.json, table_sr.md and grid_sr.png.
--consistency on projects the Refiners' outputs onto the preview and adds bilinear projected the same way.

    python -m surf_train.evaluate --n 64 --refiner runs/tiny/refiner
    python -m surf_train.evaluate --n 16 --refiner none --switches 2 5 10
    python -m surf_train.evaluate --mode sr --n 64 --consistency on --refiner runs/demo/refiner
"""

from __future__ import annotations

from dataclasses import dataclass, field

from surf_train import TOY_REFINER
from surf_train.base.sampling import RULES
from surf_train.common.errors import ConfigError
from surf_train.evaluation.command import parse_settings, run_or_exit
from surf_train.evaluation.fidelity import evaluate_fidelity
from surf_train.evaluation.report import format_sr_table, format_table
from surf_train.evaluation.sr import evaluate_sr
from surf_train.models.refiner import PREVIEW_KINDS

DEFAULT_REFINER = str(TOY_REFINER)  # the shipped toy-world Refiner; `make demo` exports its own to runs/demo/refiner
MODES = ("surf", "sr")


@dataclass
class EvalConfig:
    base: str = "toy"  # base model in conf/base with a toy-world caption grammar
    refiner: str = DEFAULT_REFINER  # exported Refiner directory for `surf`, or 'none' (SURF left out)
    n: int = 32  # (caption, seed) pairs; captions cycle through the grammar
    seed: int = 0  # noise seed of the first clip
    steps: int = 20  # base-model sampling steps
    switches: list[int] = field(default_factory=lambda: [2, 5, 8, 12])  # switch steps k to compare
    rules: list[str] = field(default_factory=lambda: list(RULES))  # re-noise rules to compare
    surf_rule: str = "pool"  # preview rule SURF refines (match the pairs it was trained on)
    surf_switch: int = 5  # switch step of SURF's preview
    guidance: float | None = None  # CFG scale; None: the base model's
    refiner_steps: int | None = None  # Refiner steps; None: the K stored with the export
    start_noise: float | None = None  # Refiner start-point noise (sigma_aug_eval); None: the export's (--refiner only)
    consistency: str | None = None  # on|off: project refined latents onto the preview; None: each export's
    preview_kind: str | None = None  # told a Refiner with kind_condition; None: exact (--mode sr), generated (surf)
    batch: int = 16  # clips per batch
    bootstrap: int = 2000  # bootstrap resamples for the intervals
    out_dir: str = "outputs/evaluate"  # where results.json, table.md and the plots go
    mode: str = "surf"  # surf: previews and SURF against the native run; sr: super-resolution of the native run
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 10])  # sr: Refiner steps K to compare
    compare: str | None = None  # sr: a second exported Refiner, run at its own K beside --refiner (as `compare@K`)
    mask_dilate: int = 2  # sr: pixels the reference's object mask grows by to take its edge
    grid_clips: int = 6  # clips in grid.png
    grid_scale: int = 4  # grid.png: nearest-neighbour enlargement of each frame
    progress: bool = True

    def check(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode {self.mode!r}: choose from {list(MODES)}")
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"--ks {self.ks}: Refiner steps must be at least 1")
        bad = [r for r in [*self.rules, self.surf_rule] if r not in RULES]
        if bad:
            raise ConfigError(f"unknown re-noise rule(s) {bad}; choose from {list(RULES)}")
        for k in [*self.switches, self.surf_switch] if self.mode == "surf" else []:  # sr has no previews
            if not 0 < k < self.steps:
                raise ConfigError(f"switch {k} must be in [1, steps-1={self.steps - 1}] (0 is `direct`)")
        if self.start_noise is not None and self.start_noise < 0:
            raise ConfigError(f"--start-noise {self.start_noise} must be >= 0")
        if self.n < 2 or self.batch < 1:
            raise ConfigError(f"--n must be at least 2 (got {self.n}) and --batch at least 1 (got {self.batch})")


def evaluate(cfg: EvalConfig) -> dict:
    """Run the evaluation of cfg.mode; returns its summary (also written to cfg.out_dir)."""
    return evaluate_sr(cfg) if cfg.mode == "sr" else evaluate_fidelity(cfg)


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    return parse_settings(
        EvalConfig,
        "python -m surf_train.evaluate",
        __doc__,
        argv,
        rules={"help": f"re-noise rules to compare, from {list(RULES)}"},
        mode={"choices": list(MODES)},
        consistency={"choices": ["on", "off"]},
        preview_kind={"choices": list(PREVIEW_KINDS)},
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    result = run_or_exit(evaluate, cfg)
    grid = f"grid{'_sr' if cfg.mode == 'sr' else ''}.png" if cfg.grid_clips > 0 else None
    if cfg.mode == "sr":
        print(format_sr_table(result))
        written = ["table_sr.md", "results_sr.json"]
    else:
        print(format_table(result))
        written = ["table.md", "results.json", "fidelity_vs_cost.png"]
    print(f"wrote {', '.join(written + ([grid] if grid else []))} in {cfg.out_dir}")


if __name__ == "__main__":
    main()
