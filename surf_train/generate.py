"""Fast generation with a trained Refiner: preview with noise reshifting, refine, decode to mp4.

    surf-generate --prompt "a red circle moving right on a gray background" --seeds 0,1
    python -m surf_train.generate --mode baseline --prompt "a blue pillar moving down on a white background"

Modes: surf (prefix at the prefix size, remaining steps at the preview size, Refiner to the target size),
baseline (the base model at the target size for every step), preview (surf without the Refiner: the
preview upsampled). Each video gets a JSON report with settings, wall time and FLOPs per stage.
Loads none of lightning, deepspeed, hydra or wandb.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import sys
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from surf_train import TOY_REFINER
from surf_train.base import Acceleration, BaseModel, BaseSpec
from surf_train.base.sampling import RULES, SCHEDULERS, DownMode, Rule  # noqa: F401  (RULES: bench_generate)
from surf_train.common.cli_args import add_fields, from_args
from surf_train.common.config import check
from surf_train.common.dtypes import DType
from surf_train.common.errors import ConfigError
from surf_train.inference.pipeline import MODES, StageClock, SurfPipeline, default_prefix, plan_sizes  # noqa: F401
from surf_train.inference.plan import check_call, check_target

DEFAULT_BASE = "toy"  # the trained toy-world model (assets/toy_base); `tiny` is random, for tests
DEFAULT_REFINER = str(TOY_REFINER)  # the shipped toy-world Refiner; `make demo` exports its own to runs/demo/refiner
SCHEDULER_NAMES = tuple(sorted(SCHEDULERS))
SIZE_FIELDS = ("height", "width", "preview_height", "preview_width", "prefix_height", "prefix_width")  # pixels
# the pipeline's argument names in its errors -> this command's flags
FLAGS = {
    **{f: "--" + f.replace("_", "-") for f in (*SIZE_FIELDS, "refiner_steps", "switch", "rule", "down", "mode")},
    **{f: "--" + f.replace("_", "-") for f in ("shift", "cache_threshold", "cfg_stop")},
    "num_inference_steps": "--steps",
    "num_frames": "--frames",
    "guidance_scale": "--guidance",
    "guidance_scale_2": "--guidance-2",
    "cfg_low": "--no-cfg-low",
}
_FLAG_RE = re.compile(r"(?<![\w.-])(" + "|".join(sorted(FLAGS, key=len, reverse=True)) + r")=")


def as_flags(message: str) -> str:
    """A library error with this command's flags for the pipeline's argument names (`num_inference_steps=0`
    -> `--steps 0`)."""
    return _FLAG_RE.sub(lambda m: FLAGS[m.group(1)] + " ", message)


log = logging.getLogger("surf_train")


@dataclass
class GenerateConfig:
    """Settings of one generation run (all sizes in pixels; None = the base model's default)."""

    base: str = DEFAULT_BASE  # base model config in conf/base
    refiner: str = DEFAULT_REFINER  # exported Refiner directory (python -m surf_train.export)
    mode: Literal[MODES] = "surf"
    prompts: list[str] = field(default_factory=lambda: ["a red circle moving right on a gray background"])
    seeds: list[int] = field(default_factory=lambda: [0])
    height: int | None = None  # target height in pixels; None: the base model's
    width: int | None = None  # target width in pixels; None: the base model's
    frames: int | None = None  # frames; None: the base model's
    prefix_height: int | None = None  # size of the first `switch` steps, pixels; None: the base model's native size
    prefix_width: int | None = None  # None: the base model's native size
    preview_height: int | None = None  # preview size, pixels; None: half the target (on the size grid)
    preview_width: int | None = None  # None: half the target (on the size grid)
    steps: int = 20  # base-model steps in total
    switch: int = 5  # steps at the prefix size before the switch
    shift: float | None = None  # timestep shift; None: the base model's (its scheduler's, unless its yaml overrides it)
    scheduler: Literal[SCHEDULER_NAMES] | None = (
        None  # replace the pipeline's scheduler class, same shift; None: the pipeline's own
    )
    guidance: float | None = None  # guidance scale; None: the base model's
    guidance_2: float | None = None  # Wan 2.2 A14B: the low-noise expert's guidance scale; None: the base model's
    rule: Rule = "pool"  # re-noise rule at the switch: the make_pairs default the Refiner was trained on
    down: DownMode = "area"  # latent downsampling kernel
    refiner_steps: int | None = None  # Refiner Euler steps; None: the K the Refiner was trained with
    cache_threshold: float | None = None  # FirstBlockCache threshold on the base model (e.g. 0.05); None: off
    cfg_stop: int | None = None  # no CFG from this base-model step on; None: CFG at every step
    cfg_low: bool = True  # CFG in the low-resolution steps
    dtype: DType = "float32"
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    out_dir: str = "outputs/generate"  # output directory
    progress: bool = True
    force: bool = False  # use a Refiner trained on another base model
    compile: bool = False  # regional compilation: torch.compile each repeated transformer block (base and Refiner)

    def __post_init__(self):
        check(self, "--")


def _sizes(cfg: GenerateConfig, spec: BaseSpec) -> dict[str, tuple[int, int]]:
    return plan_sizes(
        spec,
        cfg.height,
        cfg.width,
        (cfg.prefix_height, cfg.prefix_width),
        (cfg.preview_height, cfg.preview_width),
        cfg.mode,
        cfg.switch,
    )


def slug(prompt: str, size: int = 40) -> str:
    """The prompt's words in lower-case ASCII joined by '-', cut at a word within `size` characters."""
    ascii_ = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()  # é -> e
    s = re.sub(r"[^a-z0-9]+", "-", ascii_.lower()).strip("-")
    if len(s) > size:
        s = s[: size + 1].rsplit("-", 1)[0] if "-" in s[: size + 1] else s[:size]
    return s or "prompt"


def video_stem(cfg: GenerateConfig, i: int, prompt: str, seed: int) -> str:
    """`<mode>_p<prompt index>_s<seed>_<prompt slug>`: another prompt or seed never takes an earlier video's name."""
    return f"{cfg.mode}_p{i:03d}_s{seed}_{slug(prompt)}"


def publish(tmp: Path, stem: str) -> Path:
    """Move the finished video `tmp` to <stem>.mp4 next to it, or <stem>-2.mp4, -3, ... where that name or its
    report is taken: never overwrites (a hard link fails on an existing name, so two runs cannot both get one)."""
    for n in itertools.count(1):
        path = tmp.with_name(f"{stem}.mp4" if n == 1 else f"{stem}-{n}.mp4")
        if path.with_suffix(".json").exists():
            continue
        try:
            os.link(tmp, path)
        except FileExistsError:
            continue
        tmp.unlink()
        return path


def _check(cfg: GenerateConfig, spec: BaseSpec) -> None:
    """The pipeline's own checks of cfg's call, before any model is loaded."""
    sizes = {k: getattr(cfg, k) for k in SIZE_FIELDS}
    check_call(cfg.mode, cfg.steps, cfg.switch, cfg.refiner_steps, cfg.rule, cfg.down, num_frames=cfg.frames, **sizes)
    check_target(spec, cfg.frames or spec.native_frames, _sizes(cfg, spec)["target"])


def load_pipeline(cfg: GenerateConfig) -> SurfPipeline:
    """The SurfPipeline of cfg's base model, with its Refiner in mode surf; settings checked before loading."""
    spec = BaseSpec.from_name(cfg.base)
    spec.dtype = cfg.dtype
    if cfg.scheduler is not None:
        spec.scheduler = cfg.scheduler
    try:
        _check(cfg, spec)
    except ConfigError as e:
        raise ConfigError(as_flags(str(e))) from None
    pipe = SurfPipeline.from_surf(spec, cfg.refiner if cfg.mode == "surf" else None, cfg.device, force=cfg.force)
    if cfg.compile:
        pipe.compile_repeated_blocks()
    return pipe


def generate_one(cfg: GenerateConfig, pipe: SurfPipeline, i: int, prompt: str, seed: int) -> tuple[dict, StageClock]:
    """One video of cfg (prompt i, seed) with a loaded pipeline: mp4 + JSON report; returns (report, clock)."""
    from diffusers.utils import export_to_video

    clock = StageClock(pipe.base.device)
    out = pipe(
        prompt,
        num_frames=cfg.frames,
        num_inference_steps=cfg.steps,
        switch=cfg.switch,
        **{k: getattr(cfg, k) for k in SIZE_FIELDS},
        refiner_steps=cfg.refiner_steps,
        guidance_scale=cfg.guidance,
        guidance_scale_2=cfg.guidance_2,
        generator=torch.Generator().manual_seed(seed),
        mode=cfg.mode,
        rule=cfg.rule,
        down=cfg.down,
        shift=cfg.shift,
        clock=clock,
        acceleration=Acceleration(cfg.cache_threshold, cfg.cfg_stop, cfg.cfg_low),
    )
    plan, model = out.plan, pipe.base
    stem = video_stem(cfg, i, prompt, seed)
    tmp = Path(cfg.out_dir) / f".{stem}.{os.getpid()}.tmp.mp4"
    clock.span("mp4", export_to_video, list(out.frames[0]), str(tmp), pipe.spec.fps)  # (F, H, W, 3) in [0, 1]
    path = publish(tmp, stem)
    net = pipe.refiner if cfg.mode == "surf" else None
    flops = stage_flops(model, net, plan.names, plan.lat, plan.f_lat, plan.refiner_steps)
    report = _report(cfg, pipe.spec, plan.sizes, plan.frames, prompt, seed, plan.refiner_steps, clock, path, flops)
    report["scheduler"] = {"class": type(model.scheduler).__name__, "shift": plan.schedule.shift}
    names = plan.names
    report["forwards"] = {names[hw]: n for hw, n in model.meter.forwards.items()}  # transformer calls
    report["blocks_run"] = {
        names[hw]: round(model.meter.block_fraction(hw, model.block_lists), 4) for hw in model.meter.forwards
    }  # fraction of a full forward's blocks
    tmp_json = path.with_name(f".{path.stem}.{os.getpid()}.tmp.json")
    tmp_json.write_text(json.dumps(report, indent=1))
    os.replace(tmp_json, path.with_suffix(".json"))
    return report, clock


def generate(cfg: GenerateConfig, pipe: SurfPipeline | None = None) -> list[dict]:
    """Run every (prompt, seed); returns the reports (also written next to each mp4). pipe: already loaded.
    The pipeline's errors name this command's flags."""
    try:
        pipe = pipe or load_pipeline(cfg)
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        jobs = [(i, p, seed) for i, p in enumerate(cfg.prompts) for seed in cfg.seeds]
        return [
            generate_one(cfg, pipe, i, prompt, seed)[0]
            for i, prompt, seed in tqdm(jobs, desc=cfg.mode, disable=not cfg.progress, unit="video")
        ]
    except ConfigError as e:
        raise ConfigError(as_flags(str(e))) from None


def _report(cfg, spec, sizes, frames, prompt, seed, k_ref, clock: StageClock, path: Path, flops: dict) -> dict:
    return {
        "mode": cfg.mode,
        "prompt": prompt,
        "seed": seed,
        "video": str(path),
        "base": spec.model_id,
        "refiner": cfg.refiner if cfg.mode == "surf" else None,
        "frames": frames,
        "size": {k: list(v) for k, v in sizes.items()},
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("prompts", "seeds", "progress")},
        "refiner_steps": k_ref if cfg.mode == "surf" else 0,
        "seconds": {k: round(v, 4) for k, v in clock.seconds.items()},
        "calls": dict(clock.calls),
        "total_seconds": round(sum(clock.seconds.values()), 4),
        "flops": flops,
    }


