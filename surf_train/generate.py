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
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from surf_train.base import Acceleration, BaseModel, BaseSpec, load_base_model
from surf_train.cli_args import add_fields, from_args
from surf_train.dtypes import DTYPES
from surf_train.errors import ConfigError
from surf_train.export import check_base, load_refiner
from surf_train.objective import refine, upsample
from surf_train.sampling import DOWN_MODES, RULES, SCHEDULERS, PreviewPlan, preview_sample, sample

DEFAULT_BASE = "toy"  # the trained toy-world model (assets/toy_base); `tiny` is random, for tests
DEFAULT_REFINER = "runs/tiny/refiner"
MODES = ("surf", "baseline", "preview")
log = logging.getLogger("surf_train")


@dataclass
class GenerateConfig:
    """Settings of one generation run (all sizes in pixels; None = the base model's default)."""
    base: str = DEFAULT_BASE  # base model config in conf/base
    refiner: str = DEFAULT_REFINER  # exported Refiner directory (python -m surf_train.export)
    mode: str = "surf"
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
    scheduler: str | None = None  # replace the pipeline's scheduler class, same shift; None: the pipeline's own
    guidance: float | None = None  # guidance scale; None: the base model's
    rule: str = "pool"  # re-noise rule at the switch: the make_pairs default the Refiner was trained on
    down: str = "area"  # latent downsampling kernel
    refiner_steps: int | None = None  # Refiner Euler steps; None: the K the Refiner was trained with
    cache_threshold: float | None = None  # FirstBlockCache threshold on the base model (e.g. 0.05); None: off
    cfg_stop: int | None = None  # no CFG from this base-model step on; None: CFG at every step
    cfg_low: bool = True  # CFG in the low-resolution steps
    dtype: str = "float32"
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    out_dir: str = "outputs/generate"  # output directory
    progress: bool = True
    force: bool = False  # use a Refiner trained on another base model


