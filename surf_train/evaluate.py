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

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from surf_train import TOY_REFINER
from surf_train.base import BaseModel, BaseSpec, latent_frames, load_base_model
from surf_train.base.sampling import RULES, PreviewPlan, finish_preview, scheduler_steps
from surf_train.common.cli_args import add_fields, from_args
from surf_train.common.errors import ConfigError
from surf_train.models.sampler import RefinerSampler, match_preview, upsample

DEFAULT_REFINER = str(TOY_REFINER)  # the shipped toy-world Refiner; `make demo` exports its own to runs/demo/refiner
MISSING = 0.5  # position error of a frame where only one of the two clips shows the object
PSNR_CAP = 99.0  # identical clips (infinite PSNR) score this, so results stay plain JSON
MODES = ("surf", "sr")
SR_UPSAMPLERS = ("bilinear", "bicubic")  # latent-space upsamplers the Refiner must beat (bilinear: the baseline)
CONSISTENT_BILINEAR = "bilinear+consistency"  # sr with --consistency on: bilinear projected onto the preview


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


class Recorder:
    """Wraps a velocity callable; records (latent size, seconds) of every call in order."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, step):
        t0 = time.perf_counter()
        out = self.fn(x, step)
        self.calls.append((tuple(x.shape[-2:]), time.perf_counter() - t0))
        return out

    def seconds(self, first: int | None = None) -> float:
        return sum(t for _, t in self.calls[:first])


def _methods(cfg: EvalConfig) -> list[str]:
    names = ["reference", "direct", *[f"{r}@{k}" for k in cfg.switches for r in cfg.rules]]
    if f"{cfg.surf_rule}@{cfg.surf_switch}" not in names:
        names.append(f"{cfg.surf_rule}@{cfg.surf_switch}")
    return names + ["upsampled"] + (["surf"] if cfg.refiner != "none" else [])


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def hf_energy(video: torch.Tensor) -> float:
    """High-frequency energy of a (3, F, H, W) clip: mean squared Laplacian of its frames (interior pixels)."""
    x = video.clamp(-1, 1).float().transpose(0, 1).reshape(-1, 1, *video.shape[-2:])  # (F*3, 1, H, W)
    return float(F.conv2d(x, _LAPLACIAN.view(1, 1, 3, 3)).pow(2).mean())


def sharpness(video: torch.Tensor, ref: torch.Tensor) -> float:
    """hf_energy of the clip over the reference's on the same grid: 1.0 = as sharp as the base model, blur < 1."""
    return hf_energy(video) / max(hf_energy(ref), 1e-12)


def region_masks(ref_video: torch.Tensor, ref_det, dilate: int) -> tuple[np.ndarray, np.ndarray]:
    """(object, background) (F, H, W) bool masks of the reference that partition it: the detected object
    (coverage >= 0.5) grown by `dilate` pixels to take its edge, and the flat rest."""
    from surf_train.data.toyworld import object_mask

    obj = object_mask(ref_video, ref_det, dilate=dilate)
    return obj, ~obj


def masked_psnr(video: torch.Tensor, ref: torch.Tensor, mask: np.ndarray) -> float | None:
    """PSNR (data range 2) over the pixels of the (F, H, W) mask, all channels; None for an empty mask."""
    if not mask.any():
        return None
    m = torch.from_numpy(mask)
    se = (video.clamp(-1, 1) - ref.clamp(-1, 1)).pow(2)[:, m]  # (3, pixels)
    mse = float(se.mean())
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * float(np.log10(4.0 / mse)))