def stage_flops(model: BaseModel, net, names: dict, lat: dict, f_lat: int, k_ref: int) -> dict:
    """Analytic forward FLOPs per stage (surf_train.flops) of the transformer work actually done: the forwards
    made (CFG branches included, so CFG truncation counts) less the blocks a cache skipped; decode not counted."""
    from surf_train.cost import metered_flops, refiner_flops, total

    spec, m = model.spec, model.meter
    latents = {hw: (spec.channels, f_lat, *hw) for hw in m.forwards}
    done = metered_flops(spec.family, model.flops_config, latents, m.forwards, m.blocks, spec.max_sequence_length)
    out = {}
    for hw, f in done.items():  # names: latent (h, w) -> report stage
        out[names[hw]] = out.get(names[hw], 0) + f
    if net is not None:
        text_len = spec.max_sequence_length if net.cfg.text_dim else 0
        out["refine"] = k_ref * total(refiner_flops(net.cfg, (spec.channels, f_lat, *lat["target"]), text_len))
    out["total"] = sum(out.values())
    return out


def parse_args(argv: list[str] | None = None) -> GenerateConfig:
    ap = argparse.ArgumentParser(
        prog="surf-generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    ap.add_argument("--prompts", help="file with one prompt per line")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    add_fields(
        ap,
        GenerateConfig,
        skip=("prompts", "seeds"),
        out_dir={"flag": "--out"},
    )
    a = vars(ap.parse_args(argv))
    prompts = list(a.pop("prompt") or [])
    pfile = a.pop("prompts")
    if pfile:
        p = Path(pfile)
        if not p.is_file():
            raise ConfigError(f"prompts file not found: {p}")
        prompts += [line.strip() for line in p.read_text().splitlines() if line.strip()]
    try:
        a["seeds"] = [int(x) for x in a["seeds"].split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {a['seeds']!r}: expected comma-separated integers") from None
    return from_args(GenerateConfig, a, **({"prompts": prompts} if prompts else {}))


def main(argv: list[str] | None = None) -> None:
    try:
        reports = generate(parse_args(argv))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for r in reports:
        print(
            f"{r['mode']}: {r['video']} ({r['frames']} frames, {r['size']['target'][0]}x{r['size']['target'][1]}) "
            f"in {r['total_seconds']:.2f}s"
        )


if __name__ == "__main__":
    main()