class StageClock:
    """Wall time of network calls, split by the latent size they run at (synchronises CUDA)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.calls = device, {}, {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, fn, name_of):
        def timed(x, *a):
            self._sync()
            t = time.perf_counter()
            out = fn(x, *a)
            self._sync()
            k = name_of(x)
            self.seconds[k] = self.seconds.get(k, 0.0) + time.perf_counter() - t
            self.calls[k] = self.calls.get(k, 0) + 1
            return out
        return timed

    def time(self, name, fn, *a):
        self._sync()
        t = time.perf_counter()
        out = fn(*a)
        self._sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
        return out


def _on_grid(x: float, multiple: int) -> int:
    return max(multiple, round(x / multiple) * multiple)


def default_prefix(target: tuple[int, int], native: tuple[int, int], multiple: int) -> tuple[int, int]:
    """The target's aspect ratio at the base model's native pixel count, on the size grid (`multiple`)."""
    if target[0] * native[1] == target[1] * native[0]:
        return tuple(native)
    area, aspect = native[0] * native[1], target[1] / target[0]
    return _on_grid((area / aspect) ** 0.5, multiple), _on_grid((area * aspect) ** 0.5, multiple)


def _sizes(cfg: GenerateConfig, spec: BaseSpec) -> dict[str, tuple[int, int]]:
    h, w = cfg.height or spec.native_size[0], cfg.width or spec.native_size[1]
    g = spec.geometry
    m = g.stride_s * g.patch_s
    prefix = default_prefix((h, w), spec.native_size, m)
    # default preview: half the target on the size grid (HunyuanVideo 720p: 352x640, as 360 is off the grid)
    sizes = {"target": (h, w), "prefix": (cfg.prefix_height or prefix[0], cfg.prefix_width or prefix[1]),
             "preview": (cfg.preview_height or _on_grid(h / 2, m), cfg.preview_width or _on_grid(w / 2, m))}
    for name, (sh, sw) in sizes.items():
        g.check(None, sh, sw, name)
    if sizes["preview"][0] > h or sizes["preview"][1] > w:
        raise ConfigError(f"preview {sizes['preview']} is larger than target {(h, w)}")
    if cfg.mode != "baseline" and cfg.switch and (sizes["prefix"][0] < sizes["preview"][0]
                                                  or sizes["prefix"][1] < sizes["preview"][1]):
        log.warning("prefix %s is smaller than the preview %s: the switch resamples upward (set --prefix-height/"
                    "--prefix-width)", sizes["prefix"], sizes["preview"])
    return sizes


def _video_path(cfg: GenerateConfig, i: int, seed: int) -> Path:
    return Path(cfg.out_dir) / f"{cfg.mode}_p{i:03d}_s{seed}.mp4"


def generate(cfg: GenerateConfig) -> list[dict]:
    """Run every (prompt, seed); returns the reports (also written next to each mp4)."""
    from diffusers.utils import export_to_video

    if cfg.mode not in MODES:
        raise ConfigError(f"--mode {cfg.mode!r}: choose from {MODES}")
    if cfg.rule not in RULES or cfg.down not in DOWN_MODES:
        raise ConfigError(f"--rule must be one of {RULES} and --down one of {DOWN_MODES}")
    if cfg.steps < 1:
        raise ConfigError(f"--steps {cfg.steps}: needs at least 1 base-model step")
    if cfg.refiner_steps is not None and cfg.refiner_steps < 1:
        raise ConfigError(f"--refiner-steps {cfg.refiner_steps}: needs at least 1 Refiner step")
    if not 0 <= cfg.switch <= cfg.steps:
        raise ConfigError(f"--switch {cfg.switch} must be in [0, --steps {cfg.steps}]")
    spec = BaseSpec.from_name(cfg.base)
    spec.dtype = cfg.dtype
    if cfg.scheduler is not None:
        spec.scheduler = cfg.scheduler
    frames = cfg.frames or spec.native_frames
    sizes = _sizes(cfg, spec)
    spec.geometry.check(frames, *sizes["target"], "target")
    net, bridge = None, {}  # bridge: the training-time sampler settings stored with the export
    if cfg.mode == "surf":
        net, rmeta = load_refiner(cfg.refiner)
        bridge = rmeta.get("bridge", {})
        warning = check_base(rmeta, spec, f"Refiner {cfg.refiner}", cfg.force)
        if warning:
            log.warning("%s", warning)
    model = load_base_model(spec, cfg.device)
    acc = Acceleration(cfg.cache_threshold, cfg.cfg_stop, cfg.cfg_low)
    try:
        model.accelerate(acc)
    except ConfigError as e:
        raise ConfigError(f"--cache-threshold/--cfg-stop/--no-cfg-low: {e}") from None
    if net is not None:
        net = net.to(model.device).to_dtype(model.dtype)  # norms and adaLN tables stay float32
    s = spec.stride_s
    lat = {k: (v[0] // s, v[1] // s) for k, v in sizes.items()}
    f_lat = (frames - 1) // spec.stride_t + 1
    for k in ("target", "prefix", "preview"):
        model.check_grid(lat[k], f_lat)
    schedule = model.schedule(cfg.steps, cfg.shift)  # the pipeline's own scheduler (cfg.shift: an override)
    k_ref = bridge.get("steps", 10) if cfg.refiner_steps is None else cfg.refiner_steps
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)

    reports = []
    jobs = [(i, p, seed) for i, p in enumerate(cfg.prompts) for seed in cfg.seeds]
    for i, prompt, seed in tqdm(jobs, desc=cfg.mode, disable=not cfg.progress, unit="video"):
        clock = StageClock(model.device)
        cond = clock.time("text", model.encode_prompt, [prompt])
        text = cond.embeds.float() if net is not None and net.cfg.text_dim else None
        if text is not None and text.shape[-1] != net.cfg.text_dim:
            raise ConfigError(f"Refiner expects {net.cfg.text_dim}-wide text embeddings, {cfg.base} gives "
                              f"{text.shape[-1]}")
        # stage of each base-model call, by the latent size it runs at (the prefix wins if sizes coincide)
        names = ({lat["target"]: "full_res"} if cfg.mode == "baseline"
                 else {lat["preview"]: "low_res", lat["prefix"]: "prefix"})
        model.meter.reset()
        vel = clock.wrap(model.velocity_fn(cond, cfg.guidance, acc), lambda x: names[tuple(x.shape[-2:])])
        gen = torch.Generator().manual_seed(seed)
        c = spec.channels
        if cfg.mode == "baseline":
            noise = torch.randn((1, c, f_lat, *lat["target"]), generator=gen).to(model.device)
            latent = sample(vel, noise, schedule)  # the pipeline's own output (tests/test_pipeline_equality.py)
        else:
            plan = PreviewPlan(schedule, switch=cfg.switch, preview_size=lat["preview"], rule=cfg.rule, down=cfg.down)
            noise = torch.randn((1, c, f_lat, *lat["prefix"]), generator=gen).to(model.device)
            fresh = torch.randn((1, c, f_lat, *lat["preview"]), generator=gen).to(model.device)
            preview = preview_sample(vel, noise, plan, fresh)
            x_up = upsample(preview, lat["target"], bridge.get("up_mode", "bilinear"))
            if cfg.mode == "preview":
                latent = x_up
            else:
                def ref_fn(x, t, cnd, txt):
                    return net(x.to(model.dtype), t.to(model.dtype), cnd.to(model.dtype),
                               None if txt is None else txt.to(model.dtype)).float()

                sigma = float(bridge.get("sigma_aug_eval", 0.0))
                latent = clock.time("refine", refine, ref_fn, x_up, k_ref, sigma, text, gen)
        video = clock.time("decode", model.vae_decode, latent)  # (1, 3, frames, H, W) in [-1, 1]
        path = _video_path(cfg, i, seed)
        frames_np = ((video[0].permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1).cpu().numpy()
        tmp = path.with_name(f".{path.stem}.tmp.mp4")
        export_to_video(list(frames_np), str(tmp), fps=spec.fps)
        os.replace(tmp, path)
        flops = stage_flops(model, net if cfg.mode == "surf" else None, names, lat, f_lat, k_ref)
        report = _report(cfg, spec, sizes, frames, prompt, seed, k_ref, clock, path, flops)
        report["scheduler"] = {"class": type(model.scheduler).__name__, "shift": schedule.shift}
        report["forwards"] = {names[hw]: n for hw, n in model.meter.forwards.items()}  # transformer calls
        report["blocks_run"] = {names[hw]: round(model.meter.block_fraction(hw, model.block_lists), 4)
                                for hw in model.meter.forwards}  # fraction of a full forward's blocks
        report_path = path.with_suffix(".json")
        report_path.write_text(json.dumps(report, indent=1))
        reports.append(report)
    return reports


def _report(cfg, spec, sizes, frames, prompt, seed, k_ref, clock: StageClock, path: Path, flops: dict) -> dict:
    return {"mode": cfg.mode, "prompt": prompt, "seed": seed, "video": str(path),
            "base": spec.model_id, "refiner": cfg.refiner if cfg.mode == "surf" else None,
            "frames": frames, "size": {k: list(v) for k, v in sizes.items()},
            "settings": {k: v for k, v in asdict(cfg).items() if k not in ("prompts", "seeds", "progress")},
            "refiner_steps": k_ref if cfg.mode == "surf" else 0,
            "seconds": {k: round(v, 4) for k, v in clock.seconds.items()}, "calls": dict(clock.calls),
            "total_seconds": round(sum(clock.seconds.values()), 4), "flops": flops}


def stage_flops(model: BaseModel, net, names: dict, lat: dict, f_lat: int, k_ref: int) -> dict:
    """Analytic forward FLOPs per stage (surf_train.flops) of the transformer work actually done: the forwards
    made (CFG branches included, so CFG truncation counts) less the blocks a cache skipped; decode not counted."""
    from surf_train.flops import metered_flops, refiner_flops, total

    spec, m = model.spec, model.meter
    latents = {hw: (spec.channels, f_lat, *hw) for hw in m.forwards}
    done = metered_flops(spec.family, model.pipe.transformer.config, latents, m.forwards, m.blocks,
                         spec.max_sequence_length)
    out = {}
    for hw, f in done.items():  # names: latent (h, w) -> report stage
        out[names[hw]] = out.get(names[hw], 0) + f
    if net is not None:
        text_len = spec.max_sequence_length if net.cfg.text_dim else 0
        out["refine"] = k_ref * total(refiner_flops(net.cfg, (spec.channels, f_lat, *lat["target"]), text_len))
    out["total"] = sum(out.values())
    return out


def parse_args(argv: list[str] | None = None) -> GenerateConfig:
    ap = argparse.ArgumentParser(prog="surf-generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    ap.add_argument("--prompts", help="file with one prompt per line")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    add_fields(ap, GenerateConfig, skip=("prompts", "seeds"), mode={"choices": MODES},
               scheduler={"choices": sorted(SCHEDULERS)}, rule={"choices": RULES}, down={"choices": DOWN_MODES},
               dtype={"choices": list(DTYPES)}, out_dir={"flag": "--out"})
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
        print(f"{r['mode']}: {r['video']} ({r['frames']} frames, {r['size']['target'][0]}x{r['size']['target'][1]}) "
              f"in {r['total_seconds']:.2f}s")


if __name__ == "__main__":
    main()