def _clip_metrics(
    video: torch.Tensor, ref_video: torch.Tensor, ref_det, caption: str, preview_hw: tuple[int, int] | None = None
) -> dict[str, float]:
    """Metrics of one (3, F, h, w) clip against the (3, F, H, W) reference and its detection.

    `psnr` is on the clip's own grid; `psnr_lo` on the preview grid `preview_hw` (both area-pooled to
    it), so previews, upsampled and refined clips compare on one grid. `sharpness`: see sharpness().
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from surf_train.data.toyworld import detect

    ref = ref_video
    if ref.shape[-2:] != video.shape[-2:]:
        ref = F.adaptive_avg_pool3d(ref, video.shape[1:])  # the reference at this clip's size
    a, b = (v.transpose(0, 1).clamp(-1, 1) for v in (video, ref))  # (F, 3, h, w)
    det = detect(video)
    gap = np.linalg.norm(det.centres - ref_det.centres, axis=1)  # NaN where either is missing
    gap = np.where(np.isnan(det.centres[:, 0]) & np.isnan(ref_det.centres[:, 0]), 0.0, gap)  # both: agree
    m = det.matches(caption)
    psnr = lambda x, y: min(PSNR_CAP, float(peak_signal_noise_ratio(x, y, data_range=2.0)))
    pool = lambda x: F.adaptive_avg_pool2d(x, preview_hw or x.shape[-2:])
    return {
        "psnr": psnr(a, b),
        "psnr_lo": psnr(pool(a), pool(b)),
        "ssim": float(structural_similarity_index_measure(a, b, data_range=2.0, kernel_size=7, sigma=1.0)),
        "sharpness": sharpness(video, ref),
        "pos_err": float(np.where(np.isnan(gap), MISSING, gap).mean()),
        **{k: float(v) for k, v in m.items()},
        "all3": float(m["colour"] and m["shape"] and m["direction"]),
        "speed_err": abs(det.speed - ref_det.speed),
    }


def _call_flops(model: BaseModel, lat_shape: tuple[int, ...], guidance: float | None) -> int:
    from surf_train.flops import total, wan_flops

    if model.spec.family != "wan":
        raise ConfigError(
            f"the evaluation's FLOPs model covers Wan-family base models; {model.spec.name} is {model.spec.family}"
        )
    g = model.spec.guidance if guidance is None else guidance
    return (2 if g != 1.0 else 1) * total(
        wan_flops(model.pipe.transformer.config, lat_shape, model.spec.max_sequence_length)
    )


@dataclass
class _Setup:
    """What both modes share: the base model, its geometry and schedule, the Refiner and the clips' prompts."""

    spec: BaseSpec
    model: BaseModel
    net: object | None  # the Refiner, or None
    sampler: RefinerSampler | None  # the Refiner's, as its export records it
    c: int
    f_lat: int
    hi: tuple[int, int]  # native latent grid
    lo: tuple[int, int]  # preview latent grid
    preview_px: tuple[int, int]
    schedule: object
    prompts: list[str]


def _setup(cfg: EvalConfig) -> _Setup:
    from surf_train.data.toyworld import all_captions

    cfg.check()
    spec = BaseSpec.from_name(cfg.base)
    net, sampler = _load_refiner(cfg.refiner, spec) if cfg.refiner != "none" else (None, None)
    model = load_base_model(spec, "cpu")
    frames, (h, w) = spec.native_frames, spec.native_size
    hi, lo = (h // spec.stride_s, w // spec.stride_s), (h // spec.stride_s // 2, w // spec.stride_s // 2)
    preview_px = (h // 2, w // 2)
    spec.geometry.check(frames, *preview_px, "preview")
    caps = all_captions()
    prompts = [caps[(7 * i) % len(caps)] for i in range(cfg.n)]  # 7 is coprime to 72: no early repeats
    return _Setup(
        spec=spec,
        model=model,
        net=net,
        sampler=sampler,
        c=spec.channels,
        f_lat=latent_frames(frames, spec.stride_t),
        hi=hi,
        lo=lo,
        preview_px=preview_px,
        schedule=model.schedule(cfg.steps),  # the base model's own scheduler, as its pipeline sets it
        prompts=prompts,
    )


def _batch(cfg: EvalConfig, st: _Setup, i0: int):
    """Prompts, generators, native and preview-grid noise, text conditioning and velocity of one batch."""
    ps = st.prompts[i0 : i0 + cfg.batch]
    gens = [torch.Generator().manual_seed(cfg.seed + i0 + j) for j in range(len(ps))]
    noise = torch.stack([torch.randn(st.c, st.f_lat, *st.hi, generator=g) for g in gens])
    fresh = torch.stack([torch.randn(st.c, st.f_lat, *st.lo, generator=g) for g in gens])
    cond = st.model.encode_prompt(ps)
    return ps, gens, noise, fresh, cond, st.model.velocity_fn(cond, cfg.guidance)


def _native(cfg: EvalConfig, st: _Setup, rec: Recorder, noise: torch.Tensor, wanted=()) -> tuple[torch.Tensor, dict]:
    """The full native run (the reference) and its latent at every step in `wanted`."""
    x, kept = noise, {}
    sched = st.schedule.start()
    for k in range(cfg.steps):
        if k in wanted:
            kept[k] = x
        x = scheduler_steps(rec, x, sched, 1, cfg.steps, start=k == 0)
    return x, kept


def _text(net, cond) -> torch.Tensor | None:
    return cond.embeds.float() if net.cfg.text_dim else None


def _sampler(cfg: EvalConfig, sampler: RefinerSampler, steps: int, main: bool = True) -> RefinerSampler:
    """A Refiner's sampler at K = `steps`: the export's, with --consistency (every Refiner) and --start-noise (the
    --refiner one, `main`) where given."""
    consistency = None if cfg.consistency is None else cfg.consistency == "on"
    return sampler.override(steps=steps, start_noise=cfg.start_noise if main else None, consistency=consistency)


def _refiner_gflops(st: _Setup, k: int, net=None) -> float:
    from surf_train.flops import refiner_flops, total

    net = net or st.net
    text_len = st.spec.max_sequence_length if net.cfg.text_dim else 0
    return k * total(refiner_flops(net.cfg, (st.c, st.f_lat, *st.hi), text_len)) / 1e9


def _load_refiner(path: str, spec: BaseSpec) -> tuple[object, RefinerSampler]:
    """An exported Refiner and its sampler, checked against the base model (a warning for old exports)."""
    from surf_train.models.loading import check_base, load_refiner

    if not Path(path).is_dir():
        raise ConfigError(
            f"--refiner {path}: no exported Refiner there; run `make toy-refiner` or `make demo` (or "
            f"python -m surf_train.export) first, or pass --refiner none"
        )
    net, meta = load_refiner(path)
    warning = check_base(meta, spec, f"Refiner {path}")
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return net, RefinerSampler.from_bridge(meta.get("bridge", {}))


def evaluate(cfg: EvalConfig) -> dict:
    """Run every method on every clip; returns the summary (also written to cfg.out_dir)."""
    if cfg.mode == "sr":
        return evaluate_sr(cfg)
    from surf_train.data.toyworld import detect

    st = _setup(cfg)
    model, net, c, f_lat, hi, lo = st.model, st.net, st.c, st.f_lat, st.hi, st.lo
    sampler = st.sampler or RefinerSampler()  # no Refiner: only its upsampling is used
    k_ref = cfg.refiner_steps or sampler.steps
    schedule = st.schedule
    flops_hi, flops_lo = (_call_flops(model, (c, f_lat, *s), cfg.guidance) for s in (hi, lo))
    prompts = st.prompts
    names = _methods(cfg)
    per: dict[str, list[dict]] = {m: [] for m in names}
    shown: dict[str, list[torch.Tensor]] = {m: [] for m in ("reference", "upsampled", "surf") if m in names}
    for i0 in tqdm(range(0, cfg.n, cfg.batch), desc="evaluate", unit="batch", disable=not cfg.progress):
        ps, gens, noise, fresh, cond, vel = _batch(cfg, st, i0)
        b = len(ps)
        # reference: the full native run, keeping the latent at every switch step used below
        rec = Recorder(vel)
        x, kept = _native(cfg, st, rec, noise, set(cfg.switches) | {cfg.surf_switch})
        latents = {"reference": x}
        cost = {"reference": (rec.seconds(), cfg.steps * flops_hi)}
        # direct low-resolution generation = `pool` at switch 0: downsampled noise, resolution-shifted schedule
        for name, k, rule in (
            [("direct", 0, "pool")]
            + [(f"{r}@{k}", k, r) for k in cfg.switches for r in cfg.rules]
            + [(f"{cfg.surf_rule}@{cfg.surf_switch}", cfg.surf_switch, cfg.surf_rule)]
        ):
            if name in latents:
                continue
            plan = PreviewPlan(schedule, switch=k, preview_size=lo, rule=rule)
            r2 = Recorder(vel)
            latents[name] = finish_preview(r2, noise if k == 0 else kept[k], plan, fresh)
            n_lo = sum(1 for s, _ in r2.calls if s == lo)
            cost[name] = (
                rec.seconds(k) + r2.seconds(),
                k * flops_hi + n_lo * flops_lo + (len(r2.calls) - n_lo) * flops_hi,
            )
        surf_name = f"{cfg.surf_rule}@{cfg.surf_switch}"
        t0 = time.perf_counter()
        x_up = sampler.upsample(latents[surf_name], hi)
        latents["upsampled"] = x_up
        cost["upsampled"] = (cost[surf_name][0] + time.perf_counter() - t0, cost[surf_name][1])
        if net is not None:
            t0 = time.perf_counter()
            run = _sampler(cfg, sampler, k_ref)
            latents["surf"] = run.refine(net, x_up, latents[surf_name], _text(net, cond), gens[0])
            cost["surf"] = (
                cost["upsampled"][0] + time.perf_counter() - t0,
                cost[surf_name][1] + 1e9 * _refiner_gflops(st, k_ref),
            )
        videos = {m: model.vae_decode(latents[m]) for m in names}
        for m in shown:
            shown[m] += list(videos[m][: cfg.grid_clips - len(shown[m])])
        for j, p in enumerate(ps):
            ref_det = detect(videos["reference"][j])
            for m in names:
                row = _clip_metrics(videos[m][j], videos["reference"][j], ref_det, p, st.preview_px)
                row.update(seconds=cost[m][0] / b, gflops=cost[m][1] / 1e9)
                per[m].append(row)
    result = summarise(cfg, per, names, prompts)
    write_outputs(cfg, result)
    if cfg.grid_clips > 0:
        grid_png({m: torch.stack(v) for m, v in shown.items()}, Path(cfg.out_dir) / "grid.png", cfg.grid_scale)
    return result


def _sr_metrics(video, ref_video, ref_det, caption, preview_hw, masks) -> dict[str, float | None]:
    obj, bg = masks
    return {
        **_clip_metrics(video, ref_video, ref_det, caption, preview_hw),
        "psnr_obj": masked_psnr(video, ref_video, obj),
        "psnr_bg": masked_psnr(video, ref_video, bg),
    }


def evaluate_sr(cfg: EvalConfig) -> dict:
    """Super-resolution check: the native generation's latent area-pooled to the preview grid, upsampled back by
    each method (bilinear, bicubic, the Refiner at every K in cfg.ks), compared with the native generation.
    Writes results_sr.json, table_sr.md and grid_sr.png (reference | bilinear | Refiner at its stored K)."""
    from surf_train.base.sampling import resize_latent
    from surf_train.data.toyworld import detect

    st = _setup(cfg)
    net = st.net
    # method name -> (Refiner, its sampler at K): --refiner at every K in --ks, --compare at its own K
    refiners = {f"refiner@{k}": (net, _sampler(cfg, st.sampler, k)) for k in cfg.ks} if net is not None else {}
    if cfg.compare:
        net2, sampler2 = _load_refiner(cfg.compare, st.spec)
        refiners[f"compare@{sampler2.steps}"] = (net2, _sampler(cfg, sampler2, sampler2.steps, main=False))
    # with --consistency on, bilinear projected onto the preview too: the share of the gain that needs no network
    ups = [*SR_UPSAMPLERS, *([CONSISTENT_BILINEAR] if cfg.consistency == "on" else [])]
    names = [*ups, *refiners]
    gflops = dict.fromkeys(ups, 0.0) | {m: _refiner_gflops(st, s.steps, r) for m, (r, s) in refiners.items()}
    per: dict[str, list[dict]] = {m: [] for m in names}
    k_show = cfg.refiner_steps or (st.sampler or RefinerSampler()).steps  # the grid: the Refiner at its own K
    k_show = k_show if k_show in cfg.ks else max(cfg.ks)
    shown_names = ["reference", "bilinear", *([f"refiner@{k_show}"] if net is not None else [])]
    shown_names += [m for m in refiners if m.startswith("compare@")]
    shown: dict[str, list[torch.Tensor]] = {m: [] for m in shown_names}
    for i0 in tqdm(range(0, cfg.n, cfg.batch), desc="evaluate sr", unit="batch", disable=not cfg.progress):
        ps, gens, noise, _, cond, vel = _batch(cfg, st, i0)
        b = len(ps)
        x_ref, _ = _native(cfg, st, Recorder(vel), noise)  # (B, C, F, H, W)
        x_lo = resize_latent(x_ref, st.lo, "area")  # the preview the Refiner would see, without the preview's drift
        latents, secs = {}, {}
        for m in ups:
            t0 = time.perf_counter()
            latents[m] = (
                upsample(x_lo, st.hi, m) if m != CONSISTENT_BILINEAR else match_preview(latents["bilinear"], x_lo)
            )
            secs[m] = time.perf_counter() - t0
        for m, (r, s) in refiners.items():
            t0 = time.perf_counter()
            latents[m] = s(r, x_lo, st.hi, _text(r, cond), torch.Generator().manual_seed(cfg.seed + i0))
            secs[m] = time.perf_counter() - t0
        ref_videos = st.model.vae_decode(x_ref)
        videos = {m: st.model.vae_decode(latents[m]) for m in names}
        for m in shown:
            shown[m] += list((ref_videos if m == "reference" else videos[m])[: cfg.grid_clips - len(shown[m])])
        for j, p in enumerate(ps):
            ref = ref_videos[j]
            ref_det = detect(ref)
            masks = region_masks(ref, ref_det, cfg.mask_dilate)
            for m in names:
                row = _sr_metrics(videos[m][j], ref, ref_det, p, st.preview_px, masks)
                row.update(
                    seconds=secs[m] / b,
                    gflops=gflops[m],
                    obj_frac=float(masks[0].mean()),
                )
                per[m].append(row)
    result = summarise_sr(cfg, per, names, st.prompts)
    out = Path(cfg.out_dir)
    _write(out, {"results_sr.json": json.dumps(result, indent=1), "table_sr.md": format_sr_table(result)})
    if cfg.grid_clips > 0:
        grid_png({m: torch.stack(v) for m, v in shown.items()}, out / "grid_sr.png", cfg.grid_scale)
    return result


SR_METRICS = ("psnr", "psnr_obj", "psnr_bg", "psnr_lo", "ssim", "sharpness", "pos_err", "all3")


def _values(per: list[dict], key: str) -> np.ndarray:
    """Per-clip values of one metric; None (an empty region) becomes NaN."""
    return np.array([np.nan if row[key] is None else row[key] for row in per], float)


def paired_gain(a: np.ndarray, b: np.ndarray, n_boot: int) -> dict:
    """Mean of a - b over the clips where both are defined, with its 95% bootstrap interval."""
    d = a - b
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return dict(mean=None, ci95=[None, None], separated=False, clips=0)
    lo, hi = bootstrap_ci(d, n_boot)
    return dict(
        mean=round(float(d.mean()), 4),
        ci95=[round(lo, 4), round(hi, 4)],
        separated=bool(lo > 0 or hi < 0),
        clips=len(d),
    )


def summarise_sr(cfg: EvalConfig, per: dict[str, list[dict]], names: list[str], prompts: list[str]) -> dict:
    """Means per method, sharpness intervals, gains over bilinear with intervals, and the K table."""
    metrics = list(per[names[0]][0])
    methods = {}
    for m in names:
        v = {k: _values(per[m], k) for k in metrics}
        methods[m] = {k: (round(float(np.nanmean(x)), 4) if np.isfinite(x).any() else None) for k, x in v.items()}
        lo, hi = bootstrap_ci(v["sharpness"], cfg.bootstrap)
        methods[m]["sharpness_ci95"] = [round(lo, 4), round(hi, 4)]
    # gains over bilinear; with --consistency on also the Refiners' over bilinear+consistency
    pairs = [(m, "bilinear") for m in names if m != "bilinear"]
    if CONSISTENT_BILINEAR in names:
        pairs += [(m, CONSISTENT_BILINEAR) for m in names if m.startswith(("refiner@", "compare@"))]
    paired = [
        dict(a=a, b=b, metric=k, **paired_gain(_values(per[a], k), _values(per[b], k), cfg.bootstrap))
        for a, b in pairs
        for k in SR_METRICS
    ]
    k_table = [
        dict(k=k, **{x: methods[f"refiner@{k}"][x] for x in ("psnr", "psnr_obj", "psnr_bg", "ssim", "sharpness")})
        | dict(gflops=methods[f"refiner@{k}"]["gflops"], ms=round(1000 * methods[f"refiner@{k}"]["seconds"], 2))
        for k in cfg.ks
        if f"refiner@{k}" in methods
    ]
    return {
        "mode": "sr",
        "config": asdict(cfg),
        "n": len(prompts),
        "methods": methods,
        "paired": paired,
        "k_table": k_table,
        "per_clip": {m: per[m] for m in names},
    }


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_sr_table(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"Super-resolution check, N = {result['n']} (caption, seed) pairs, base `{cfg['base']}`, {cfg['steps']} steps: "
        f"the native generation's latent area-pooled to the preview grid, upsampled back, compared with the native "
        f"generation. Object = the reference's detected object grown by {cfg['mask_dilate']} px; background = the "
        f"rest. Sharpness = mean squared Laplacian over the reference's (1 = as sharp). Refiner: `{cfg['refiner']}`"
        + (f"; compare: `{cfg['compare']}` at its own K." if cfg.get("compare") else "."),
        "",
        "| method | PSNR dB | PSNR object dB | PSNR background dB | PSNR@preview dB | SSIM | sharpness [95% CI] "
        "| position err | all 3 | GFLOPs | ms/clip |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, v in result["methods"].items():
        ci = v["sharpness_ci95"]
        lines.append(
            f"| {m} | {_f(v['psnr'], '.2f')} | {_f(v['psnr_obj'], '.2f')} | {_f(v['psnr_bg'], '.2f')} | "
            f"{_f(v['psnr_lo'], '.2f')} | {v['ssim']:.3f} | {v['sharpness']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | "
            f"{v['pos_err']:.4f} | {v['all3']:.2f} | {v['gflops']:.3f} | {1000 * v['seconds']:.1f} |"
        )
    if result["k_table"]:
        lines += [
            "",
            "Refiner steps K (fidelity and cost; ms measured on this machine, GFLOPs analytic, per clip):",
            "",
            "| K | PSNR dB | PSNR object dB | PSNR background dB | SSIM | sharpness | GFLOPs | ms/clip |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in result["k_table"]:
            lines.append(
                f"| {r['k']} | {_f(r['psnr'], '.2f')} | {_f(r['psnr_obj'], '.2f')} | {_f(r['psnr_bg'], '.2f')} | "
                f"{r['ssim']:.3f} | {r['sharpness']:.3f} | {r['gflops']:.3f} | {r['ms']:.1f} |"
            )
    lines += [
        "",
        "Gains (a - b, mean over clips, 95% bootstrap interval; higher is better except position error; for "
        "sharpness nearer 1 is better):",
        "",
        "| a | b | metric | mean | 95% CI | CI excludes 0 |",
        "|---|---|---|---|---|---|",
    ]
    for d in result["paired"]:
        lo, hi = d["ci95"]
        lines.append(
            f"| {d['a']} | {d['b']} | {d['metric']} | {_f(d['mean'], '+.4f')} | [{_f(lo, '+.4f')}, {_f(hi, '+.4f')}] | "
            f"{'yes' if d['separated'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def grid_png(
    columns: dict[str, torch.Tensor], path: Path, scale: int = 4, gap: int = 6, frame_gap: int = 2, header: int = 14
) -> tuple[int, int]:
    """PNG of (N, 3, F, H, W) clips in [-1, 1]: one row per clip, one panel per column (its F frames side by side,
    `frame_gap` gray pixels apart, each enlarged `scale` times with nearest neighbour), the column names on top.
    Returns its (width, height)."""
    from PIL import Image, ImageDraw

    vids = list(columns.values())
    n, _, f, h, w = vids[0].shape
    fw, fh = f * w * scale + (f - 1) * frame_gap, h * scale  # one panel
    size = (len(vids) * fw + (len(vids) + 1) * gap, header + n * fh + (n + 1) * gap)
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for c, (name, v) in enumerate(columns.items()):
        x0 = gap + c * (fw + gap)
        draw.text((x0, 1), name, fill=(0, 0, 0))
        # (N, 3, F, H, W) -> (N, F, H*scale, W*scale, 3) uint8
        u = ((v.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
        u = u.repeat_interleave(scale, 2).repeat_interleave(scale, 3).numpy()
        for r in range(n):
            y0 = header + gap + r * (fh + gap)
            draw.rectangle((x0, y0, x0 + fw - 1, y0 + fh - 1), fill=(160, 160, 160))  # shows between the frames
            for k in range(f):
                img.paste(Image.fromarray(u[r, k]), (x0 + k * (w * scale + frame_gap), y0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    img.save(tmp)
    os.replace(tmp, path)
    return size


def bootstrap_ci(diff: np.ndarray, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of `diff` over resampled clips."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (n_boot, len(diff)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def comparisons(cfg: EvalConfig, names: list[str]) -> list[tuple[str, str, str]]:
    """(method a, method b, metric): the paired differences the README's questions need."""
    out = []
    rules = [r for r in RULES if r in cfg.rules]  # RULES order: each rule against every earlier one
    for k in cfg.switches:
        out += [(f"{r}@{k}", "direct", "pos_err") for r in cfg.rules]
        for b, a in itertools.combinations(rules, 2):
            out += [(f"{a}@{k}", f"{b}@{k}", m) for m in ("pos_err", "psnr")]
    if "surf" in names:
        out += [("surf", "upsampled", m) for m in ("psnr", "ssim", "pos_err")]
        out.append(("surf", f"{cfg.surf_rule}@{cfg.surf_switch}", "psnr_lo"))
    return out


def summarise(cfg: EvalConfig, per: dict[str, list[dict]], names: list[str], prompts: list[str]) -> dict:
    metrics = list(per[names[0]][0])
    arr = {m: {k: np.array([row[k] for row in per[m]]) for k in metrics} for m in names}
    methods = {m: {k: round(float(arr[m][k].mean()), 4) for k in metrics} for m in names}
    diffs = []
    for a, b, metric in comparisons(cfg, names):
        d = arr[a][metric] - arr[b][metric]
        lo, hi = bootstrap_ci(d, cfg.bootstrap)
        diffs.append(
            dict(
                a=a,
                b=b,
                metric=metric,
                mean=round(float(d.mean()), 4),
                ci95=[round(lo, 4), round(hi, 4)],
                separated=bool(lo > 0 or hi < 0),
            )
        )
    return {
        "config": asdict(cfg),
        "n": len(prompts),
        "methods": methods,
        "paired": diffs,
        "per_clip": {m: per[m] for m in names},
    }


def format_table(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"N = {result['n']} (caption, seed) pairs, {cfg['steps']} steps, base `{cfg['base']}`; "
        f"SURF = Refiner on `{cfg['surf_rule']}@{cfg['surf_switch']}`. Position and speed errors are fractions "
        f"of the frame; match rates against the caption.",
        "",
        "PSNR and SSIM are on each method's own grid (previews at the preview size, against the reference "
        "area-pooled to it); PSNR@preview is every method and the reference area-pooled to the preview grid.",
        "",
        "| method | PSNR dB | PSNR@preview dB | SSIM | position err | colour | shape | direction | all 3 | speed err "
        "| GFLOPs | ms/clip |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, v in result["methods"].items():
        psnr, psnr_lo = ("ref", "ref") if m == "reference" else (f"{v['psnr']:.2f}", f"{v['psnr_lo']:.2f}")
        lines.append(
            f"| {m} | {psnr} | {psnr_lo} | {v['ssim']:.3f} | {v['pos_err']:.4f} | {v['colour']:.2f} | "
            f"{v['shape']:.2f} | {v['direction']:.2f} | {v['all3']:.2f} | {v['speed_err']:.4f} | {v['gflops']:.2f} | "
            f"{1000 * v['seconds']:.0f} |"
        )
    lines += [
        "",
        "Paired differences (a - b, mean over clips, 95% bootstrap interval; lower is better for position "
        "error, higher for PSNR/SSIM):",
        "",
        "| a | b | metric | mean | 95% CI | CI excludes 0 |",
        "|---|---|---|---|---|---|",
    ]
    for d in result["paired"]:
        lines.append(
            f"| {d['a']} | {d['b']} | {d['metric']} | {d['mean']:+.4f} | [{d['ci95'][0]:+.4f}, "
            f"{d['ci95'][1]:+.4f}] | {'yes' if d['separated'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Position error and PSNR versus GFLOPs per clip, one line per rule across switch steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, meth = result["config"], result["methods"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in (
        (axes[0], "pos_err", "object position error (frac. of frame)"),
        (axes[1], "psnr_lo", "PSNR vs reference on the preview grid (dB)"),
    ):
        for r in cfg["rules"]:
            pts = sorted((meth[f"{r}@{k}"]["gflops"], meth[f"{r}@{k}"][metric], k) for k in cfg["switches"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"preview, {r}")
            for x, y, k in pts:
                ax.annotate(f"k={k}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        for m, style in (("direct", "ks"), ("upsampled", "c^"), ("surf", "r*")):
            if m in meth:
                ax.plot(meth[m]["gflops"], meth[m][metric], style, markersize=9, label=m)
        if metric == "pos_err":
            ax.plot(meth["reference"]["gflops"], 0.0, "gD", label="reference (native)")
        ax.set_xlabel("GFLOPs per clip")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Toy world: fidelity to the native generation vs cost (N={result['n']})")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _write(out: Path, files: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def write_outputs(cfg: EvalConfig, result: dict) -> None:
    out = Path(cfg.out_dir)
    _write(out, {"results.json": json.dumps(result, indent=1), "table.md": format_table(result)})
    plot(result, out / "fidelity_vs_cost.png")


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    ap = argparse.ArgumentParser(
        prog="python -m surf_train.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_fields(
        ap,
        EvalConfig,
        rules={"help": f"re-noise rules to compare, from {list(RULES)}"},
        mode={"choices": list(MODES)},
        consistency={"choices": ["on", "off"]},
    )
    return from_args(EvalConfig, ap.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        result = evaluate(cfg)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
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
